"""Engines: batch claims, the worker, the thread engine, retries with backoff, failover
with a circuit breaker, lifetimes — against real local SMTP servers."""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from datetime import timedelta
from pathlib import Path

import django
import pytest
from django.core.management import call_command
from django.db import transaction
from django.utils import timezone

import kipekee
from kipekee import outbox, signals
from kipekee.delivery import Deliverer
from kipekee.engines.thread import ThreadEngine
from kipekee.engines.worker import Worker
from kipekee.models import Attempt, EngineHeartbeat, ErrorKind, OutboxEmail, Status
from kipekee.testing import Faults

from .conftest import FAST_NOW_DELAYS, smtp_provider, subprocess_env

pytestmark = pytest.mark.django_db(transaction=True)

ROOT = Path(__file__).resolve().parent.parent
MAIL = {"subject": "Order", "text": "thanks", "to": ["ann@example.com"]}


def enqueue(n: int, **kwargs) -> list[int]:
    return [kipekee.send(**{**MAIL, "subject": f"Order {i}", **kwargs}, mode="queue").id for i in range(n)]


def wait_until(predicate, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


class running_worker:
    """A Worker in a background thread of the test process, stopped on exit."""

    def __init__(self, **kwargs) -> None:
        self.worker = Worker(poll_interval=0.02, **kwargs)
        self.thread = threading.Thread(target=self.worker.run, daemon=True)

    def __enter__(self) -> Worker:
        self.thread.start()
        return self.worker

    def __exit__(self, *exc) -> None:
        self.worker.stop()
        self.thread.join(10)
        assert not self.thread.is_alive()


# --- the engines under contract: the worker, and django.tasks run by db_worker ---------
# A test parametrized over ``engine_kind`` runs once with the worker engine and once with
# the "tasks" engine (kipekee.engines.tasks), whose tasks real ``db_worker`` processes of
# django-tasks-db run from the test database.

TASKS_QUEUE = "kipekee"


@pytest.fixture
def engine_kind() -> str:
    return "worker"


@pytest.fixture
def kipekee_settings(settings, engine_kind):
    """As conftest's, with ENGINE "tasks" (wakes enqueue tasks on commit) for that engine."""

    def configure(_extra=None, **providers) -> None:
        settings.KIPEKEE = {
            "PROVIDERS": providers, "NOW_RETRY_DELAYS": FAST_NOW_DELAYS, "NOW_TIME_BUDGET": 5,
            "ENGINE": None, **(_extra or {}),
            **({"ENGINE": "tasks", "TASKS": {"QUEUE": TASKS_QUEUE}}
               if engine_kind == "tasks" else {}),
        }

    return configure


class TaskWorkers:
    """``db_worker`` processes running the tasks engine's tasks from the test database."""

    def __init__(self, settings) -> None:
        self.settings = settings
        self.procs: list[subprocess.Popen] = []

    def start(self, n: int = 1, *, batch: bool = False) -> list[subprocess.Popen]:
        args = [sys.executable, "-m", "django", "db_worker", "--queue-name", TASKS_QUEUE,
                "--interval", "0.05", "--no-startup-delay", "--no-reload", "-v", "1"]
        started = []
        for _ in range(n):
            log = tempfile.TemporaryFile(mode="w+")
            proc = subprocess.Popen(args + (["--batch"] if batch else []), cwd=ROOT,
                                    env=subprocess_env(self.settings.KIPEKEE), stdout=log,
                                    stderr=subprocess.STDOUT, text=True)
            proc.log = log  # type: ignore[attr-defined]
            started.append(proc)
        self.procs += started
        return started

    def output(self) -> str:
        out = []
        for proc in self.procs:
            proc.log.seek(0)
            out.append(proc.log.read()[-3000:])
        return "\n---\n".join(out)

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs = []


def _log(proc: subprocess.Popen) -> str:
    proc.log.seek(0)
    return proc.log.read()


class Engine:
    """The engine under test: ``drain()`` delivers what is due and returns (the worker's
    ``--once``; for tasks, ``db_worker --batch`` processes, which run every task that is
    ready and exit); ``running()`` keeps the engine running for the ``with`` block."""

    def __init__(self, kind: str, settings) -> None:
        self.kind = kind
        self.tasks = TaskWorkers(settings)

    def drain(self, *, concurrency: int = 1, batch_size: int = 10) -> None:
        if self.kind == "worker":
            call_command("kipekee_worker", once=True, concurrency=concurrency,
                         batch_size=batch_size, poll_interval=0.05)
            return
        # (at most two: each is a Python process of its own that takes seconds to start)
        for proc in self.tasks.start(min(concurrency, 2), batch=True):
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                raise AssertionError(f"db_worker --batch did not finish\n{self.tasks.output()}")
            assert proc.returncode == 0, self.tasks.output()

    @contextlib.contextmanager
    def running(self, *, concurrency: int = 1):
        if self.kind == "worker":
            with running_worker(concurrency=concurrency) as worker:
                yield worker
            return
        procs = self.tasks.start(concurrency)
        # Python and Django take seconds to start on a loaded machine: the test's clock
        # starts when every db_worker is polling.
        deadline = time.monotonic() + 60
        while not all(_log(proc).count("Starting worker") for proc in procs):
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                raise AssertionError(f"db_worker did not start\n{self.tasks.output()}")
            time.sleep(0.05)
        try:
            yield None
        finally:
            self.tasks.stop()


@pytest.fixture
def engine(engine_kind, settings):
    engine = Engine(engine_kind, settings)
    yield engine
    engine.tasks.stop()


both_engines = pytest.mark.parametrize("engine_kind", ["worker", "tasks"])


# --- claiming -----------------------------------------------------------------------


def test_claim_batch_takes_due_rows_oldest_first_once(sink_provider):
    ids = enqueue(5)
    later = kipekee.send(**MAIL, send_at=timezone.now() + timedelta(hours=1)).id
    first = outbox.claim_batch(3, engine="a")
    second = outbox.claim_batch(10, engine="b")
    assert [r.pk for r in first] == ids[:3] and [r.pk for r in second] == ids[3:]
    assert all(r.status == Status.SENDING and r.attempts == 1 for r in first + second)
    assert first[0].claimed_by.startswith("a:") and second[0].claimed_by.startswith("b:")
    assert outbox.claim_batch(10) == []  # nothing else is due …
    assert OutboxEmail.objects.get(pk=later).status == Status.QUEUED  # … not the scheduled one


def test_expired_lease_is_reclaimed_by_a_batch(sink_provider):
    [pk] = enqueue(1)
    [stale] = outbox.claim_batch(1)
    OutboxEmail.objects.filter(pk=pk).update(lease_until=timezone.now() - timedelta(seconds=1))
    [fresh] = outbox.claim_batch(1)
    assert fresh.attempts == 2
    assert outbox.release(stale) is False  # fenced: the old claim cannot give it back
    assert outbox.release(fresh) is True
    row = OutboxEmail.objects.get(pk=pk)
    assert (row.status, row.attempts, row.claimed_by) == (Status.QUEUED, 1, "")


# --- the worker -----------------------------------------------------------------------


@both_engines
def test_worker_once_drains_the_queue_exactly_once(sink_provider, engine):
    enqueue(60)
    engine.drain(concurrency=3, batch_size=7)
    assert OutboxEmail.objects.filter(status=Status.SENT).count() == 60
    received = Counter(m.message_id for m in sink_provider.wait_for(60))
    assert len(received) == 60 and set(received.values()) == {1}
    if engine.kind == "worker":
        beat = EngineHeartbeat.objects.get()
        assert beat.kind == "worker" and beat.sent == 60 and beat.stopped_at is not None
    else:  # each db_worker process that ran a task beat, and its summary line at exit
        assert set(EngineHeartbeat.objects.values_list("kind", flat=True)) == {"tasks"}
        assert not EngineHeartbeat.objects.filter(stopped_at__isnull=True).exists()
        summaries = re.findall(r"tasks@\S+ stopped: sent=(\d+) deferred=0 failed=0 in [\d.]+ s "
                               r"\([\d.]+ sent/s\)", engine.tasks.output())
        assert sum(map(int, summaries)) == 60, engine.tasks.output()


@both_engines
def test_progress_lines_per_interval_and_a_summary_at_exit(sink_provider, caplog):
    """The worker's lines (the Celery and tasks engines log the same, per process)."""
    from kipekee.engines import Progress, Stats

    stats = Stats()
    progress = Progress("worker@test:1", stats, logging.getLogger("kipekee.test"), every=0)
    with caplog.at_level(logging.INFO, logger="kipekee.test"):
        progress.tick()  # idle: nothing to say
        for status in [Status.SENT] * 3 + [Status.DEFERRED, Status.FAILED]:
            stats.add(status)
        progress.tick()
        stats.add(Status.SENT)
        progress.tick()
        progress.summary()
    lines = [r.getMessage() for r in caplog.records if r.name == "kipekee.test"]
    assert len(lines) == 3, lines
    assert re.fullmatch(r"worker@test:1: 3 sent, 1 deferred, 1 failed in \d+ s \([\d.]+ sent/s\); "
                        r"total sent=3 deferred=1 failed=1", lines[0])
    assert lines[1].startswith("worker@test:1: 1 sent, 0 deferred, 0 failed in ")
    assert lines[1].endswith("total sent=4 deferred=1 failed=1")
    assert re.fullmatch(r"worker@test:1 stopped: sent=4 deferred=1 failed=1 in [\d.]+ s "
                        r"\([\d.]+ sent/s\)", lines[2])

    enqueue(7)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="kipekee.worker"):
        call_command("kipekee_worker", once=True, concurrency=2, poll_interval=0.05,
                     name="progress-test")
    assert any(re.fullmatch(r"progress-test stopped: sent=7 deferred=0 failed=0 in [\d.]+ s "
                            r"\([\d.]+ sent/s\)", r.getMessage()) for r in caplog.records)


