"""Recording a batch: whatever became of each row (sent, deferred, failed, suppressed),
one UPDATE per claim and one INSERT of the attempts — against a real SMTP server."""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from datetime import timedelta

import pytest
from django.db import connection, transaction
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

import kipekee
from kipekee import outbox, suppression
from kipekee.delivery import Deliverer
from kipekee.models import Attempt, ErrorKind, OutboxEmail, Status
from kipekee.recording import record_many
from kipekee.testing import Faults

from .conftest import smtp_provider

pytestmark = pytest.mark.django_db(transaction=True)

REFUSALS = {"gone@example.com": "550 5.1.1 no such user",
            "busy@example.com": "451 4.2.0 mailbox busy, try later"}


def batch(kipekee_settings, smtp_server, recipients: list[str]) -> tuple[list, list]:
    server = smtp_server(faults=Faults(refuse_recipients=REFUSALS))
    kipekee_settings(primary=smtp_provider(server))
    kipekee.send_many([kipekee.Email(subject=f"Order {i}", text="thanks", to=address)
                       for i, address in enumerate(recipients)], lane="transactional")
    rows = outbox.claim_batch(len(recipients))
    with Deliverer() as deliverer:
        return rows, deliverer.deliver_many(rows)


def statements(captured: CaptureQueriesContext, verb: str) -> int:
    return sum(q["sql"].startswith(verb) for q in captured.captured_queries)


def test_mixed_results_are_one_update_and_one_insert(kipekee_settings, smtp_server):
    recipients = ["a@example.com", "gone@example.com", "busy@example.com",
                  "late-suppressed@example.com", "b@example.com", "c@example.com"]
    server = smtp_server(faults=Faults(refuse_recipients=REFUSALS))
    kipekee_settings(primary=smtp_provider(server))
    kipekee.send_many([kipekee.Email(subject=f"Order {i}", text="thanks", to=address)
                       for i, address in enumerate(recipients)], lane="transactional")
    suppression.add("late-suppressed@example.com")  # after it was queued
    rows = outbox.claim_batch(len(recipients))
    with Deliverer() as deliverer:
        outcomes = deliverer.deliver_many(rows)
    by_address = {row.to[0]: row for row in rows}
    with CaptureQueriesContext(connection) as captured, transaction.atomic():
        assert record_many(rows, outcomes) == [True] * len(rows)
    assert statements(captured, "UPDATE") == 1, [q["sql"][:60] for q in captured]
    # The attempt log, and the server's queue ids (ProviderMessage) of the sent ones.
    inserts = [q["sql"] for q in captured if q["sql"].startswith("INSERT")]
    assert len(inserts) == 2 and "kipekee_attempt" in inserts[0], inserts
    assert "kipekee_providermessage" in inserts[1], inserts

    after = {row.to[0]: row for row in OutboxEmail.objects.filter(pk__in=[r.pk for r in rows])}
    assert {a: after[a].status for a in after} == {
        "a@example.com": Status.SENT, "b@example.com": Status.SENT,
        "c@example.com": Status.SENT, "gone@example.com": Status.FAILED,
        "busy@example.com": Status.DEFERRED,
        "late-suppressed@example.com": Status.SUPPRESSED}
    assert all(r.claimed_by == "" and r.lease_until is None for r in after.values())
    busy, gone = after["busy@example.com"], after["gone@example.com"]
    assert busy.error_kind == ErrorKind.TRANSIENT and "451" in busy.last_error
    assert busy.due_at > timezone.now() and busy.sent_at is None
    assert gone.error_kind == ErrorKind.PERMANENT and "550" in gone.last_error
    assert after["late-suppressed@example.com"].last_error.startswith("not sent")
    for address in ("a@example.com", "b@example.com", "c@example.com"):
        row, attempt = after[address], Attempt.objects.get(email=after[address])
        # Each row its own time, as its attempt says; the rows in hand are as written.
        assert row.sent_at == attempt.finished_at and row.sent_by == "primary"
        assert by_address[address].status == Status.SENT
    # The attempt log: one per row tried (the suppressed one was not tried, but counts).
    assert Attempt.objects.filter(email_id__in=[r.pk for r in rows]).count() == len(rows)


def test_queries_do_not_grow_with_the_batch(kipekee_settings, smtp_server):
    def record(n: int) -> int:
        OutboxEmail.objects.all().delete()
        recipients = [f"ok{i}@example.com" if i % 2 else "busy@example.com" for i in range(n)]
        rows, outcomes = batch(kipekee_settings, smtp_server, recipients)
        with CaptureQueriesContext(connection) as captured, transaction.atomic():
            record_many(rows, outcomes)
        return len(captured.captured_queries)

    assert record(4) == record(40)


