"""Engines finish whole batches: outcomes recorded in bulk, the next batch claimed and the
last one recorded while a batch is sent — against a real local SMTP server."""

from __future__ import annotations

import threading
import time
from collections import Counter
from datetime import timedelta

import pytest
from django.utils import timezone

import kipekee
from kipekee import outbox, signals
from kipekee.delivery import Deliverer
from kipekee.engines import Sender, Stats
from kipekee.models import Attempt, OutboxEmail, Status
from kipekee.recording import record_many
from kipekee.testing import Faults

pytestmark = pytest.mark.django_db(transaction=True)


def enqueue(n: int) -> list[int]:
    return [kipekee.send(subject=f"Order {i}", text="thanks", to=[f"guest{i}@example.com"],
                         mode="queue").id for i in range(n)]


def test_drain_records_each_row_once_with_its_own_sent_at(sink_provider):
    ids = enqueue(25)
    fired: list[int] = []

    def on_sent(sender, email, outcome, **kwargs):
        fired.append(email.pk)

    signals.sent.connect(on_sent)
    stats = Stats()
    sender = Sender(engine="t", batch_size=10, stats=stats)
    try:
        assert sender.drain(threading.Event()) == 25
    finally:
        sender.close()
        signals.sent.disconnect(on_sent)
    rows = {r.pk: r for r in OutboxEmail.objects.filter(pk__in=ids)}
    attempts = {a.email_id: a for a in Attempt.objects.filter(email_id__in=ids)}
    assert {r.status for r in rows.values()} == {Status.SENT} and len(attempts) == 25
    for pk, row in rows.items():
        # Each row's own time (the end of its SMTP transaction), as its attempt says.
        assert row.sent_at == attempts[pk].finished_at and attempts[pk].outcome == "sent"
        assert (row.sent_by, row.claimed_by, row.lease_until, row.attempts) == ("primary", "", None, 1)
    assert len({r.sent_at for r in rows.values()}) > 1
    assert sorted(fired) == sorted(ids) and stats.snapshot() == (25, 0, 0)
    received = Counter(m.message_id for m in sink_provider.wait_for(25))
    assert set(received.values()) == {1} and set(received) == {r.message_id for r in rows.values()}


def test_a_row_taken_over_mid_batch_keeps_the_new_attempt(sink_provider):
    ids = enqueue(3)
    rows = outbox.claim_batch(3, engine="slow")
    with Deliverer() as deliverer:
        outcomes = deliverer.deliver_many(rows)
    assert all(o.ok for o in outcomes)
    # The second row's lease ran out while the batch was sent; another engine took it.
    OutboxEmail.objects.filter(pk=ids[1]).update(lease_until=timezone.now() - timedelta(seconds=1))
    [taken] = outbox.claim_batch(1, engine="fast", ids=[ids[1]])
    assert record_many(rows, outcomes) == [True, False, True]
    after = {r.pk: r for r in OutboxEmail.objects.filter(pk__in=ids)}
    assert after[ids[0]].status == after[ids[2]].status == Status.SENT
    # Untouched: the newer attempt owns it and will record its own result.
    assert (after[ids[1]].status, after[ids[1]].attempts, after[ids[1]].claimed_by) == (
        Status.SENDING, 2, taken.claimed_by)
    assert sorted(Attempt.objects.values_list("email_id", flat=True)) == [ids[0], ids[2]]


def test_a_batch_with_a_refusal_records_each_row_as_it_is(smtp_server, kipekee_settings):
    from .conftest import smtp_provider

    server = smtp_server(faults=Faults(refuse_recipients={"guest1@example.com": "550 5.1.1 no"}))
    kipekee_settings(primary=smtp_provider(server))
    ids = enqueue(3)
    sender = Sender(engine="t", batch_size=3, stats=Stats())
    try:
        assert sender.run_once() == 3
    finally:
        sender.close()
    status = dict(OutboxEmail.objects.filter(pk__in=ids).values_list("pk", "status"))
    assert [status[pk] for pk in ids] == [Status.SENT, Status.FAILED, Status.SENT]
    assert Attempt.objects.count() == 3


