"""The suppression list, enforced on every path: when a row is written (send, Email,
drop-in backend) and again when it is about to be sent."""

from __future__ import annotations

import pytest
from django.core.mail import EmailMessage

import kipekee
from kipekee import outbox, recording, signals, suppression
from kipekee.backend import EmailBackend
from kipekee.delivery import Deliverer
from kipekee.models import Attempt, OutboxEmail, Status, Suppression, SuppressionReason

from .mailtrap_fixtures import mailtrap_provider

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def provider(mailtrap, kipekee_settings):
    kipekee_settings(mailtrap=mailtrap_provider(mailtrap))
    return mailtrap


def test_every_recipient_suppressed_nothing_is_sent_and_the_receipt_says_why(provider):
    suppression.add("gone@example.com", SuppressionReason.HARD_BOUNCE, source="Mailtrap webhook")
    seen = []
    signals.suppressed.connect(lambda sender, email, outcome, **kw: seen.append(email.pk),
                               weak=False, dispatch_uid="test-suppressed")
    try:
        receipt = kipekee.send(subject="Hi", text="x", to=["Gone <GONE@example.com>"])
    finally:
        signals.suppressed.disconnect(dispatch_uid="test-suppressed")
    assert receipt.suppressed and receipt.status == Status.SUPPRESSED
    assert not receipt.pending and not receipt.sent
    assert "Gone <GONE@example.com> (suppressed: hard bounce via Mailtrap webhook" in receipt.error
    assert list(receipt.refused) == ["Gone <GONE@example.com>"]
    assert provider.requests == []
    assert seen == [receipt.id]
    assert not Attempt.objects.exists()


def test_suppressed_recipients_among_others_are_taken_off(provider):
    suppression.add("gone@example.com", SuppressionReason.UNSUBSCRIBE)
    receipt = kipekee.send(subject="Hi", text="x", to=["ann@example.com", "gone@example.com"],
                           bcc=["gone@example.com"])
    assert receipt.sent, receipt
    assert receipt.refused == {"gone@example.com": receipt.refused["gone@example.com"]}
    assert receipt.refused["gone@example.com"].startswith("suppressed: unsubscribed")
    [message] = provider.messages
    assert message["to"] == [{"email": "ann@example.com"}] and "bcc" not in message
    row = OutboxEmail.objects.get(pk=receipt.id)
    assert row.to == ["ann@example.com"] and row.bcc == []


def test_suppressed_after_it_was_queued(provider):
    queued = kipekee.send(subject="Reminder", text="x", to=["ann@example.com"], mode="queue")
    both = kipekee.send(subject="Reminder", text="x", to=["ann@example.com", "bob@example.com"],
                        mode="queue")
    suppression.add("ANN@example.com", SuppressionReason.SPAM_COMPLAINT)

    rows = [outbox.claim(queued.id), outbox.claim(both.id)]
    with Deliverer() as deliverer:
        outcomes = deliverer.deliver_many(rows)
    for row, outcome in zip(rows, outcomes):
        recording.record(row, outcome)

    assert queued.refresh().suppressed
    assert "spam complaint" in queued.error
    assert Attempt.objects.get(email_id=queued.id).outcome == "suppressed"
    assert both.refresh().sent
    assert "ann@example.com" in both.refused
    assert [m["to"] for m in provider.messages] == [[{"email": "bob@example.com"}]]


def test_single_deliver_rechecks_too(provider):
    receipt = kipekee.send(subject="Reminder", text="x", to=["ann@example.com"], mode="queue")
    suppression.add("ann@example.com")
    row = outbox.claim(receipt.id)
    with Deliverer() as deliverer:
        outcome = deliverer.deliver(row)
    assert outcome.suppressed and not outcome.ok
    recording.record(row, outcome)
    assert receipt.refresh().status == Status.SUPPRESSED
    assert provider.requests == []


def test_drop_in_backend_does_not_count_a_suppressed_message(provider):
    suppression.add("gone@example.com")
    gone = EmailMessage("OTP", "123456", "otp@prs.example", ["gone@example.com"])
    here = EmailMessage("OTP", "123456", "otp@prs.example", ["ann@example.com"])
    assert EmailBackend().send_messages([gone, here]) == 1
    assert gone.kipekee_receipt.suppressed
    assert "gone@example.com" in gone.kipekee_receipt.error
    assert here.kipekee_receipt.sent