def test_rolled_back_transactions_deliver_nothing(sink_provider, engine):
    rng = random.Random(7)
    committed: set[str] = set()
    # Each commit is a task for the tasks engine, each of which db_worker records: fewer.
    n = 1000 if engine.kind == "worker" else 150
    for i in range(n):
        try:
            with transaction.atomic():
                receipt = kipekee.send(**{**MAIL, "subject": f"Order {i}"}, mode="queue")
                if rng.random() < 0.3:
                    raise RuntimeError("business rule failed")
            committed.add(receipt.message_id)
        except RuntimeError:
            pass
    assert 0.6 * n < len(committed) < 0.8 * n
    engine.drain(concurrency=2, batch_size=50)
    received = Counter(m.message_id for m in sink_provider.wait_for(len(committed)))
    assert set(received) == committed and set(received.values()) == {1}
    assert OutboxEmail.objects.count() == len(committed)


@both_engines
def test_worker_wakes_for_new_rows_and_stops_cleanly(sink_provider, engine):
    with engine.running(concurrency=2) as worker:
        enqueue(3)
        wait_until(lambda: OutboxEmail.objects.sent().count() == 3,
                   what=f"3 sent\n{engine.tasks.output()}")
    if worker is not None:
        assert worker.stats.snapshot() == (3, 0, 0)
    assert not OutboxEmail.objects.filter(status=Status.SENDING).exists()


