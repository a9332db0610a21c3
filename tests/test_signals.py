"""Kipekee's signals: sent once what they announce is committed, and a receiver that
raises never changes what Kipekee records nor reaches the engine or the caller (issue
17, item 2). Against a real SMTP server, with real engines."""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Iterator

import pytest
from django.db import connection, transaction

import kipekee
from kipekee import outbox, signals, suppression
from kipekee.engines.worker import Worker
from kipekee.models import Attempt, OutboxEmail, Status
from kipekee.testing import Faults

from .app.models import Quote
from .conftest import smtp_provider

pytestmark = pytest.mark.django_db(transaction=True)

MAIL = {"subject": "Order", "text": "thanks", "to": ["ann@example.com"]}


class Broken(Exception):
    """What the receivers raise."""


@pytest.fixture
def raising() -> Iterator[dict[str, list[tuple[int, bool]]]]:
    """Connect a receiver that raises to every Kipekee signal. It notes, per signal, the
    row's id and whether it ran inside a transaction (it must not: after the commit)."""
    seen: dict[str, list[tuple[int, bool]]] = {}
    names = ("queued", "sent", "deferred", "failed", "cancelled", "suppressed")

    def receiver_for(name: str):
        def receive(sender, email, **kwargs):
            seen.setdefault(name, []).append((email.pk, connection.in_atomic_block))
            raise Broken(f"{name} receiver broke")
        return receive

    for name in names:
        getattr(signals, name).connect(receiver_for(name), weak=False,
                                       dispatch_uid=f"test-raising-{name}")
    try:
        yield seen
    finally:
        for name in names:
            getattr(signals, name).disconnect(dispatch_uid=f"test-raising-{name}")


def logged(caplog: pytest.LogCaptureFixture, name: str) -> int:
    """How many receiver errors of signal ``name`` were logged with their traceback."""
    return sum(1 for r in caplog.records
               if r.name == "kipekee.signals" and f"kipekee.signals.{name}" in r.getMessage()
               and r.exc_info is not None and isinstance(r.exc_info[1], Broken))


def test_a_raising_sent_receiver_does_not_undo_the_record_of_a_batch(smtp_sink,
                                                                     kipekee_settings,
                                                                     raising, caplog):
    """Before: the receiver's exception rolled back the batch's record, the rows stayed
    ``sending`` and were sent again at every lease, past MAX_ATTEMPTS."""
    kipekee_settings(primary=smtp_provider(smtp_sink),
                     _extra={"RETRY": {"MAX_ATTEMPTS": 3}, "LEASE_SECONDS": 1})
    signals.queued.disconnect(dispatch_uid="test-raising-queued")  # the engine's part only
    ids = [kipekee.send(**{**MAIL, "subject": f"Order {i}"}, mode="queue").id for i in range(5)]
    worker = Worker(concurrency=1, batch_size=10, poll_interval=0.02)
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        time.sleep(4)  # four leases: long enough for a row left sending to go out again
    finally:
        worker.stop()
        thread.join(10)
    rows = OutboxEmail.objects.filter(pk__in=ids)
    assert Counter(rows.values_list("status", flat=True)) == {Status.SENT: 5}
    assert set(rows.values_list("attempts", flat=True)) == {1}
    assert Counter(m.message_id for m in smtp_sink.messages).most_common(1)[0][1] == 1
    assert len(smtp_sink.messages) == 5
    assert sorted(pk for pk, _ in raising["sent"]) == sorted(ids)
    assert not any(in_transaction for _, in_transaction in raising["sent"])
    assert worker.stats.snapshot() == (5, 0, 0)
    assert logged(caplog, "sent") == 5


def test_a_raising_queued_receiver_neither_reaches_nor_undoes_the_callers_write(
        sink_provider, raising, caplog):
    with transaction.atomic():
        receipt = kipekee.send(**MAIL, mode="queue")
        quote = Quote.objects.create(name="Amina", email="amina@example.com", trip="Trek")
    assert Quote.objects.filter(pk=quote.pk).exists()  # the caller's write committed
    assert OutboxEmail.objects.get(pk=receipt.id).status == Status.QUEUED
    assert raising["queued"] == [(receipt.id, False)]  # after the commit
    assert logged(caplog, "queued") == 1