def test_removed_from_the_list_it_is_sent_again(provider):
    suppression.add("ann@example.com")
    assert kipekee.send(subject="a", text="x", to=["ann@example.com"]).suppressed
    assert suppression.remove("Ann <ann@EXAMPLE.com>")
    assert not suppression.remove("ann@example.com")
    assert kipekee.send(subject="a", text="x", to=["ann@example.com"]).sent


def test_admin_edits_the_list(admin_client):
    page = admin_client.get("/admin/kipekee/suppression/add/")
    assert page.status_code == 200
    response = admin_client.post("/admin/kipekee/suppression/add/", {
        "address": " Someone@Example.COM ", "reason": "manual", "source": "support desk",
        "detail": "asked by phone"})
    assert response.status_code == 302, response.content
    entry = Suppression.objects.get()
    assert (entry.address, entry.reason, entry.source) == ("someone@example.com", "manual",
                                                           "support desk")
    assert admin_client.get("/admin/kipekee/suppression/").status_code == 200
    assert admin_client.get("/admin/kipekee/webhookevent/").status_code == 200


# --- one mailbox, many spellings (issue 17, item 17) -------------------------------------

#: Each tuple: one mailbox, written as people, forms and providers write it.
SPELLINGS = [
    pytest.param(("user@bücher.example", "user@xn--bcher-kva.example", "USER@BÜCHER.EXAMPLE",
                  "user@bu\u0308cher.example",  # ü decomposed: u + combining diaeresis
                  '"user"@xn--bcher-kva.example', "User <user@Xn--Bcher-Kva.Example>"),
                 id="idn"),
    pytest.param(("user@example.com", '"user"@example.com', '"us\\er"@EXAMPLE.com',
                  'Ann <"User"@Example.COM>', "user@example.COM"), id="quoted-and-case"),
]


@pytest.mark.parametrize("spellings", SPELLINGS)
def test_a_suppressed_mailbox_is_suppressed_however_it_is_written(provider, spellings):
    delivered = []
    for listed in spellings:
        suppression.add(listed, SuppressionReason.HARD_BOUNCE)
        assert Suppression.objects.count() == 1
        for other in spellings:
            receipt = kipekee.send(subject="Hi", text="x", to=[other])
            if not receipt.suppressed:
                delivered.append((listed, other))
        assert suppression.remove(spellings[-1])
    assert delivered == []
    assert provider.requests == []


def test_canonical_addresses():
    from kipekee.addresses import canonical

    assert canonical("Ann <Ann@Example.COM>") == "ann@example.com"
    assert canonical("user@bücher.example") == "user@xn--bcher-kva.example"
    assert canonical("user@bu\u0308cher.example") == "user@xn--bcher-kva.example"
    assert canonical('"user"@example.com') == "user@example.com"
    assert canonical('"ann.b"@example.com') == "ann.b@example.com"
    # Quotes that are needed stay, in one spelling.
    assert canonical('"a b"@example.com') == canonical('"a\\ b"@EXAMPLE.com') == '"a b"@example.com'
    assert canonical('"a..b"@example.com') == '"a..b"@example.com'
    assert canonical("ann+tag@example.com") == "ann+tag@example.com"  # another mailbox
    assert canonical("user@[127.0.0.1]") == "user@[127.0.0.1]"
    # Not an address: itself, trimmed and lower-cased (it still equals itself).
    assert canonical("  Not An Address ") == "not an address"
    for address in ["user@bücher.example", '"a b"@x.org', "Ann <ann@x.org>", '"a\\"b"@x.org',
                    "x@" + "a" * 70 + ".org", "ünïcode@bücher.example", "not an address"]:
        once = canonical(address)
        assert canonical(once) == once, address


def test_queued_before_it_was_suppressed_under_another_spelling(provider):
    receipt = kipekee.send(subject="Reminder", text="x", to=["user@bücher.example"], mode="queue")
    suppression.add('"USER"@xn--bcher-kva.example')
    row = outbox.claim(receipt.id)
    with Deliverer() as deliverer:
        recording.record(row, deliverer.deliver(row))
    assert receipt.refresh().suppressed
    assert provider.requests == []