@both_engines
def test_451_k_times_then_delivered_with_growing_gaps(smtp_server, kipekee_settings, engine):
    server = smtp_server(faults=Faults(data_replies=["451 4.3.0 try later"] * 3))
    kipekee_settings(primary=smtp_provider(server),
                     _extra={"RETRY": {"BASE_DELAY": 0.1, "MAX_DELAY": 5, "JITTER": False}})
    gaps: list[float] = []

    def on_deferred(sender, email, outcome, **kwargs):
        gaps.append((email.due_at - outcome.finished_at).total_seconds())

    signals.deferred.connect(on_deferred)
    try:
        [pk] = enqueue(1)
        with engine.running():
            wait_until(lambda: OutboxEmail.objects.get(pk=pk).status == Status.SENT, what="sent")
    finally:
        signals.deferred.disconnect(on_deferred)
    attempts = list(Attempt.objects.filter(email_id=pk).order_by("number"))
    assert [a.outcome for a in attempts] == ["transient", "transient", "transient", "sent"]
    if engine.kind == "worker":
        assert [round(g, 2) for g in gaps] == [0.1, 0.2, 0.4]  # delivered on try k+1 = 4
    else:  # (the signals went off in the db_worker process): each retry waited its delay
        waited = [(after.started_at - before.finished_at).total_seconds()
                  for before, after in itertools.pairwise(attempts)]
        assert all(w >= d - 0.001 for w, d in zip(waited, [0.1, 0.2, 0.4])), waited
    assert len(server.messages) == 1