def test_in_request_outcomes_are_recorded_whatever_the_receivers_raise(smtp_server,
                                                                        kipekee_settings,
                                                                        raising, caplog):
    server = smtp_server(faults=Faults(refuse_recipients={
        "later@example.com": "451 4.2.1 mailbox busy", "nobody@example.com": "550 5.1.1 no"}))
    kipekee_settings(primary=smtp_provider(server))
    sent = kipekee.send(**MAIL, mode="hybrid")
    failed = kipekee.send(**{**MAIL, "to": ["nobody@example.com"]}, mode="hybrid")
    deferred = kipekee.send(**{**MAIL, "to": ["later@example.com"]}, mode="hybrid")
    # Sent to one recipient, refused for now by another: a follow-up row for the latter.
    partly = kipekee.send(**{**MAIL, "to": ["ann@example.com", "later@example.com"]},
                          mode="hybrid")
    status = dict(OutboxEmail.objects.values_list("pk", "status"))
    assert (status[sent.id], status[failed.id], status[deferred.id], status[partly.id]) == (
        Status.SENT, Status.FAILED, Status.DEFERRED, Status.SENT)
    assert (sent.status, failed.status, deferred.status) == (
        Status.SENT, Status.FAILED, Status.DEFERRED)
    [follow_up] = OutboxEmail.objects.filter(metadata__recipients_of=partly.id)
    assert follow_up.status == Status.DEFERRED and follow_up.to == ["later@example.com"]
    assert Attempt.objects.count() == 4
    for name, pks in {"sent": [sent.id, partly.id], "failed": [failed.id],
                      "deferred": [deferred.id],
                      "queued": [sent.id, failed.id, deferred.id, partly.id, follow_up.pk]}.items():
        assert sorted(pk for pk, _ in raising[name]) == sorted(pks), name
        assert logged(caplog, name) == len(pks), name
    assert not any(inside for calls in raising.values() for _, inside in calls)


def test_cancel_resend_and_suppression_stand_whatever_the_receivers_raise(sink_provider,
                                                                          raising, caplog):
    waiting = kipekee.send(**MAIL, mode="queue")
    assert outbox.cancel(waiting.id) is True
    assert OutboxEmail.objects.get(pk=waiting.id).status == Status.CANCELLED
    copy = outbox.resend(waiting.id)
    assert OutboxEmail.objects.get(pk=copy.pk).status == Status.QUEUED
    suppression.add("gone@example.com")
    gone = kipekee.send(**{**MAIL, "to": ["gone@example.com"]})
    assert gone.suppressed and OutboxEmail.objects.get(pk=gone.id).status == Status.SUPPRESSED
    assert [pk for pk, _ in raising["cancelled"]] == [waiting.id]
    assert [pk for pk, _ in raising["suppressed"]] == [gone.id]
    assert [pk for pk, _ in raising["queued"]] == [waiting.id, copy.pk]
    assert (logged(caplog, "cancelled"), logged(caplog, "suppressed"),
            logged(caplog, "queued")) == (1, 1, 2)


def test_receivers_run_after_the_commit_and_not_for_a_rollback(sink_provider):
    seen: list[tuple[int, bool]] = []

    def on_queued(sender, email, **kwargs):
        seen.append((email.pk, OutboxEmail.objects.filter(pk=email.pk).exists()))

    signals.queued.connect(on_queued)
    try:
        with pytest.raises(RuntimeError), transaction.atomic():
            kipekee.send(**MAIL, mode="queue")
            raise RuntimeError("the business write failed")
        assert seen == []  # a row that never existed is not announced
        with transaction.atomic():
            receipt = kipekee.send(**MAIL, mode="queue")
            assert seen == []
        assert seen == [(receipt.id, True)]
    finally:
        signals.queued.disconnect(on_queued)


@pytest.fixture(autouse=True)
def _log_errors(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="kipekee.signals")


# --- a mail loop through the admins' error mails (issue 17, loose end e) --------------------