def test_admin_stores_and_finds_the_canonical_address(admin_client):
    response = admin_client.post("/admin/kipekee/suppression/add/", {
        "address": ' "User"@BÜCHER.example ', "reason": "manual", "source": "", "detail": ""})
    assert response.status_code == 302, response.content
    assert Suppression.objects.get().address == "user@xn--bcher-kva.example"
    found = admin_client.get("/admin/kipekee/suppression/", {"q": "User@bücher.example"})
    assert found.context["cl"].result_count == 1
    # The same mailbox again: refused as a duplicate, not stored twice.
    again = admin_client.post("/admin/kipekee/suppression/add/", {
        "address": "user@xn--bcher-kva.example", "reason": "manual", "source": "", "detail": ""})
    assert again.status_code == 200 and Suppression.objects.count() == 1


def test_a_webhook_suppresses_the_mailbox_whatever_its_spelling(mailtrap, kipekee_settings):
    from .test_webhooks import SECRET, event, post

    kipekee_settings({"WEBHOOK_SECRET": SECRET}, mailtrap=mailtrap_provider(mailtrap))
    assert post([event("bounce", "elsewhere", event_id="idn-1", email="User@XN--BCHER-KVA.example",
                       response="550 5.1.1 no such user")]).status_code == 200
    assert Suppression.objects.get().address == "user@xn--bcher-kva.example"
    for spelling in ["user@bücher.example", '"user"@bu\u0308cher.example']:
        assert kipekee.send(subject="Hi", text="x", to=[spelling]).suppressed
    assert mailtrap.requests == []


def _statements(captured) -> list[str]:
    return [q["sql"] for q in captured.captured_queries if q["sql"] not in {"BEGIN", "COMMIT"}]


def test_a_queued_send_to_nobody_listed_is_one_statement(provider):
    """The suppression check rides in the INSERT (``WHERE NOT EXISTS``): a send in
    autocommit to recipients not on the list writes its row in one statement."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    suppression.add("someone-else@example.com")
    with CaptureQueriesContext(connection) as captured:
        receipt = kipekee.send(subject="Hi", text="x", to=["ann@example.com"],
                               cc=["Bob <bob@example.com>"], mode="queue",
                               idempotency_key="one-statement")
    statements = _statements(captured)
    assert len(statements) == 1 and statements[0].startswith("INSERT"), statements
    assert receipt.status == Status.QUEUED and receipt.refused == {}
    row = OutboxEmail.objects.get(pk=receipt.id)
    assert row.to == ["ann@example.com"] and row.cc == ["Bob <bob@example.com>"]


def test_a_listed_recipient_under_any_spelling_stops_the_one_statement_write(provider):
    """The INSERT's check compares canonical addresses as the list stores them: a listed
    mailbox spelled otherwise is taken off (the row written after the full check), in a
    transaction too, and a key sent again still gives its first row."""
    from django.db import transaction

    suppression.add("gone@bücher.example")
    with transaction.atomic():
        receipt = kipekee.send(subject="Hi", text="x", mode="queue", idempotency_key="k1",
                               to=["ann@example.com", "Gone <GONE@xn--bcher-kva.example>"])
    assert receipt.status == Status.QUEUED
    assert list(receipt.refused) == ["Gone <GONE@xn--bcher-kva.example>"]
    assert OutboxEmail.objects.get(pk=receipt.id).to == ["ann@example.com"]
    again = kipekee.send(subject="Hi", text="x", mode="queue", idempotency_key="k1",
                         to=["ann@example.com", "Gone <GONE@xn--bcher-kva.example>"])
    assert again.id == receipt.id and not again.created
    assert OutboxEmail.objects.count() == 1


@pytest.mark.parametrize("mode", ["now", "hybrid"])
def test_a_send_in_the_request_to_a_listed_recipient_is_written_unclaimed(provider, mode):
    """A request's own row is written already claimed; when its one-statement INSERT
    finds a recipient listed, the row is written after the full check without the claim
    if nobody is left (suppressed rows are never claimed), with it if someone is."""
    suppression.add("gone@example.com")
    alone = kipekee.send(subject="Hi", text="x", to=["gone@example.com"], mode=mode)
    row = OutboxEmail.objects.get(pk=alone.id)
    assert row.status == Status.SUPPRESSED and alone.suppressed
    assert (row.attempts, row.claimed_by, row.lease_until) == (0, "", None)
    others = kipekee.send(subject="Hi", text="x", to=["ann@example.com", "gone@example.com"],
                          mode=mode)
    assert others.sent, others
    row = OutboxEmail.objects.get(pk=others.id)
    assert row.to == ["ann@example.com"] and row.attempts == 1
    assert [m["to"] for m in provider.messages] == [[{"email": "ann@example.com"}]]