def test_smtp_retry_hint_wins_over_backoff(smtp_server, kipekee_settings):
    server = smtp_server(faults=Faults(data_replies=["451 4.7.1 Greylisted, try again in 7 minutes"]))
    kipekee_settings(primary=smtp_provider(server), _extra={"RETRY": {"JITTER": False}})
    receipt = kipekee.send(**MAIL, mode="hybrid")
    row = OutboxEmail.objects.get(pk=receipt.id)
    waited = (row.due_at - Attempt.objects.get(email_id=row.pk).finished_at).total_seconds()
    assert row.status == Status.DEFERRED and round(waited) == 420


@both_engines
def test_550_is_failed_after_one_try_by_the_worker(smtp_server, kipekee_settings, engine):
    server = smtp_server(faults=Faults(data_replies=["550 5.7.1 rejected"] * 5))
    kipekee_settings(primary=smtp_provider(server))
    [pk] = enqueue(1)
    engine.drain()
    row = OutboxEmail.objects.get(pk=pk)
    assert (row.status, row.attempts, row.error_kind) == (Status.FAILED, 1, ErrorKind.PERMANENT)


@both_engines
def test_message_past_its_lifetime_fails_with_no_more_attempts(smtp_server, kipekee_settings,
                                                               engine):
    server = smtp_server(faults=Faults(data_replies=["451 busy"] * 5))
    kipekee_settings(primary=smtp_provider(server), _extra={"RETRY": {"LIFETIME_SECONDS": 3600}})
    [pk] = enqueue(1)
    OutboxEmail.objects.filter(pk=pk).update(created_at=timezone.now() - timedelta(hours=2))
    engine.drain()
    row = OutboxEmail.objects.get(pk=pk)
    assert (row.status, row.attempts) == (Status.FAILED, 1) and "451 busy" in row.last_error
    assert outbox.claim_batch(10) == []