def test_a_raising_receiver_reported_by_mail_through_kipekee_makes_no_mail_loop(
        sink_provider, settings):
    """The project logs errors to the admins by mail (Django's AdminEmailHandler) and
    Django's mail goes through Kipekee's drop-in backend; a receiver of ``signals.sent``
    raises for every mail. Each error report is a mail, whose ``sent`` raises again, whose
    report is a mail… Before: a mail for every mail, without end. Now the admins get the
    report of the first error; an error about a mail that itself reports one is logged,
    not mailed again."""
    from django.utils.log import AdminEmailHandler

    from kipekee.engines import Sender, Stats

    settings.EMAIL_BACKEND = "kipekee.backend.EmailBackend"
    settings.KIPEKEE = {**settings.KIPEKEE, "MODE": "queue"}  # the reports: by the engine
    handler = AdminEmailHandler()  # as in Django's DEFAULT_LOGGING, at ERROR
    handler.setLevel(logging.ERROR)
    kipekee_logger = logging.getLogger("kipekee")
    kipekee_logger.addHandler(handler)

    def broken(sender, **kwargs):
        raise RuntimeError("the project's receiver is broken")

    signals.sent.connect(broken)
    try:
        kipekee.send(subject="Order 1", text="thanks", to="ann@example.com", mode="now")
        # Everything queued meanwhile goes out, each delivery firing the receiver again.
        for _ in range(10):  # engine rounds; each delivers what the last one queued
            if not OutboxEmail.objects.exclude(status=Status.SENT).exists():
                break
            sender = Sender(engine="test", batch_size=10, stats=Stats())
            try:
                sender.run_once()
            finally:
                sender.close()
    finally:
        signals.sent.disconnect(broken)
        kipekee_logger.removeHandler(handler)
    subjects = [m.subject for m in sink_provider.messages]
    # The order, and the reports of its receiver's error to the admins (Django's own
    # log of it, through DEFAULT_LOGGING's mail_admins, and Kipekee's): nothing more.
    assert subjects[0] == "Order 1" and len(subjects) == 3, subjects
    assert "Error calling" in subjects[1] and "A receiver of kipekee.signals.sent" in subjects[2]
    assert not OutboxEmail.objects.exclude(status=Status.SENT).exists()


def test_a_receiver_that_leaves_a_transaction_open_does_not_swallow_later_records(
        smtp_sink, kipekee_settings, caplog):
    """A ``sent`` receiver manages a transaction of its own on the recorder thread's
    connection (autocommit off, a write) and raises before it commits. Before: the next
    batch's record ran inside that transaction (Django's atomic then is a savepoint, not
    a commit): counted as sent, never committed, the row left ``sending`` with no attempt
    logged, and the connection held its write lock. The engine rolls such a connection
    back (the receiver's write with it) before it records again."""
    kipekee_settings(primary=smtp_provider(smtp_sink))

    def leave_a_transaction_open(sender, email, **kwargs):
        transaction.set_autocommit(False)
        Quote.objects.create(name="audit", email=email.to[0], trip=str(email.pk))
        raise Broken("the receiver broke before its commit")

    signals.sent.connect(leave_a_transaction_open, weak=False, dispatch_uid="test-open-tx")
    try:
        ids = [kipekee.send(**{**MAIL, "subject": f"Order {i}"}, mode="queue").id
               for i in range(3)]
        worker = Worker(concurrency=1, batch_size=1, poll_interval=0.02)
        thread = threading.Thread(target=worker.run, daemon=True)
        thread.start()
        try:
            deadline = time.monotonic() + 10
            while (OutboxEmail.objects.filter(pk__in=ids, status=Status.SENT).count() < 3
                   and time.monotonic() < deadline):
                time.sleep(0.05)
        finally:
            worker.stop()
            thread.join(30)
    finally:
        signals.sent.disconnect(dispatch_uid="test-open-tx")
    rows = OutboxEmail.objects.filter(pk__in=ids)
    assert Counter(rows.values_list("status", flat=True)) == {Status.SENT: 3}
    assert Attempt.objects.filter(email_id__in=ids).count() == 3
    assert worker.stats.snapshot() == (3, 0, 0)
    assert len(smtp_sink.messages) == 3
    assert not Quote.objects.exists()  # never committed: rolled back
    assert "left in a transaction" in caplog.text
