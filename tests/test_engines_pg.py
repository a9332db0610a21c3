"""Engines on PostgreSQL with real worker processes: SKIP LOCKED claims, exactly-once
delivery across processes, kill -9 and SIGTERM. Run by the PostgreSQL pass of make test."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from datetime import timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from django.db import connection
from django.utils import timezone

from kipekee import outbox
from kipekee.message import make_message_id
from kipekee.models import EngineHeartbeat, OutboxEmail, Status

from .conftest import smtp_provider

pytestmark = [pytest.mark.postgres, pytest.mark.django_db(transaction=True)]

ROOT = Path(__file__).resolve().parent.parent


def bulk_enqueue(n: int) -> set[str]:
    """n queued rows written directly (fast), each with its own Message-ID."""
    now = timezone.now()
    rows = [OutboxEmail(from_email="shop@example.com", to=[f"c{i}@example.com"], subject=f"Order {i}",
                        body="thanks", message_id=make_message_id("shop@example.com"), mode="queue",
                        created_at=now, due_at=now) for i in range(n)]
    OutboxEmail.objects.bulk_create(rows, batch_size=2000)
    return {r.message_id for r in rows}


def worker_process(kipekee_settings: dict, *args: str, **popen: Any) -> subprocess.Popen:
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings",
           "KIPEKEE_TEST_DATABASE": "postgres", "KIPEKEE_PG_NAME": connection.settings_dict["NAME"],
           "KIPEKEE_TEST_SETTINGS": json.dumps(kipekee_settings), "KIPEKEE_LOG_LEVEL": "INFO"}
    # Output goes to a file: an undrained pipe would block the worker once it fills.
    log = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen([sys.executable, "-m", "django", "kipekee_worker", *args], cwd=ROOT,
                            env=env, stdout=log, stderr=subprocess.STDOUT, text=True, **popen)
    proc.log = log  # type: ignore[attr-defined]
    return proc


def output_of(proc: subprocess.Popen) -> str:
    proc.log.seek(0)
    return proc.log.read()


def wait_for_rows(predicate, timeout: float, what: str, procs=()) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            for p in procs:
                p.kill()
                p.wait()
            output = "\n".join(output_of(p)[-2000:] for p in procs)
            raise AssertionError(f"timed out waiting for {what}\n{output}")
        time.sleep(0.1)


def stop_all(procs) -> list[str]:
    outputs = []
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        p.wait(timeout=30)
        outputs.append(output_of(p))
    return outputs


def test_skip_locked_claims_pass_over_a_locked_row(sink_provider):
    bulk_enqueue(3)
    first = OutboxEmail.objects.order_by("pk").first()
    params = connection.get_connection_params()
    with psycopg.connect(host=params.get("host"), port=params.get("port"), user=params.get("user"),
                         dbname=params["dbname"]) as other:
        other.execute("SELECT id FROM kipekee_outboxemail WHERE id = %s FOR UPDATE", [first.pk])
        started = time.monotonic()
        claimed = outbox.claim_batch(10)
        assert time.monotonic() - started < 5  # did not wait for the lock
        assert first.pk not in {r.pk for r in claimed} and len(claimed) == 2
    assert [r.pk for r in outbox.claim_batch(10)] == [first.pk]  # free once the lock is gone


def test_four_worker_processes_deliver_10000_exactly_once(smtp_sink, kipekee_settings, settings):
    kipekee_settings(primary=smtp_provider(smtp_sink))
    expected = bulk_enqueue(10_000)
    procs = [worker_process(settings.KIPEKEE, "--concurrency", "2", "--batch-size", "20",
                            "--poll-interval", "0.2") for _ in range(4)]
    try:
        wait_for_rows(lambda: OutboxEmail.objects.filter(status=Status.SENT).count() == 10_000,
                      timeout=300, what="10,000 sent", procs=procs)
    finally:
        outputs = stop_all(procs)
    received = Counter(m.message_id for m in smtp_sink.wait_for(10_000))
    duplicates = sum(c - 1 for c in received.values())
    assert set(received) == expected and duplicates == 0, f"{duplicates} duplicates"
    beats = EngineHeartbeat.objects.filter(kind="worker")
    assert beats.count() == 4 and sum(b.sent for b in beats) == 10_000
    assert all(b.sent > 0 for b in beats), [b.sent for b in beats]  # all four took part
    assert all(p.returncode == 0 for p in procs), outputs


def test_kill_9_loses_nothing_and_duplicates_only_in_flight(smtp_sink, kipekee_settings, settings):
    # Short enough to recover quickly, long enough that a live worker's batch of 10 never
    # outlasts it (which would hand its rows out twice, by design).
    kipekee_settings(primary=smtp_provider(smtp_sink), _extra={"LEASE_SECONDS": 5})
    expected = bulk_enqueue(3000)
    concurrency, batch = 2, 10
    procs = [worker_process(settings.KIPEKEE, "--concurrency", str(concurrency), "--batch-size",
                            str(batch), "--poll-interval", "0.2") for _ in range(3)]
    try:
        wait_for_rows(lambda: len(smtp_sink.messages) >= 600, timeout=120, what="600 received", procs=procs)
        procs[0].kill()  # SIGKILL: no chance to release its leases
        procs[0].wait()
        killed_at = time.monotonic()
        wait_for_rows(lambda: not OutboxEmail.objects.exclude(status=Status.SENT).exists(),
                      timeout=300, what="all sent after the kill", procs=procs[1:])
        recovered_in = time.monotonic() - killed_at
    finally:
        stop_all(procs[1:])
    received = Counter(m.message_id for m in smtp_sink.messages)
    assert set(received) == expected  # every message delivered
    duplicates = {mid: c for mid, c in received.items() if c > 1}
    # Only what the killed worker held could go twice: per sender thread, the batch being
    # sent and the one before it, sent but still being recorded (Sender.drain).
    assert sum(c - 1 for c in duplicates.values()) <= concurrency * 2 * batch
    reclaimed = OutboxEmail.objects.filter(attempts__gt=1)
    assert set(duplicates) <= set(reclaimed.values_list("message_id", flat=True))
    assert not OutboxEmail.objects.filter(status=Status.SENDING).exists()
    print(f"kill -9: {len(duplicates)} duplicate(s), {reclaimed.count()} reclaimed, "
          f"all delivered {recovered_in:.1f} s after the kill")


def test_first_sigterm_finishes_and_releases(smtp_server, kipekee_settings, settings):
    from kipekee.testing import Faults

    slow = smtp_server(faults=Faults(stall_before_data_reply=0.05))
    kipekee_settings(primary=smtp_provider(slow))
    bulk_enqueue(400)
    proc = worker_process(settings.KIPEKEE, "--concurrency", "2", "--batch-size", "5",
                          "--poll-interval", "0.2")
    wait_for_rows(lambda: OutboxEmail.objects.filter(status=Status.SENT).count() >= 20,
                  timeout=60, what="first sends", procs=[proc])
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)
    output = output_of(proc)
    assert proc.returncode == 0, output
    assert "finishing the batches in hand" in output
    assert not OutboxEmail.objects.filter(status=Status.SENDING).exists()  # nothing left leased
    sent = OutboxEmail.objects.filter(status=Status.SENT).count()
    assert 20 <= sent < 400 and len(slow.messages) == sent
    assert EngineHeartbeat.objects.get().stopped_at is not None


def test_processes_share_the_work_replace_a_dead_one_and_stop_together(
        smtp_sink, kipekee_settings, settings):
    """``--processes 2``: two forked workers, each its own heartbeat; one killed with
    SIGKILL is replaced and what it held is sent after its lease; one SIGTERM to the
    command stops both. The exit status is 1: a process died on the way, and says so."""
    kipekee_settings(primary=smtp_provider(smtp_sink), _extra={"LEASE_SECONDS": 3})
    expected = bulk_enqueue(600)
    proc = worker_process(settings.KIPEKEE, "--processes", "2", "--concurrency", "2",
                          "--batch-size", "10", "--poll-interval", "0.2")
    try:
        wait_for_rows(lambda: EngineHeartbeat.objects.filter(sent__gt=0).count() == 2
                      or OutboxEmail.objects.filter(status=Status.SENT).count() == 600,
                      timeout=60, what="both processes sending", procs=[proc])
        wait_for_rows(lambda: OutboxEmail.objects.filter(status=Status.SENT).count() == 600,
                      timeout=60, what="600 sent", procs=[proc])
        first = set(EngineHeartbeat.objects.values_list("pid", flat=True))
        assert len(first) == 2 and proc.pid not in first
        os.kill(min(first), signal.SIGKILL)
        wait_for_rows(lambda: len(set(EngineHeartbeat.objects.values_list("pid", flat=True))
                                  - first) == 1, timeout=30, what="a replacement", procs=[proc])
        more = bulk_enqueue(200)
        wait_for_rows(lambda: OutboxEmail.objects.filter(status=Status.SENT).count() == 800,
                      timeout=60, what="800 sent", procs=[proc])
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    output = output_of(proc)
    received = Counter(m.message_id for m in smtp_sink.wait_for(800))
    assert set(received) == expected | more and set(received.values()) == {1}
    assert "exited with -9; starting another" in output
    assert proc.returncode == 1 and "1 worker process(es) exited with an error" in output
    stopped = EngineHeartbeat.objects.exclude(pid=min(first))
    assert stopped.count() == 2 and all(b.stopped_at is not None for b in stopped)


def test_processes_once_drain_and_exit(smtp_sink, kipekee_settings, settings):
    kipekee_settings(primary=smtp_provider(smtp_sink))
    expected = bulk_enqueue(300)
    proc = worker_process(settings.KIPEKEE, "--processes", "2", "--once", "--batch-size", "10")
    proc.wait(timeout=120)
    assert proc.returncode == 0, output_of(proc)
    received = Counter(m.message_id for m in smtp_sink.wait_for(300))
    assert set(received) == expected and set(received.values()) == {1}
    assert EngineHeartbeat.objects.count() == 2
    # Each process closed its warm connections politely before leaving (os._exit).
    assert smtp_sink.commands.get("QUIT", 0) == smtp_sink.connections


def test_processes_stop_gracefully_on_ctrl_c_to_the_process_group(
        smtp_server, kipekee_settings, settings):
    """A Ctrl-C reaches every process of the group: the supervisor forwards it once as
    SIGTERM and the workers ignore the SIGINT itself, so one Ctrl-C is a graceful stop
    (two SIGINTs per worker would be "exit at once")."""
    from kipekee.testing import Faults

    slow = smtp_server(faults=Faults(stall_before_data_reply=0.05))
    kipekee_settings(primary=smtp_provider(slow))
    bulk_enqueue(400)
    proc = worker_process(settings.KIPEKEE, "--processes", "2", "--concurrency", "2",
                          "--batch-size", "5", "--poll-interval", "0.2", start_new_session=True)
    wait_for_rows(lambda: OutboxEmail.objects.filter(status=Status.SENT).count() >= 20,
                  timeout=60, what="first sends", procs=[proc])
    os.killpg(proc.pid, signal.SIGINT)
    proc.wait(timeout=30)
    output = output_of(proc)
    assert proc.returncode == 0, output
    assert "SIGINT: the worker processes finish the batches in hand" in output
    assert output.count("SIGTERM: finishing the batches in hand") == 2
    # Each worker finished what it held: nothing is left mid-send.
    assert not OutboxEmail.objects.filter(status=Status.SENDING).exists()
    assert len(slow.messages) == OutboxEmail.objects.filter(status=Status.SENT).count() < 400


def test_a_worker_survives_its_database_connections_being_killed(smtp_sink, kipekee_settings,
                                                                   settings):
    """PostgreSQL restarts, failovers and idle-connection reapers end a worker's sessions
    under it (here: pg_terminate_backend on every session but the test's). The senders,
    the recorder threads and the heartbeat open new connections; nothing is lost and the
    process keeps running."""
    kipekee_settings(primary=smtp_provider(smtp_sink))
    first = bulk_enqueue(50)
    proc = worker_process(settings.KIPEKEE, "--concurrency", "2", "--batch-size", "5",
                          "--poll-interval", "0.2")
    try:
        wait_for_rows(lambda: OutboxEmail.objects.filter(status=Status.SENT).count() == 50,
                      timeout=60, what="50 sent", procs=[proc])
        with connection.cursor() as cursor:
            cursor.execute("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                           "WHERE datname = current_database() AND pid <> pg_backend_pid()")
            [(killed,)] = cursor.fetchall()
        assert killed >= 2  # at least the senders' sessions
        second = bulk_enqueue(50)
        wait_for_rows(lambda: OutboxEmail.objects.filter(status=Status.SENT).count() == 100,
                      timeout=60, what="100 sent after the sessions were killed", procs=[proc])
        time.sleep(6)  # a heartbeat after the kill (every 5 s)
        assert proc.poll() is None, output_of(proc)
    finally:
        outputs = stop_all([proc])
    received = Counter(m.message_id for m in smtp_sink.wait_for(100))
    assert set(received) == first | second and set(received.values()) == {1}
    assert proc.returncode == 0, outputs[0]
    assert EngineHeartbeat.objects.get().beat_at > timezone.now() - timedelta(seconds=15)


def test_a_delivery_longer_than_the_lease_keeps_its_row(smtp_server, kipekee_settings,
                                                       settings):
    """A server that takes 5 s to answer the message, a lease of 1.5 s, a second worker
    polling: before, the lease ran out mid-delivery, the second worker took the row and
    sent it again. Now the first renews the lease while it sends (every third of it)."""
    from kipekee.testing import Faults

    slow = smtp_server(faults=Faults(stall_before_data_reply=5))
    kipekee_settings(primary=smtp_provider(slow, timeout=15), _extra={"LEASE_SECONDS": 1.5})
    [message_id] = bulk_enqueue(1)
    first = worker_process(settings.KIPEKEE, "--concurrency", "1", "--poll-interval", "0.2")
    procs = [first]
    try:
        wait_for_rows(lambda: OutboxEmail.objects.filter(status=Status.SENDING).exists(),
                      timeout=30, what="the first worker sending", procs=procs)
        procs.append(worker_process(settings.KIPEKEE, "--concurrency", "1",
                                    "--poll-interval", "0.2"))
        wait_for_rows(lambda: OutboxEmail.objects.filter(status=Status.SENT).exists(),
                      timeout=30, what="sent", procs=procs)
        time.sleep(1)  # a copy the second worker took would be in the server by now
    finally:
        outputs = stop_all(procs)
    row = OutboxEmail.objects.get()
    assert row.attempts == 1, outputs
    assert [m.message_id for m in slow.messages] == [message_id], outputs


def _alive(pid: int) -> bool:
    """Whether process ``pid`` still runs (a zombie left for init to reap does not)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            return not any(line.startswith("State:") and "Z" in line.split()[1]
                           for line in status)
    except FileNotFoundError:
        return False


def test_worker_processes_stop_when_their_supervisor_is_killed(smtp_server, kipekee_settings,
                                                              settings):
    """``--processes 2`` and the command itself is killed with SIGKILL (an OOM kill, a
    container runtime's kill after its grace period). Before: the two worker processes
    went on sending, orphans no supervisor could stop. Now each notices (a pipe from the
    supervisor whose last write end closed) and stops as on a first SIGTERM: it finishes
    the batch in hand, gives back the rest and exits."""
    from kipekee.testing import Faults

    slow = smtp_server(faults=Faults(stall_before_data_reply=0.05))
    kipekee_settings(primary=smtp_provider(slow))
    bulk_enqueue(600)
    proc = worker_process(settings.KIPEKEE, "--processes", "2", "--concurrency", "1",
                          "--batch-size", "5", "--poll-interval", "0.2")
    try:
        wait_for_rows(lambda: EngineHeartbeat.objects.filter(sent__gt=0).count() == 2,
                      timeout=60, what="both processes sending", procs=[proc])
        children = set(EngineHeartbeat.objects.values_list("pid", flat=True))
        assert len(children) == 2 and proc.pid not in children
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 15
        while any(_alive(pid) for pid in children):
            assert time.monotonic() < deadline, f"orphans still running: {children}"
            time.sleep(0.1)
    finally:
        for pid in children if "children" in locals() else ():
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
    output = output_of(proc)
    assert output.count("SIGTERM: finishing the batches in hand") == 2, output
    assert not OutboxEmail.objects.filter(status=Status.SENDING).exists()
    sent = OutboxEmail.objects.filter(status=Status.SENT).count()
    time.sleep(0.5)
    assert len(slow.messages) == sent < 600  # nothing sent after they stopped, no copies
    assert all(b.stopped_at is not None for b in EngineHeartbeat.objects.all())