@both_engines
def test_one_unbuildable_message_among_1000_fails_alone(sink_provider, engine):
    # A task per mail for the tasks engine, each of which db_worker records: fewer.
    n = 1000 if engine.kind == "worker" else 100
    ids = enqueue(n)
    bad = ids[n * 417 // 1000]
    OutboxEmail.objects.filter(pk=bad).update(alternatives=[{"mimetype": "text/html"}])  # no content
    engine.drain(concurrency=2, batch_size=50)
    assert OutboxEmail.objects.sent().count() == n - 1
    row = OutboxEmail.objects.get(pk=bad)
    assert row.status == Status.FAILED and "cannot build message" in row.last_error
    assert len(sink_provider.wait_for(n - 1)) == n - 1


# --- failover and recovery ---------------------------------------------------------------


def test_primary_down_flows_through_backup_and_back_after_recovery(smtp_server, kipekee_settings):
    primary, backup = smtp_server(), smtp_server()
    kipekee_settings(primary=smtp_provider(primary, timeout=1), backup=smtp_provider(backup),
                     _extra={"CIRCUIT_BREAKER": {"FAILURES": 2, "COOLDOWN_SECONDS": 1}})
    primary.stop()  # keeps its port: it can come back on the same address
    ids = enqueue(6)
    with Deliverer() as deliverer:
        for pk in ids:
            row = outbox.claim(pk)
            outcome = deliverer.deliver(row)
            outbox.mark_sent(row, outcome)
    assert len(backup.wait_for(6)) == 6 and primary.messages == []
    errors = [Attempt.objects.get(email_id=pk).error for pk in ids]
    # Two connection failures open the circuit: the next messages skip the primary at once
    # (on a very slow machine the cool-down may pass and one more trial be refused).
    assert ["ConnectionRefusedError" in e for e in errors[:3]] == [True, True, False]
    assert "circuit open" in errors[2]

    primary.start()
    time.sleep(1.05)  # the cool-down: the next send is the half-open trial
    ids = enqueue(3)
    with Deliverer() as deliverer:
        for pk in ids:
            row = outbox.claim(pk)
            assert outbox.mark_sent(row, deliverer.deliver(row))
    assert len(primary.wait_for(3)) == 3 and len(backup.messages) == 6
    assert set(OutboxEmail.objects.filter(pk__in=ids).values_list("sent_by", flat=True)) == {"primary"}


def test_all_circuits_open_keeps_mail_deferred_with_a_hint(kipekee_settings, smtp_server):
    down = smtp_server()
    kipekee_settings(primary=smtp_provider(down, timeout=1),
                     _extra={"CIRCUIT_BREAKER": {"FAILURES": 1, "COOLDOWN_SECONDS": 60},
                             "RETRY": {"JITTER": False}})
    down.stop()
    kipekee.send(**MAIL)  # opens the circuit
    receipt = kipekee.send(**MAIL)
    assert receipt.status == Status.DEFERRED and "circuit open" in receipt.error
    row = OutboxEmail.objects.get(pk=receipt.id)
    # Waits for the trial, plus up to one cool-down so the waiting rows do not all come
    # back at the same moment; nothing was tried, so no attempt is counted.
    assert 50 < (row.due_at - timezone.now()).total_seconds() <= 120
    assert row.attempts == receipt.attempts == 0 and not Attempt.objects.filter(email=row).exists()


# --- the thread engine ----------------------------------------------------------------


def test_thread_engine_delivers_queued_and_due_rows(sink_provider, settings):
    settings.KIPEKEE = {**settings.KIPEKEE, "ENGINE": "thread"}
    engine = ThreadEngine()
    from kipekee.engines import thread as thread_module

    previous = thread_module._engine.current()
    thread_module._engine.set(engine)
    try:
        receipt = kipekee.send(**MAIL, mode="queue")  # on commit: wakes the engine
        wait_until(lambda: receipt.refresh().sent, what="queued row sent by the thread")
        soon = kipekee.send(**MAIL, send_at=timezone.now() + timedelta(seconds=0.3))
        assert soon.status == Status.QUEUED
        wait_until(lambda: soon.refresh().sent, what="scheduled row sent when due")
        assert engine.alive
    finally:
        engine.stop()
        thread_module._engine.set(previous)
    assert not engine.alive
    assert len(sink_provider.wait_for(2)) == 2


def _exit_with(code: int) -> None:
    time.sleep(os.getpid() % 3 * 0.3)  # the processes end at different times
    os._exit(code)


# The test process runs server threads; kipekee_worker forks before it starts any (the
# PostgreSQL tests run it as a real command). Python 3.12 warns about forking here.
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_prefork_once_counts_each_failed_process_once():
    """With ``once`` a process that failed is reported, once, and not started again; one
    that drained (exit 0) is not a failure."""
    from functools import partial

    from kipekee.engines.worker import Prefork

    assert Prefork(3, partial(_exit_with, 3), once=True).run() == 3
    assert Prefork(2, partial(_exit_with, 0), once=True).run() == 0


# --- an outage behind an open circuit (issue 17, item 1) ------------------------------------


def _attempts_per_row(ids: list[int]) -> dict[int, list[Attempt]]:
    per_row: dict[int, list[Attempt]] = {pk: [] for pk in ids}
    for attempt in Attempt.objects.filter(email_id__in=ids).order_by("email_id", "number"):
        per_row[attempt.email_id].append(attempt)
    return per_row


def test_a_half_open_circuit_with_its_trial_out_is_a_cool_down_from_the_next():
    """The breaker's answer to "when may a passed-over message come back?" while its one
    trial is in flight: not 0 s (it used to be: the row was back before the trial had
    even answered), but the next trial should this one fail."""
    from kipekee.circuit import CircuitBreaker

    now = [0.0]
    breaker = CircuitBreaker(failures=1, cooldown=30, clock=lambda: now[0])
    breaker.failure()
    now[0] = 10.0
    assert (breaker.allow(), breaker.retry_in()) == (False, 20.0)
    now[0] = 31.0
    assert breaker.allow() is True  # the trial
    assert (breaker.allow(), breaker.state, breaker.retry_in()) == (False, "half-open", 30.0)
    assert 30.0 <= breaker.postpone_for() <= 60.0  # spread over the cool-down after it
    breaker.success()
    assert (breaker.allow(), breaker.retry_in()) == (True, 0.0)


def test_a_10_s_outage_costs_each_mail_a_few_attempts_and_fails_none(smtp_server,
                                                                     kipekee_settings):
    """A provider answering 421 for 10 s, the breaker's cool-down 1 s: while the circuit
    is open (or half-open with its one trial out), rows are not sent and not charged an
    attempt; only the trials and the sends before the circuit opened count. Before the
    fix the half-open breaker answered "next trial in 0 s": rows came back at once and
    spent their 25 attempts in seconds."""
    server = smtp_server(faults=Faults(greeting="421 4.3.2 down for maintenance"))
    kipekee_settings(primary=smtp_provider(server),
                     _extra={"CIRCUIT_BREAKER": {"COOLDOWN_SECONDS": 1},
                             "RETRY": {"BASE_DELAY": 2, "MAX_DELAY": 8, "JITTER": False}})
    ids = enqueue(60)
    with running_worker(concurrency=2):
        time.sleep(10)
        server.faults.greeting = None  # the provider is back
        wait_until(lambda: OutboxEmail.objects.sent().count() == 60, timeout=40,
                   what="all 60 sent after the outage")
    assert not OutboxEmail.objects.filter(status=Status.FAILED).exists()
    per_row = _attempts_per_row(ids)
    worst = max(len(attempts) for attempts in per_row.values())
    assert worst <= 5, {pk: len(a) for pk, a in per_row.items() if len(a) > 5}
    # The attempt log agrees with the rows: no attempt counted that was not made.
    assert all(OutboxEmail.objects.get(pk=pk).attempts == len(a) for pk, a in per_row.items())
    assert Counter(m.message_id for m in server.messages).most_common(1)[0][1] == 1
    print(f"10 s outage: at most {worst} attempts per mail, "
          f"{sum(len(a) for a in per_row.values())} in all for 60 mails, none failed")


@both_engines
def test_a_long_outage_spends_attempts_no_faster_than_the_retry_policy(smtp_server,
                                                                       kipekee_settings,
                                                                       engine):
    """An outage of hours, compressed: a cool-down of 50 ms against a backoff of 0.4 s
    then 0.8 s (a 30 s cool-down against hours of backoff, in scale). Every attempt that
    reached the provider is followed by the policy's own wait before the next one: a
    breaker's next trial never shortens it. Before the fix the breaker's hint (≤ 50 ms)
    won over the backoff."""
    from kipekee.retry import RetryPolicy

    server = smtp_server(faults=Faults(greeting="421 4.3.2 down"))
    kipekee_settings(primary=smtp_provider(server),
                     _extra={"CIRCUIT_BREAKER": {"FAILURES": 2, "COOLDOWN_SECONDS": 0.05},
                             "RETRY": {"BASE_DELAY": 0.4, "MAX_DELAY": 0.8, "JITTER": False}})
    policy = RetryPolicy.from_settings()
    ids = enqueue(20)
    with engine.running(concurrency=2):
        # Not vacuous: the breaker's trials reach the provider again and again (waited
        # for, not slept: a loaded machine starts the tasks engine's db_workers slowly),
        # then a while longer, for the schedule to be kept over many attempts.
        wait_until(lambda: max(len(a) for a in _attempts_per_row(ids).values()) >= 3,
                   what="a third attempt of a mail")
        time.sleep(2)
    assert not OutboxEmail.objects.filter(status=Status.FAILED).exists()
    per_row = _attempts_per_row(ids)
    for pk, attempts in per_row.items():
        # So no more attempts than the policy's schedule allows in the time: each one
        # waited at least the policy's delay after the one before.
        for before, after in itertools.pairwise(attempts):
            waited = (after.started_at - before.finished_at).total_seconds()
            assert waited >= policy.delay(before.number) - 0.001, (pk, before.number, waited)
    assert not server.messages


def test_tasks_engine_takes_back_the_rows_of_a_killed_db_worker(smtp_server, settings):
    """A db_worker killed mid-batch leaves its task "running" for ever (django-tasks-db
    does not redeliver it): the watch task that the claim enqueued for the end of its
    lease takes the row back, in another db_worker, and sends it once."""
    server = smtp_server(faults=Faults(stall_greeting=60))
    settings.KIPEKEE = {"PROVIDERS": {"primary": smtp_provider(server, timeout=120)},
                        "ENGINE": "tasks", "TASKS": {"QUEUE": TASKS_QUEUE}, "LEASE_SECONDS": 2}
    engine = Engine("tasks", settings)
    try:
        [first] = engine.tasks.start()
        [pk] = enqueue(1)
        wait_until(lambda: OutboxEmail.objects.get(pk=pk).status == Status.SENDING,
                   what="the row claimed by the first db_worker")
        time.sleep(0.5)  # in the provider's greeting, which never comes
        first.kill()  # SIGKILL: its task stays "running", its lease is no longer renewed
        first.wait()
        server.faults.stall_greeting = 0
        engine.tasks.start()
        wait_until(lambda: OutboxEmail.objects.get(pk=pk).status == Status.SENT,
                   what=f"sent by the second\n{engine.tasks.output()}")
    finally:
        engine.tasks.stop()
    row = OutboxEmail.objects.get(pk=pk)
    assert row.attempts == 2 and len(server.wait_for(1)) == 1


def test_tasks_engine_scheduled_mail_waits_for_run_after_and_the_sweep_finds_orphans(
        sink_provider, settings):
    """A send_at mail's task carries run_after (nothing looks at it before); rows that
    never got a task (written while another engine was configured) are found by the
    sweep task."""
    from django_tasks_db.models import DBTaskResult

    from kipekee.engines.tasks import sweep

    orphans = enqueue(3)  # ENGINE None: no task for them
    settings.KIPEKEE = {**settings.KIPEKEE, "ENGINE": "tasks",
                        "TASKS": {"QUEUE": TASKS_QUEUE, "SWEEP_GRACE_SECONDS": 0}}
    tomorrow = timezone.now() + timedelta(days=1)
    later = kipekee.send(**MAIL, mode="queue", send_at=tomorrow)
    [task] = DBTaskResult.objects.all()
    assert task.run_after == tomorrow and task.args_kwargs["args"] == [[later.id], False]
    sweep.using(queue_name=TASKS_QUEUE).enqueue()
    engine = Engine("tasks", settings)
    try:
        engine.drain()  # runs what is ready: the sweep, then the orphans' task
        assert OutboxEmail.objects.filter(pk__in=orphans, status=Status.SENT).count() == 3
        assert later.refresh().status == Status.QUEUED
        with engine.running():
            soon = kipekee.send(**MAIL, mode="queue", send_at=timezone.now() + timedelta(seconds=1))
            wait_until(lambda: soon.refresh().sent, what="the scheduled mail sent")
    finally:
        engine.tasks.stop()
    assert later.refresh().status == Status.QUEUED


@pytest.mark.parametrize(("tasks_setting", "message"), [
    ("kipekee", r'KIPEKEE\["TASKS"\] takes'),
    ({"QUEUES": "kipekee"}, r'KIPEKEE\["TASKS"\] takes'),
    ({"QUEUE": ""}, r'KIPEKEE\["TASKS"\]\["QUEUE"\] must be a name'),
    ({"BACKEND": 3}, r'KIPEKEE\["TASKS"\]\["BACKEND"\] must be a name'),
    ({"SWEEP_GRACE_SECONDS": -1}, r"must be a number >= 0"),
])
def test_bad_tasks_settings_are_refused_with_what_is_wrong(tasks_setting, message):
    from kipekee import conf
    from kipekee.exceptions import ConfigurationError

    with pytest.raises(ConfigurationError, match=message):
        conf.parse({"ENGINE": "tasks", "TASKS": tasks_setting})
    parsed = conf.parse({"ENGINE": "tasks", "TASKS": {"QUEUE": "mail"}})
    assert (parsed.engine, parsed.tasks) == ("tasks", conf.TasksConfig(queue="mail"))


def test_system_check_names_a_task_backend_that_cannot_run_the_engine(settings):
    from kipekee.checks import check_settings

    def errors():
        return [m.msg for m in check_settings() if m.id == "kipekee.E014"]

    settings.KIPEKEE = {"PROVIDERS": {}, "ENGINE": "tasks", "TASKS": {"QUEUE": TASKS_QUEUE}}
    assert errors() == []  # tests.settings: django-tasks-db with the queue
    settings.KIPEKEE = {**settings.KIPEKEE, "TASKS": {"QUEUE": "mail"}}
    assert errors() == ["KIPEKEE[\"ENGINE\"] is \"tasks\" but the task backend 'default': its "
                        "QUEUES ['default', 'kipekee'] lack 'mail'."]
    immediate = ("django.tasks.backends.immediate.ImmediateBackend"
                 if django.VERSION >= (6, 0) else "django_tasks.backends.immediate.ImmediateBackend")
    settings.TASKS = {"default": {"BACKEND": immediate}}
    settings.KIPEKEE = {**settings.KIPEKEE, "TASKS": {}}
    assert errors() == ["KIPEKEE[\"ENGINE\"] is \"tasks\" but the task backend 'default': "
                        "ImmediateBackend cannot run a task later (run_after)."]
    settings.KIPEKEE = {**settings.KIPEKEE, "TASKS": {"BACKEND": "elsewhere"}}
    assert len(errors()) == 1 and "'elsewhere'" in errors()[0]