def test_stopping_finishes_the_batches_in_hand_and_records_them(smtp_server, kipekee_settings):
    from .conftest import smtp_provider

    server = smtp_server(faults=Faults(stall_before_data_reply=0.02))
    kipekee_settings(primary=smtp_provider(server))
    ids = enqueue(40)
    stopping = threading.Event()
    sender = Sender(engine="t", batch_size=5, stats=Stats())
    result: list[int] = []

    def run() -> None:
        try:
            result.append(sender.drain(stopping))
        finally:
            sender.close()  # in the thread that used them: its database connections

    thread = threading.Thread(target=run)
    thread.start()
    try:
        server.wait_for(3, timeout=10)
    finally:
        stopping.set()
        thread.join(10)
    assert not thread.is_alive()
    status = Counter(OutboxEmail.objects.filter(pk__in=ids).values_list("status", flat=True))
    # Nothing claimed is left behind: what was sent is recorded, the rest was never taken.
    assert set(status) == {Status.SENT, Status.QUEUED}
    assert status[Status.SENT] == result[0] == len(server.messages) <= 10
    assert Attempt.objects.count() == result[0]


@pytest.fixture
def recording_refused():
    """A trigger in the database that refuses to mark any row ``sent``: the recorder thread's
    record fails for real, as on a database that refuses writes (disk full, read-only
    replica after a failover). Dropped afterwards (flushing tables keeps triggers)."""
    from django.db import connection

    if connection.vendor == "postgresql":
        create = [("CREATE FUNCTION kipekee_test_refuse() RETURNS trigger AS $$ BEGIN "
                   "RAISE EXCEPTION 'recording refused by the test'; END $$ LANGUAGE plpgsql"),
                  ("CREATE TRIGGER kipekee_test_no_sent BEFORE UPDATE ON kipekee_outboxemail "
                   "FOR EACH ROW WHEN (NEW.status = 'sent') "
                   "EXECUTE FUNCTION kipekee_test_refuse()")]
        drop = ["DROP TRIGGER kipekee_test_no_sent ON kipekee_outboxemail",
                "DROP FUNCTION kipekee_test_refuse()"]
    else:
        create = [("CREATE TRIGGER kipekee_test_no_sent BEFORE UPDATE OF status ON "
                   "kipekee_outboxemail WHEN NEW.status = 'sent' BEGIN "
                   "SELECT RAISE(ABORT, 'recording refused by the test'); END")]
        drop = ["DROP TRIGGER kipekee_test_no_sent"]
    with connection.cursor() as cursor:
        for sql in create:
            cursor.execute(sql)
    dropped = False

    def lift() -> None:
        nonlocal dropped
        with connection.cursor() as cursor:
            for sql in drop:
                cursor.execute(sql)
        dropped = True

    yield lift
    if not dropped:
        lift()


def test_a_failed_record_gives_back_the_batch_claimed_ahead(smtp_sink, kipekee_settings,
                                                            recording_refused):
    """The recorder thread fails to record batch 1 while batch 2 is being sent and batch 3
    has been claimed ahead. Before: drain raised and left batch 3 ``sending``, untried,
    until its lease ended. Now it goes back to the queue at once, its claim not counted;
    the sent batches stay leased (their record may yet come: they go out again only
    after the lease, with the same Message-IDs)."""
    from django.db import DatabaseError

    from .conftest import smtp_provider

    kipekee_settings(primary=smtp_provider(smtp_sink))
    ids = enqueue(20)
    sender = Sender(engine="t", batch_size=5, stats=Stats())
    try:
        with pytest.raises(DatabaseError, match="recording refused"):
            sender.drain(threading.Event())
    finally:
        sender.close()
    rows = OutboxEmail.objects.filter(pk__in=ids)
    sent_ids = {m.message_id for m in smtp_sink.wait_for(10)}
    assert len(smtp_sink.messages) == 10  # batches 1 and 2 were sent
    assert set(rows.filter(status=Status.SENDING).values_list("message_id", flat=True)) == sent_ids
    waiting = rows.filter(status=Status.QUEUED)
    assert waiting.count() == 10 and set(waiting.values_list("attempts", flat=True)) == {0}
    assert not waiting.filter(due_at__gt=timezone.now()).exists()  # due now, not leased
    # The database takes writes again; the sent ones come back when their lease ends.
    recording_refused()
    OutboxEmail.objects.filter(status=Status.SENDING).update(
        lease_until=timezone.now() - timedelta(seconds=1))
    sender = Sender(engine="t", batch_size=5, stats=Stats())
    try:
        assert sender.drain(threading.Event()) == 20
    finally:
        sender.close()
    assert Counter(rows.values_list("status", flat=True)) == {Status.SENT: 20}
    received = Counter(m.message_id for m in smtp_sink.wait_for(30))
    assert sorted(received.values()) == [1] * 10 + [2] * 10
