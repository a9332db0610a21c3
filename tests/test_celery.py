"""Kipekee on Celery with the real Redis on 127.0.0.1:6379 (database 9, this run's keys
under its own prefix: tests/celery_app.py) and real
``celery worker`` processes (with embedded beat for the sweep). PostgreSQL pass."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import redis
from django.db import connection, transaction
from django.utils import timezone

import kipekee
from kipekee.models import EngineHeartbeat, OutboxEmail, Status

from .conftest import smtp_provider

pytestmark = [pytest.mark.postgres, pytest.mark.django_db(transaction=True)]

ROOT = Path(__file__).resolve().parent.parent
# KIPEKEE_TEST_BROKER: another Redis database, for runs side by side on one machine.
BROKER = os.environ.get("KIPEKEE_TEST_BROKER", "redis://127.0.0.1:6379/9")


@pytest.fixture
def broker():
    client = redis.Redis.from_url(BROKER)
    try:
        client.ping()
    except redis.ConnectionError as exc:
        pytest.fail(f"The Celery tests need Redis on 127.0.0.1:6379 (redis-server): {exc}")
    clear_broker(client)
    from tests.celery_app import app

    app.set_current()
    yield client
    clear_broker(client)


def clear_broker(client: redis.Redis) -> None:
    """Delete this run's keys (queues, bindings, unacked tasks): only those under its
    prefix, since other runs share the database."""
    from tests.celery_app import KEY_PREFIX

    keys = list(client.scan_iter(match=KEY_PREFIX + "*", count=1000))
    if keys:
        client.delete(*keys)


@pytest.fixture
def celery_settings(settings, smtp_sink, broker):
    queue = f"kipekee-test-{uuid.uuid4().hex[:8]}"
    settings.KIPEKEE = {"ENGINE": "celery", "PROVIDERS": {"primary": smtp_provider(smtp_sink)},
                        "CELERY": {"QUEUE": queue, "SWEEP_GRACE_SECONDS": 1},
                        # Longer than any batch takes, even on a loaded machine: a lease that
                        # expires under a live worker hands its rows out twice (by design).
                        "LEASE_SECONDS": 60}
    return settings.KIPEKEE


class Workers:
    def __init__(self, kipekee_settings: dict) -> None:
        self.settings = kipekee_settings
        self.procs: list[subprocess.Popen] = []

    def start(self, name: str, *, beat: bool = False) -> subprocess.Popen:
        env = {**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings",
               "KIPEKEE_TEST_DATABASE": "postgres", "KIPEKEE_PG_NAME": connection.settings_dict["NAME"],
               "KIPEKEE_TEST_SETTINGS": json.dumps(self.settings), "KIPEKEE_CELERY_BROKER": BROKER}
        args = [sys.executable, "-m", "celery", "-A", "tests.celery_app", "worker",
                "-Q", self.settings["CELERY"]["QUEUE"], "-n", f"{name}@%h", "--pool", "threads",
                "--concurrency", "4", "--without-heartbeat", "--without-mingle", "--without-gossip",
                "-l", "WARNING"]
        if beat:
            args += ["-B", "-s", os.path.join(tempfile.mkdtemp(), "beat-schedule")]
        log = tempfile.TemporaryFile(mode="w+")
        proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
        proc.log = log  # type: ignore[attr-defined]
        self.procs.append(proc)
        return proc

    def output(self) -> str:
        out = []
        for p in self.procs:
            p.log.seek(0)
            out.append(p.log.read()[-3000:])
        return "\n---\n".join(out)

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


@pytest.fixture
def workers(celery_settings):
    w = Workers(celery_settings)
    yield w
    w.stop()


def wait_until(predicate, timeout: float, what: str, workers: Workers) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}\n{workers.output()}")
        time.sleep(0.1)


def send_many(n: int, per_transaction: int = 100) -> set[str]:
    ids = set()
    for start in range(0, n, per_transaction):
        with transaction.atomic():
            for i in range(start, min(n, start + per_transaction)):
                ids.add(kipekee.send(subject=f"Order {i}", text="thanks", to=[f"c{i}@example.com"],
                                     mode="queue").message_id)
    return ids


def all_sent() -> bool:
    return not OutboxEmail.objects.exclude(status=Status.SENT).exists()


@pytest.fixture
def another_runs_queue() -> Iterator[redis.Redis]:
    """A queue of another test run (another checkout, another CI job) on the same Redis
    database, written before this test's broker is set up."""
    client = redis.Redis.from_url(BROKER)
    client.rpush("another-run:celery", b"its task")
    yield client
    client.delete("another-run:celery")


def test_a_run_clears_only_its_own_broker_keys(another_runs_queue, broker, celery_settings):
    """Before: the broker fixture flushed database 9, which every run shares: a run
    starting (or the flush-mid-run test) emptied the queues of a run in progress, whose
    tasks were lost and whose tests then timed out. Each run's keys now carry a prefix of
    its own, and only those are cleared."""
    from tests.celery_app import KEY_PREFIX

    kipekee.send(subject="Order", text="thanks", to=["ann@example.com"], mode="queue")
    ours = list(broker.scan_iter(match=KEY_PREFIX + "*"))
    assert ours, "the task sent on commit is under this run's prefix"
    clear_broker(broker)
    assert list(broker.scan_iter(match=KEY_PREFIX + "*")) == []
    assert another_runs_queue.lrange("another-run:celery", 0, -1) == [b"its task"]


