"""Claims: lanes in priority order with a share kept for bulk, per-lane rates, no lost
races, and one walk of a partial index per lane (read from the query plan)."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
from django.db import connection, connections
from django.test.utils import override_settings

import kipekee
from kipekee import conf, lanes, outbox
from kipekee.engines.worker import Worker
from kipekee.exceptions import ConfigurationError
from kipekee.models import Attempt, OutboxEmail, Status
from kipekee.testing import Faults

from .test_batches import recording_refused  # noqa: F401 - a fixture

pytestmark = pytest.mark.django_db(transaction=True)


def queue(n: int, lane: str, tag: str = "") -> list[int]:
    return [r.id for r in kipekee.send_many(
        [kipekee.Email(subject=f"{tag or lane} {i}", text="t", to=f"{lane}{i}@example.com")
         for i in range(n)], lane=lane)]


def lanes_of(rows: list[OutboxEmail]) -> list[str]:
    return [row.lane for row in rows]


def test_transactional_rows_are_claimed_before_older_bulk_rows(sink_provider):
    queue(30, "bulk")
    queue(5, "transactional")
    claimed = outbox.claim_batch(10)
    # The bulk lane's share of a claim of 10 (one row) first, then every transactional
    # row, then bulk rows fill the claim; handed out highest lane first.
    assert Counter(lanes_of(claimed)) == {"transactional": 5, "bulk": 5}
    assert lanes_of(claimed) == ["transactional"] * 5 + ["bulk"] * 5


def test_bulk_keeps_its_share_while_transactional_mail_never_runs_out(sink_provider):
    queue(200, "bulk")
    queue(200, "transactional")
    got: Counter[str] = Counter()
    for _ in range(10):
        got.update(lanes_of(outbox.claim_batch(10)))
    assert got == {"transactional": 90, "bulk": 10}


def test_a_share_smaller_than_one_row_a_claim_adds_up(sink_provider):
    queue(50, "bulk")
    queue(50, "transactional")
    got: Counter[str] = Counter()
    for _ in range(20):  # claims of 2: a tenth of 2 rows is owed each time
        got.update(lanes_of(outbox.claim_batch(2)))
    assert got == {"transactional": 36, "bulk": 4}


def test_an_idle_lane_is_owed_nothing_when_it_fills_again(sink_provider):
    queue(100, "transactional")
    for _ in range(5):  # bulk is empty: its share is not saved up
        outbox.claim_batch(10)
    queue(50, "bulk")
    assert Counter(lanes_of(outbox.claim_batch(10))) == {"transactional": 9, "bulk": 1}


def test_a_user_lane_with_a_higher_priority_goes_first(sink_provider, settings):
    settings.KIPEKEE = {**settings.KIPEKEE, "LANES": {"alerts": {"PRIORITY": 10}}}
    queue(5, "transactional")
    queue(5, "alerts")
    queue(5, "bulk")
    claimed = outbox.claim_batch(15)
    # The bulk lane's share of 15 (one row) first, then by priority.
    assert Counter(lanes_of(claimed)) == {"alerts": 5, "transactional": 5, "bulk": 5}
    assert lanes_of(claimed)[:5] == ["alerts"] * 5


def test_a_lanes_rate_limits_the_rows_claimed_from_it(sink_provider, settings):
    settings.KIPEKEE = {**settings.KIPEKEE,
                        "LANES": {"bulk": {"LIMITS": {"RATE": "4/1h"}}}}
    queue(20, "bulk")
    assert lanes_of(outbox.claim_batch(10)) == ["bulk"] * 4
    assert outbox.claim_batch(10) == []
    assert 3500 < lanes.planner().rate_wait() <= 3600
    queue(3, "transactional")  # other lanes are not held up
    assert lanes_of(outbox.claim_batch(10)) == ["transactional"] * 3


def test_rows_a_rate_let_through_but_not_claimed_are_given_back(sink_provider, settings):
    settings.KIPEKEE = {**settings.KIPEKEE, "LANES": {"bulk": {"LIMITS": {"RATE": "10/1h"}}}}
    queue(3, "bulk")
    assert len(outbox.claim_batch(10)) == 3  # 10 allowed, 3 there: 7 left in the window
    queue(10, "bulk", tag="later")
    assert len(outbox.claim_batch(10)) == 7


@pytest.mark.parametrize(("lanes_setting", "message"), [
    ([], "must be a dict"),
    ({"Bulk Mail": {}}, "lane name"),
    ({"x": {"PRIORITY": "high"}}, "PRIORITY'] must be an int"),
    ({"x": {"SHARE": 1.5}}, "0 <= SHARE < 1"),
    ({"x": {"SHARE": 0.95}}, "add up to 1 or more"),
    ({"x": {"LIMITS": {"RATE": "lots"}}}, "RATE must look like"),
    ({"x": {"WEIGHT": 3}}, "keys among"),
])
def test_bad_lanes_are_refused_with_what_is_wrong(lanes_setting: Any, message: str):
    with pytest.raises(ConfigurationError, match=message):
        conf.parse({"LANES": lanes_setting})


def test_a_built_in_lane_can_be_changed():
    parsed = conf.parse({"LANES": {"bulk": {"SHARE": 0.25, "PRIORITY": -5}}})
    assert parsed.lane("bulk") == conf.LaneConfig(name="bulk", priority=-5, share=0.25)
    assert [lane.name for lane in parsed.lanes] == ["transactional", "bulk"]


# --- no lost races ------------------------------------------------------------------------

def test_concurrent_claims_never_come_back_empty_while_rows_are_due(sink_provider):
    """Four senders claim at once, far fewer rows than are due: not one claim may come
    back empty (on SQLite they all picked the same oldest rows and all but one lost)."""
    queue(1000, "transactional")
    empty: list[int] = []
    got: list[int] = []
    barrier = threading.Barrier(4)

    def sender() -> None:
        try:
            barrier.wait()
            for _ in range(15):
                claimed = outbox.claim_batch(10, engine="race")
                got.extend(row.pk for row in claimed)
                if not claimed:
                    empty.append(1)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=sender) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not empty, f"{len(empty)} of 60 claims came back empty with rows due"
    assert len(got) == len(set(got)) == 600


# --- the plan: one partial index walk per lane ----------------------------------------------

def claim_statements(claim: Callable[[], Any]) -> list[tuple[str, Any]]:
    seen: list[tuple[str, Any]] = []

    def record(execute: Any, sql: str, params: Any, many: bool, context: Any) -> Any:
        seen.append((sql, params))
        return execute(sql, params, many, context)

    with connection.execute_wrapper(record):
        claim()
    return [(sql, params) for sql, params in seen if sql.startswith(("UPDATE", "SELECT"))]


def plan_of(sql: str, params: Any) -> str:
    with connection.cursor() as cursor:
        if connection.vendor == "sqlite":
            cursor.execute("EXPLAIN QUERY PLAN " + sql, params)
            return "\n".join(str(row[-1]) for row in cursor.fetchall())
        cursor.execute("EXPLAIN " + sql, params)
        return "\n".join(row[0] for row in cursor.fetchall())


def test_each_lane_is_claimed_by_walking_its_partial_index(sink_provider):
    """The plan of each lane's claim, as the database will run it (same SQL, same bound
    parameters): the partial index of due rows, in its order (no sort of the backlog)."""
    queue(3000, "bulk")
    queue(200, "transactional")
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE")
    updates = claim_statements(lambda: outbox.claim_batch(10))
    lane_claims = [(sql, p) for sql, p in updates if '"lane" = %s' in sql]
    assert len(lane_claims) == 2, updates  # the bulk lane's share, then transactional
    for sql, params in lane_claims:
        plan = plan_of(sql, params)
        assert "kipekee_waiting_lane_due" in plan, plan
        assert "TEMP B-TREE" not in plan and "Sort" not in plan, plan
        # (The claim's RETURNING asks the attachment table, empty here, whether each
        # claimed row has any: a scan of nothing is PostgreSQL's right plan for it.)
        assert ("SCAN kipekee_outboxemail" not in plan
                and "Seq Scan on kipekee_outboxemail" not in plan), plan


def test_a_claim_does_not_read_the_backlog(sink_provider):
    """Every statement of a claim (expired leases, each lane, the rows' attachments)
    reaches its rows through an index: nothing scans the 3,000 queued rows. (With a few dozen rows PostgreSQL may
    rightly prefer a scan; the plans are read at a size where that would cost.)"""
    queue(3000, "transactional")
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE")
    statements = claim_statements(lambda: outbox.claim_batch(10))
    assert len(statements) >= 2, statements
    for sql, params in statements:
        plan = plan_of(sql, params)
        assert "SCAN kipekee_outboxemail" not in plan, plan
        assert "Seq Scan on kipekee_outboxemail" not in plan, plan


@override_settings(KIPEKEE={"PROVIDERS": {}, "ENGINE": None})
def test_expired_leases_are_claimed_first():
    ids = queue(5, "transactional")
    OutboxEmail.objects.filter(pk__in=ids[:2]).update(
        status=Status.SENDING, lease_until=OutboxEmail.objects.get(pk=ids[0]).created_at)
    claimed = outbox.claim_batch(2)
    assert sorted(row.pk for row in claimed) == ids[:2]


@pytest.mark.postgres
@pytest.mark.parametrize("how", ["send", "send in a transaction", "send_many"])
def test_an_idle_worker_hears_of_new_mail_at_once(sink_provider, how: str):
    """Workers LISTEN on PostgreSQL: a committed enqueue wakes one that polls only every
    30 s (the NOTIFY rides on the INSERT of ``send``)."""
    from django.db import transaction

    from .test_engines import wait_until

    # Polls every 4 s: 5 s after the first (empty) poll, only a NOTIFY can have woken it.
    worker = Worker(concurrency=1, poll_interval=4.0)
    thread = threading.Thread(target=worker.run)
    thread.start()
    try:
        time.sleep(1.0)  # LISTENing, idle until the next poll
        started = time.monotonic()
        if how == "send_many":
            kipekee.send_many([kipekee.Email(subject="s", text="t", to="a@example.com")])
        elif how == "send":
            kipekee.send(subject="s", text="t", to="a@example.com", mode="queue")
        else:
            with transaction.atomic():
                kipekee.send(subject="s", text="t", to="a@example.com", mode="queue")
        wait_until(lambda: OutboxEmail.objects.filter(status=Status.SENT).exists(),
                   timeout=5, what="the worker to send it")
        assert time.monotonic() - started < 2.5
    finally:
        worker.stop()
        thread.join(10)
    assert not thread.is_alive()


# --- the worker's loop -----------------------------------------------------------------------

def test_once_returns_when_the_last_row_is_sent_not_a_poll_later(sink_provider):
    """Four senders, a poll of 30 s: the command ends once the queue is empty (the
    idle senders used to wait out their poll before anyone saw they were all done)."""
    from django.core.management import call_command

    queue(40, "transactional")
    started = time.monotonic()
    call_command("kipekee_worker", once=True, concurrency=4, batch_size=5, poll_interval=30)
    assert time.monotonic() - started < 15  # not 30 s
    assert OutboxEmail.objects.filter(status=Status.SENT).count() == 40


def test_an_idle_worker_sends_a_retry_when_it_falls_due_not_at_its_next_poll(
        smtp_server, kipekee_settings):
    """A row deferred for 1 s goes out after about 1 s, though the worker polls every
    30 s (it used to sleep the poll interval, unless a NOTIFY came)."""
    from datetime import timedelta

    from django.utils import timezone

    from .conftest import smtp_provider
    from .test_engines import wait_until

    kipekee_settings(primary=smtp_provider(smtp_server()))
    [pk] = queue(1, "transactional")
    OutboxEmail.objects.filter(pk=pk).update(
        status=Status.DEFERRED, due_at=timezone.now() + timedelta(seconds=1))
    worker = Worker(concurrency=2, poll_interval=30.0)
    thread = threading.Thread(target=worker.run)
    thread.start()
    try:
        wait_until(lambda: OutboxEmail.objects.filter(pk=pk, status=Status.SENT).exists(),
                   timeout=10, what="the retry to be sent")
    finally:
        worker.stop()
        thread.join(40)
    assert not thread.is_alive()


# The test process runs threads (the SMTP server's); the command forks on purpose.
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_once_in_forked_processes_leaves_nothing_due(sink_provider):
    """4 processes x 4 senders, --once, on SQLite: every row is sent, each once (one
    process used to end while rows were due: its senders had lost every race)."""
    from collections import Counter

    from django.core.management import call_command

    ids = queue(600, "transactional")
    connections.close_all()
    call_command("kipekee_worker", once=True, processes=4, concurrency=4, batch_size=10,
                 poll_interval=5)
    assert OutboxEmail.objects.filter(pk__in=ids, status=Status.SENT).count() == 600
    received = Counter(m.message_id for m in sink_provider.wait_for(600))
    assert len(received) == 600 and set(received.values()) == {1}


def test_the_last_rows_of_a_backlog_spread_over_every_sender(smtp_server, kipekee_settings):
    """12 rows, 4 senders, batches of 10: every sender sends some (each used to claim
    a whole batch, so one sender took 10 while three waited)."""
    from .conftest import smtp_provider

    server = smtp_server(faults=Faults(stall_before_data_reply=0.05))
    kipekee_settings(primary=smtp_provider(server))
    queue(12, "transactional")
    Worker(concurrency=4, batch_size=10, poll_interval=5, once=True).run()
    senders = Counter(m.peer for m in server.wait_for(12))
    assert len(senders) == 4 and max(senders.values()) <= 4, senders


def test_stopping_a_worker_gives_back_what_it_claimed_and_did_not_send(
        smtp_server, kipekee_settings):
    from .conftest import smtp_provider
    from .test_engines import wait_until

    server = smtp_server(faults=Faults(stall_before_data_reply=0.05))
    kipekee_settings(primary=smtp_provider(server))
    ids = queue(300, "transactional")
    worker = Worker(concurrency=2, batch_size=10, poll_interval=5)
    thread = threading.Thread(target=worker.run)
    thread.start()
    wait_until(lambda: len(server.messages) >= 10, what="some sent")
    worker.stop()
    thread.join(30)
    assert not thread.is_alive()
    rows = OutboxEmail.objects.filter(pk__in=ids)
    # Nothing is left leased: what was sent is recorded, the rest is queued again,
    # its claim not counted.
    assert not rows.filter(status=Status.SENDING).exists()
    sent = rows.filter(status=Status.SENT).count()
    assert sent == len(server.messages) and sent >= 10
    assert rows.filter(status=Status.QUEUED, attempts=0).count() == 300 - sent
    assert Attempt.objects.filter(email_id__in=ids).count() == sent


def test_outcomes_of_several_senders_are_recorded_together(sink_provider):
    """The feed's recorder records what every sender finished since the last record in one
    transaction, not one transaction a share.

    The first record waits until the server has every row the feed may hold (40: two
    shares for each of 4 senders, all in the first claim), so the test does not depend on
    how the senders' finishes fall in time on a busy machine: what they finished
    meanwhile goes in the next record. Of those 40, at most one share per sender (20) can
    still be between its last reply and ``done()``; the first record took at least one:
    the next holds at least two shares."""
    from kipekee.engines import feed

    queue(200, "transactional")
    worker = Worker(concurrency=4, batch_size=5, poll_interval=5, once=True)
    recorded: list[int] = []  # rows per recording transaction
    original = feed.record_batch

    def record_batch(rows: Any, *args: Any, **kwargs: Any) -> Any:
        if not recorded:
            sink_provider.wait_for(2 * 4 * 5, timeout=30)
        recorded.append(len(rows))
        return original(rows, *args, **kwargs)

    feed.record_batch = record_batch  # a spy on our own seam: the database is real
    try:
        worker.run()
    finally:
        feed.record_batch = original
    assert OutboxEmail.objects.filter(status=Status.SENT).count() == 200
    assert sum(recorded) == 200, recorded
    assert max(recorded) >= 2 * 5, recorded  # shares finished meanwhile, in one record


def test_while_records_fail_the_worker_stops_sending_and_gives_back_its_claims(
        smtp_sink, kipekee_settings, recording_refused):
    """The database refuses to record (a trigger): the senders stop after what they had
    in hand, what was claimed and not sent goes back to the queue at once, and once the
    database takes writes again everything goes out (the unrecorded ones a second time,
    after their lease, with the same Message-IDs)."""
    from datetime import timedelta

    from django.utils import timezone

    from .conftest import smtp_provider
    from .test_engines import wait_until

    kipekee_settings(primary=smtp_provider(smtp_sink))
    ids = queue(200, "transactional")
    worker = Worker(concurrency=2, batch_size=5, poll_interval=30)
    thread = threading.Thread(target=worker.run)
    thread.start()
    try:
        wait_until(lambda: len(smtp_sink.messages) >= 10, what="the first shares")
        time.sleep(1.0)  # records fail meanwhile
        sent_while_failing = len(smtp_sink.messages)
    finally:
        worker.stop()
        thread.join(30)
    assert not thread.is_alive()
    rows = OutboxEmail.objects.filter(pk__in=ids)
    assert sent_while_failing <= 40, sent_while_failing  # not the 200
    assert rows.filter(status=Status.SENDING).count() == len(smtp_sink.messages)
    assert rows.filter(status=Status.QUEUED, attempts=0).count() == 200 - len(smtp_sink.messages)
    recording_refused()  # the database takes writes again
    rows.filter(status=Status.SENDING).update(lease_until=timezone.now() - timedelta(seconds=1))
    Worker(concurrency=2, batch_size=5, poll_interval=5, once=True).run()
    assert rows.filter(status=Status.SENT).count() == 200


# --- a lane removed from the settings (issue 17, loose end f) ------------------------------


def test_rows_of_a_lane_removed_from_the_settings_are_still_delivered(sink_provider, settings):
    """A deploy removes the lane "alerts" (or a web process still on the old settings
    writes to it during a rolling deploy): its waiting rows were never claimed again.
    Now an engine takes them in the default lane (``transactional``), and a system check
    run with the database (``manage.py check --database default``) says so."""
    from django.core import checks

    settings.KIPEKEE = {**settings.KIPEKEE, "LANES": {"alerts": {"PRIORITY": 10}}}
    kipekee.send(subject="Disk full", text="!", to="ops@example.com", lane="alerts",
                 mode="queue")
    settings.KIPEKEE = {key: value for key, value in settings.KIPEKEE.items() if key != "LANES"}
    [warning] = [m for m in checks.run_checks(databases=["default"])
                 if m.id == "kipekee.W015"]
    assert "1 outbox row" in warning.msg and "'alerts'" in warning.msg, warning.msg
    assert not [m for m in checks.run_checks() if m.id == "kipekee.W015"]  # needs the database
    Worker(concurrency=1, batch_size=10, poll_interval=0.05, once=True, name="test").run()
    row = OutboxEmail.objects.get()
    assert (row.status, row.lane) == (Status.SENT, conf.TRANSACTIONAL)
    assert [m.subject for m in sink_provider.messages] == ["Disk full"]
    assert not [m for m in checks.run_checks(databases=["default"]) if m.id == "kipekee.W015"]


def test_every_claim_is_counted_even_one_that_is_not_an_attempt(sink_provider):
    """Issue 17's soak checks that no row spins (claimed over and over without an attempt
    being spent): ``claims`` counts each claim, by every path, and a claim given back
    (``release``) or passed over for open circuits (``postpone``) keeps its count while
    its attempt is taken back."""
    from datetime import timedelta

    from django.utils import timezone

    from kipekee.delivery import Outcome

    [pk] = queue(1, "transactional")
    [row] = outbox.claim_batch(1)
    assert (row.attempts, row.claims) == (1, 1)
    assert outbox.release(row)
    [row] = outbox.claim_batch(1, ids=[pk])
    assert (row.attempts, row.claims) == (1, 2)
    now = timezone.now()
    outcome = Outcome(ok=False, provider="", started_at=now, finished_at=now, kind="transient",
                      error="every circuit open", attempted=False)
    assert outbox.postpone(row, outcome, due_at=timezone.now() - timedelta(seconds=1))
    row = outbox.claim(pk)
    assert row is not None and (row.attempts, row.claims) == (1, 3)
    row.refresh_from_db()
    assert (row.attempts, row.claims) == (1, 3)
