"""A request's own send (modes ``now`` and ``hybrid``): its row is written already claimed,
so the send costs no claim statement and no second read, and the outbox's promises hold:
the row is durable before the provider is called, the result is recorded on it, and a
crash in between leaves a row an engine delivers once its lease ends."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
from django.core.mail import EmailMessage
from django.db import connection, transaction
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

import kipekee
from kipekee import dispatch, outbox, signals
from kipekee.models import Attempt, OutboxEmail, Status, Suppression
from kipekee.options import SendOptions
from kipekee.testing.assertions import deliver_outbox

from .conftest import smtp_provider
from .mailtrap_fixtures import mailtrap_provider

pytestmark = pytest.mark.django_db(transaction=True)

MAIL = {"subject": "Booking 7", "text": "confirmed", "to": ["ann@example.com"]}


def work(captured: CaptureQueriesContext) -> list[str]:
    """The statements that do work (PostgreSQL's backend logs BEGIN and COMMIT too)."""
    return [q["sql"] for q in captured.captured_queries
            if q["sql"] not in {"BEGIN", "COMMIT", "BEGIN IMMEDIATE"}]


@pytest.mark.parametrize("mode", ["hybrid", "now"])
def test_a_send_in_the_request_costs_no_claim_and_no_second_lookup(sink_provider, mode):
    kipekee.send(**MAIL, mode=mode)  # warm: connection, statements
    with CaptureQueriesContext(connection) as captured:
        receipt = kipekee.send(**MAIL, mode=mode)
    assert receipt.sent, receipt
    done = work(captured)
    # The suppression lookup and the INSERT; then the result: the UPDATE, the attempt
    # log and the server's queue id for the message.
    assert len(done) <= 5, done
    assert sum(sql.startswith("UPDATE") for sql in done) == 1, done  # the record only
    assert sum("kipekee_suppression" in sql for sql in done) == 1, done
    assert not any(sql.startswith("SELECT") and "kipekee_attachment" in sql for sql in done)


def test_a_mailtrap_send_in_the_request_is_bounded_and_keeps_its_connection(
        mailtrap, kipekee_settings):
    kipekee_settings(mailtrap=mailtrap_provider(mailtrap))
    kipekee.send(**MAIL)
    with CaptureQueriesContext(connection) as captured:
        receipts = [kipekee.send(**MAIL) for _ in range(3)]
    assert all(r.sent for r in receipts), receipts
    # Per send: the suppression lookup, the INSERT, the UPDATE, the attempt and the
    # provider's message id.
    assert len(work(captured)) <= 3 * 5, work(captured)
    assert len(mailtrap.wait_for(4)) == 4
    assert mailtrap.connections == 1  # keep-alive: one TCP connection for every request


def test_the_requests_row_is_claimed_once_and_counted_as_one_attempt(sink_provider):
    with transaction.atomic():
        receipt = kipekee.send(**MAIL)
        row = OutboxEmail.objects.get(pk=receipt.id)
        # Written already claimed, with a lease; to the caller it is queued until commit.
        assert (row.status, row.attempts) == (Status.SENDING, 1)
        assert row.claimed_by.startswith("request:") and row.lease_until > timezone.now()
        assert receipt.status == Status.QUEUED
    assert receipt.sent and receipt.attempts == 1
    assert list(Attempt.objects.filter(email_id=receipt.id).values_list("number", flat=True)) == [1]
    # Nothing left for an engine, and nothing sent twice.
    assert deliver_outbox() == 0
    assert len(sink_provider.wait_for(1)) == 1


def test_the_requests_own_claim_is_counted(sink_provider):
    # Written claimed, the row has been claimed once, as claim() would have counted it.
    receipt = kipekee.send(**MAIL)
    assert receipt.sent
    row = OutboxEmail.objects.get(pk=receipt.id)
    assert (row.attempts, row.claims) == (1, 1)


def test_engines_cannot_take_the_requests_row_before_its_lease_ends(sink_provider):
    grabbed: list[OutboxEmail] = []
    with transaction.atomic():
        # Registered first, so it runs first after commit: an engine polling right then.
        transaction.on_commit(lambda: grabbed.extend(outbox.claim_batch(10, engine="thread")))
        receipt = kipekee.send(**MAIL)
    assert grabbed == []
    assert receipt.sent and len(sink_provider.wait_for(1)) == 1


def test_a_request_that_dies_before_sending_leaves_its_row_to_engines_within_the_hold(
        sink_provider):
    # A web process killed between its commit and its send (a gunicorn worker timeout)
    # must not delay the mail by a whole engine lease (300 s): engines take the row
    # after the request's hold (30 s), as when in-request rows were held, not claimed.
    leases: list[timedelta] = []
    with transaction.atomic():
        # Registered first, so it runs before the request's own send.
        transaction.on_commit(lambda: leases.extend(
            row.lease_until - row.created_at for row in OutboxEmail.objects.all()))
        kipekee.send(**MAIL)
    assert leases == [dispatch.IN_REQUEST_HOLD]


def test_a_crash_after_the_insert_leaves_a_row_an_engine_delivers_after_its_lease(
        sink_provider):
    # What submit() writes before its on_commit delivery; the process then dies (the
    # delivery never runs).
    row, created = outbox.enqueue(EmailMessage(MAIL["subject"], MAIL["text"], to=MAIL["to"]),
                                  SendOptions(mode="hybrid"), claimed=timedelta(seconds=30))
    assert created and row.status == Status.SENDING
    assert deliver_outbox() == 0  # within the lease: no engine takes it
    OutboxEmail.objects.filter(pk=row.pk).update(lease_until=timezone.now() - timedelta(seconds=1))
    assert deliver_outbox() == 1  # the lease ran out: an engine sends it
    row.refresh_from_db()
    assert row.status == Status.SENT and row.attempts == 2
    assert len(sink_provider.wait_for(1)) == 1


def test_a_row_an_engine_took_after_a_long_transaction_is_not_sent_again(
        smtp_sink, kipekee_settings):
    kipekee_settings(primary=smtp_provider(smtp_sink), _extra={"LEASE_SECONDS": 0.5})
    with transaction.atomic():
        # Registered first: once committed, an engine finds the lease run out and takes it.
        transaction.on_commit(lambda: deliver_outbox())
        receipt = kipekee.send(**MAIL)
        time.sleep(0.6)  # the caller's transaction outlives the lease
    # The request asked before sending (its claim's token no longer on the row) and
    # left the row to the engine: one message.
    assert receipt.sent and receipt.attempts == 2
    assert len(smtp_sink.wait_for(1)) == 1
    time.sleep(0.2)
    assert len(smtp_sink.messages) == 1


def test_a_long_transaction_renews_the_lease_before_sending(smtp_sink, kipekee_settings):
    kipekee_settings(primary=smtp_provider(smtp_sink), _extra={"LEASE_SECONDS": 0.5})
    with transaction.atomic():
        receipt = kipekee.send(**MAIL)
        time.sleep(0.6)  # the lease ran out, but no engine took the row
    assert receipt.sent and receipt.attempts == 1
    assert len(smtp_sink.wait_for(1)) == 1


def test_a_requests_row_with_attachments_is_sent_with_them_unread(sink_provider):
    email = kipekee.Email(**MAIL)
    email.attach("ticket.txt", "seat 12", "text/plain")
    with CaptureQueriesContext(connection) as captured:
        receipt = email.send()
    assert receipt.sent, receipt
    assert not any("kipekee_attachment" in sql for sql in work(captured)
                   if sql.startswith("SELECT")), work(captured)
    [message] = sink_provider.wait_for(1)
    assert b"seat 12" in message.data


def test_suppressed_in_a_transaction_that_stayed_open_is_checked_again(
        sink_provider, monkeypatch):
    monkeypatch.setattr(dispatch, "FRESH_CHECK_SECONDS", 0.0)  # any wait counts as long
    with transaction.atomic():
        receipt = kipekee.send(**MAIL)
        Suppression.objects.create(address="ann@example.com", reason="manual")
    assert receipt.suppressed, receipt
    assert sink_provider.messages == []


def test_what_a_queued_receiver_does_to_its_row_in_memory_is_not_what_is_sent(sink_provider):
    def receiver(sender, email, **kwargs):
        email.subject = "changed by a receiver"
        email.to.append("mallory@example.com")

    signals.queued.connect(receiver)
    try:
        receipt = kipekee.send(**MAIL)
    finally:
        signals.queued.disconnect(receiver)
    assert receipt.sent, receipt
    [message] = sink_provider.wait_for(1)
    assert message.message["Subject"] == MAIL["subject"]
    assert list(message.rcpt_tos) == ["ann@example.com"]