def test_a_row_taken_over_keeps_its_new_attempt_and_the_others_are_recorded(
        kipekee_settings, smtp_server):
    recipients = ["a@example.com", "busy@example.com", "gone@example.com"]
    rows, outcomes = batch(kipekee_settings, smtp_server, recipients)
    busy = next(row for row in rows if row.to == ["busy@example.com"])
    # Its lease ran out while the batch was sent; another engine took it.
    OutboxEmail.objects.filter(pk=busy.pk).update(
        lease_until=timezone.now() - timedelta(seconds=1))
    [taken] = outbox.claim_batch(1, engine="other", ids=[busy.pk])
    recorded = dict(zip((row.pk for row in rows), record_many(rows, outcomes), strict=True))
    assert recorded[busy.pk] is False and sum(recorded.values()) == 2
    again = OutboxEmail.objects.get(pk=busy.pk)
    assert (again.status, again.claimed_by, again.attempts) == (Status.SENDING,
                                                                taken.claimed_by, 2)
    assert OutboxEmail.objects.get(to=["gone@example.com"]).status == Status.FAILED


# --- a database error while recording -----------------------------------------------------


def _hold_write_lock(path: str, seconds: float) -> None:
    # A second connection holds SQLite's write lock (a migration, a backup, another
    # process's long transaction): writers that wait less get "database is locked".
    db = sqlite3.connect(path, timeout=30, isolation_level=None)
    try:
        db.execute("BEGIN IMMEDIATE")
        time.sleep(seconds)
        db.execute("ROLLBACK")
    finally:
        db.close()


@pytest.mark.skipif(os.environ.get("KIPEKEE_TEST_DATABASE") == "postgres",
                    reason="SQLite's write lock; on PostgreSQL tests/test_soak.py kills the "
                           "workers' sessions while they record")
@pytest.mark.parametrize("engine", ["sender", "worker"])
def test_a_record_waits_out_a_brief_database_error(engine, kipekee_settings, smtp_server):
    """The database refuses writes for 1.5 s just as a sent batch is recorded (here
    SQLite's write lock, held longer than the engine waits for it). Before: the record
    failed, the row stayed ``sending`` until its lease ended and was sent again. Now the
    record is tried again, for up to half a lease (the claim is still this engine's)."""
    from kipekee.engines import Sender, Stats
    from kipekee.engines.worker import Worker

    taken = threading.Event()
    server = smtp_server(faults=Faults(stall_before_data_reply=0.5),
                         on_message=lambda message: taken.set())
    kipekee_settings(primary=smtp_provider(server), _extra={"LEASE_SECONDS": 10})
    receipt = kipekee.send(subject="Order 1", text="thanks", to="ann@example.com", mode="queue")
    options = connection.settings_dict["OPTIONS"]
    waited = options["timeout"]
    options["timeout"] = 0.2  # the engine's threads open their connections with it
    locker = threading.Thread(target=lambda: taken.wait(20) and _hold_write_lock(
        connection.settings_dict["NAME"], 1.5))
    locker.start()
    try:
        if engine == "sender":
            sender = Sender(engine="test", batch_size=10, stats=Stats())
            try:
                sender.run_once()
            finally:
                sender.close()
        else:
            Worker(concurrency=1, batch_size=10, poll_interval=0.2, once=True,
                   name="test").run()
    finally:
        locker.join()
        options["timeout"] = waited
    row = OutboxEmail.objects.get(message_id=receipt.message_id)
    assert (row.status, row.attempts) == (Status.SENT, 1)
    assert [m.message_id for m in server.messages] == [row.message_id]
    assert list(Attempt.objects.values_list("number", "outcome")) == [(1, "sent")]


def test_outcomes_are_logged_only_once_their_record_is_committed(kipekee_settings, smtp_server,
                                                                caplog):
    """The log says what the outbox says: a record whose transaction does not commit (a
    database error before the commit, here the caller's rollback) logs nothing of the
    rows being sent, deferred or failed; they are logged when a record commits."""
    rows, outcomes = batch(kipekee_settings, smtp_server,
                           ["a@example.com", "gone@example.com", "busy@example.com"])
    caplog.set_level("DEBUG", logger="kipekee.dispatch")
    with pytest.raises(RuntimeError), transaction.atomic():
        assert record_many(rows, outcomes) == [True] * 3
        raise RuntimeError("the record's transaction does not commit")
    assert caplog.records == [], caplog.text
    assert set(OutboxEmail.objects.values_list("status", flat=True)) == {Status.SENDING}

    rows = list(OutboxEmail.objects.order_by("pk"))  # as claimed: still this attempt's
    with transaction.atomic():
        assert record_many(rows, outcomes) == [True] * 3
        assert caplog.records == []  # not before the commit
    logged = caplog.text
    assert f"Sent outbox email {rows[0].pk} via primary" in logged, logged
    assert f"Outbox email {rows[1].pk} failed" in logged, logged
    assert f"Outbox email {rows[2].pk} deferred until" in logged, logged
