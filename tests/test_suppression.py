"""The suppression list, enforced on every path: when a row is written (send, Email,
drop-in backend) and again when it is about to be sent."""

from __future__ import annotations

import pytest
from django.core.mail import EmailMessage

import kipekee
from kipekee import dispatch, outbox, signals, suppression
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
        dispatch.record(row, outcome)

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
    dispatch.record(row, outcome)
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