def test_5000_messages_through_2_workers_exactly_once(smtp_sink, broker, workers):
    workers.start("w1")
    workers.start("w2")
    expected = send_many(5000)
    started = time.monotonic()
    wait_until(all_sent, 240, "5,000 sent", workers)
    elapsed = time.monotonic() - started
    received = Counter(m.message_id for m in smtp_sink.wait_for(5000))
    assert set(received) == expected and sum(c - 1 for c in received.values()) == 0
    print(f"celery: 5,000 delivered exactly once by 2 workers, {elapsed:.1f} s after the last commit")


def test_redis_flushed_mid_run_the_sweep_delivers_the_rest(smtp_sink, broker, workers):
    expected = send_many(1500)  # 30 tasks wait in Redis …
    workers.start("w1")
    wait_until(lambda: len(smtp_sink.messages) >= 100, 60, "first deliveries", workers)
    clear_broker(broker)  # … and the rest of them are gone
    lost_at = time.monotonic()
    assert OutboxEmail.objects.filter(status=Status.QUEUED).exists()
    workers.start("w2", beat=True)  # the sweep finds what Redis forgot
    wait_until(all_sent, 120, "all sent after the flush", workers)
    received = Counter(m.message_id for m in smtp_sink.messages)
    assert set(received) == expected and sum(c - 1 for c in received.values()) == 0
    print(f"celery: Redis flushed; sweep delivered the rest in {time.monotonic() - lost_at:.1f} s")


def test_worker_killed_its_messages_go_out_after_the_lease(smtp_server, broker, celery_settings,
                                                           workers, settings):
    from kipekee.testing import Faults

    slow = smtp_server(faults=Faults(stall_before_data_reply=0.02))
    # A short lease: the victim's rows come back quickly after the kill.
    settings.KIPEKEE = {**celery_settings, "PROVIDERS": {"primary": smtp_provider(slow)},
                        "LEASE_SECONDS": 5}
    workers.settings = settings.KIPEKEE
    victim = workers.start("victim")
    expected = send_many(600)
    wait_until(lambda: len(slow.messages) >= 50, 60, "victim delivering", workers)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    killed_at = time.monotonic()
    workers.start("survivor", beat=True)
    wait_until(all_sent, 120, "all sent after SIGKILL", workers)
    received = Counter(m.message_id for m in slow.messages)
    assert set(received) == expected
    duplicates = sum(c - 1 for c in received.values())
    assert duplicates <= 4 * 50  # at most what the victim's 4 threads held in flight
    assert not OutboxEmail.objects.filter(status=Status.SENDING).exists()
    print(f"celery: SIGKILL → all delivered {time.monotonic() - killed_at:.1f} s later, "
          f"{duplicates} duplicate(s)")


def test_marketplace_order_lifecycle_end_to_end(smtp_sink, broker, workers):
    workers.start("w1")
    order = {"number": "COVU-1042", "customer": "Amina"}
    events = ["created", "accepted", "delivered", "payment_received", "cancelled"]
    for event in events:
        with transaction.atomic():  # the order's status change and its email commit together
            kipekee.send(f"emails/orders/{event}", to="amina@example.com", context={"order": order},
                         idempotency_key=f"order-{order['number']}-{event}", mode="queue")
    # A retried request for the same transition sends nothing new.
    again = kipekee.send("emails/orders/created", to="amina@example.com", context={"order": order},
                         idempotency_key=f"order-{order['number']}-created", mode="queue")
    assert not again.created
    wait_until(all_sent, 60, "lifecycle mails", workers)
    subjects = sorted(m.subject for m in smtp_sink.wait_for(5))
    assert subjects == sorted(f"Order COVU-1042: {e}" for e in events)
    assert len(smtp_sink.messages) == 5


def test_a_scheduled_mail_goes_out_within_a_sweep_of_its_time(smtp_sink, broker, workers,
                                                              settings):
    """Before: a due scheduled row was taken for one whose task was still in a queue and
    passed over for SWEEP_GRACE_SECONDS (30 s by default): 30 s late. Its task at commit
    found it not due; nothing else is coming for it but the sweep (every second here)."""
    settings.KIPEKEE = {**settings.KIPEKEE,
                        "CELERY": {**settings.KIPEKEE["CELERY"], "SWEEP_GRACE_SECONDS": 30}}
    workers.settings = settings.KIPEKEE
    workers.start("w1", beat=True)
    time.sleep(2)  # the worker and beat are up
    send_at = timezone.now() + timedelta(seconds=2)
    receipt = kipekee.send(subject="Reminder", text="tomorrow", to=["sam@example.com"],
                           send_at=send_at, mode="queue")
    wait_until(lambda: receipt.refresh().sent, 20, "the scheduled mail sent", workers)
    late = (OutboxEmail.objects.get(pk=receipt.id).sent_at - send_at).total_seconds()
    assert 0 <= late < 10, late  # a sweep interval (1 s) plus a loaded machine's slack
    assert [m.subject for m in smtp_sink.wait_for(1)] == ["Reminder"]
    print(f"celery: scheduled mail sent {late:.1f} s after its time")


def test_each_worker_process_logs_progress_and_a_summary_at_exit(smtp_sink, broker, workers,
                                                                 monkeypatch):
    monkeypatch.setenv("KIPEKEE_LOG_LEVEL", "INFO")
    workers.start("w1")
    send_many(50)
    wait_until(all_sent, 120, "50 sent", workers)
    workers.stop()  # SIGTERM: a warm shutdown
    output = workers.output()
    summary = re.search(r"celery@\S+ stopped: sent=(\d+) deferred=0 failed=0 in [\d.]+ s "
                        r"\([\d.]+ sent/s\)", output)
    assert summary and int(summary.group(1)) == 50, output
    beat = EngineHeartbeat.objects.get(kind="celery")
    assert beat.sent == 50 and beat.stopped_at is not None
