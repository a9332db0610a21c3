"""Provider limits shared by real processes: several ``kipekee_worker`` processes and a
web process sending in the request, against one real SMTP server that records when each
message arrived and how many sessions were open at once. On SQLite (a file, WAL) in the
default pass, on PostgreSQL in the PostgreSQL pass; with the database store and with
Redis (database 11, a key prefix of its own).

The full-size figures (20 messages/s, 4 workers and 2 web processes for 30 s) are
measured by bench/scale.py; these runs last 5 s.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import django
import pytest
from django.utils import timezone

from kipekee.message import make_message_id
from kipekee.models import Attempt, EngineHeartbeat, OutboxEmail, Status

from .conftest import smtp_provider, subprocess_env

pytestmark = [
    pytest.mark.django_db(transaction=True),
    # Limits do not depend on Django's version: these half-minute runs of several
    # processes happen in the Django 5.2 passes (SQLite and PostgreSQL) only, to keep
    # `make test` short.
    pytest.mark.skipif(django.VERSION[:2] != (5, 2),
                       reason="multi-process limit runs: Django 5.2 passes only"),
]

ROOT = Path(__file__).resolve().parent.parent
REDIS = "redis://127.0.0.1:6379/11"


def bulk_enqueue(n: int) -> None:
    now = timezone.now()
    OutboxEmail.objects.bulk_create(
        [OutboxEmail(from_email="shop@example.com", to=[f"c{i}@example.com"],
                     subject=f"Order {i}", body="thanks", mode="queue",
                     message_id=make_message_id("shop@example.com"), created_at=now,
                     due_at=now) for i in range(n)], batch_size=500)


def start(args: list[str], kipekee: dict[str, Any]) -> subprocess.Popen:
    log = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=subprocess_env(kipekee),
                            stdout=log, stderr=subprocess.STDOUT, text=True)
    proc.log = log  # type: ignore[attr-defined]
    return proc


def output(proc: subprocess.Popen) -> str:
    proc.log.seek(0)  # type: ignore[attr-defined]
    return str(proc.log.read())  # type: ignore[attr-defined]


def busiest(times: list[float], span: float) -> int:
    """The most arrivals in any ``span`` seconds."""
    times = sorted(times)
    most, first = 0, 0
    for last, t in enumerate(times):
        while times[first] <= t - span:
            first += 1
        most = max(most, last - first + 1)
    return most


@pytest.mark.parametrize("store", ["database", "redis"])
def test_workers_and_a_web_process_share_rate_and_concurrency(smtp_server, kipekee_settings,
                                                              settings, store):
    rate, seconds, concurrency = 10, 5, 2
    arrivals: list[float] = []
    lock = threading.Lock()

    def arrived(message: Any) -> None:
        with lock:
            arrivals.append(time.monotonic())

    server = smtp_server(on_message=arrived)
    limiter = ({"STORE": "redis", "LOCATION": REDIS, "KEY_PREFIX": f"kt-{uuid.uuid4().hex[:8]}"}
               if store == "redis" else {"STORE": "database"})
    kipekee_settings(primary={**smtp_provider(server),
                              "LIMITS": {"RATE": f"{rate}/s", "CONCURRENCY": concurrency}},
                     _extra={"LIMITER": limiter, "NOW_TIME_BUDGET": 5})
    start_file = Path(tempfile.mkdtemp()) / "go"
    procs = [start(["-m", "django", "kipekee_worker", "--concurrency", "2", "--batch-size", "5",
                    "--poll-interval", "0.2"], settings.KIPEKEE) for _ in range(3)]
    procs.append(start(["-m", "tests.sender", "--seconds", str(seconds + 1), "--rate", "3",
                        "--tag", "web", "--start-file", str(start_file)], settings.KIPEKEE))
    try:
        # Every process booted before the clock starts (a loaded machine is slow at it).
        deadline = time.monotonic() + 120
        while (EngineHeartbeat.objects.count() < 3 or "ready" not in output(procs[-1])) \
                and time.monotonic() < deadline:
            time.sleep(0.1)
        bulk_enqueue(rate * seconds * 3)  # more than the limit lets through meanwhile
        start_file.touch()
        deadline = time.monotonic() + 60
        while not arrivals and time.monotonic() < deadline:
            time.sleep(0.05)
        assert arrivals, "\n".join(output(p)[-3000:] for p in procs)
        t0 = arrivals[0]
        time.sleep(max(0.0, t0 + seconds + 0.5 - time.monotonic()))
        with lock:
            window = [t for t in arrivals if t0 <= t < t0 + seconds]
            all_times = list(arrivals)
        procs[-1].wait(timeout=60)  # the web process ends by itself
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    outputs = "\n".join(output(p)[-3000:] for p in procs)
    Path(tempfile.gettempdir(), "kipekee-shared-limits.log").write_text(
        "\n=====\n".join(output(p) for p in procs)
        + "\narrivals: " + " ".join(f"{t - all_times[0]:.2f}" for t in all_times))
    # Three workers and a web process, each free to send far more, together send what
    # the provider allows: 10 a second, 2 connections at once. (Not much less either;
    # bench/scale.py measures how close it comes, here a loaded machine may slow it.)
    assert 0.6 * rate * seconds <= len(window) <= 1.05 * rate * seconds, (len(window), outputs)
    # Arrivals lag their slots by the scheduling of a busy machine; a 1-second window
    # at the server may catch one or two of the next second's.
    assert busiest(all_times, 1.0) <= rate * 1.2, (busiest(all_times, 1.0), outputs)
    assert server.peak_connections <= concurrency, server.peak_connections
    ids = Counter(m.message_id for m in server.messages)
    assert sum(c - 1 for c in ids.values()) == 0  # nothing sent twice
    # A limit reached never fails a mail, nor costs it an attempt.
    assert not OutboxEmail.objects.filter(status=Status.FAILED).exists()
    # (A deferral for a limit records no attempt; the in-request sends' own timeouts on
    # a loaded machine do, and say so.)
    assert not Attempt.objects.filter(error__contains="LIMITS[").exists()
    web = json.loads(output(procs[-1]).strip().splitlines()[-1])
    assert set(web) <= {"sent", "deferred"}, web
    assert "per process only" not in outputs  # the shared store was used throughout


def test_a_killed_worker_s_connection_permit_frees_with_its_lease(smtp_server, kipekee_settings,
                                                                   settings):
    from kipekee.models import ProviderPermit

    arrivals: list[float] = []
    server = smtp_server(on_message=lambda m: arrivals.append(time.monotonic()))
    kipekee_settings(primary={**smtp_provider(server), "LIMITS": {"CONCURRENCY": 1,
                                                                  "RATE": "5/s"}},
                     _extra={"LIMITER": {"PERMIT_LEASE_SECONDS": 3}})
    bulk_enqueue(200)
    args = ["-m", "django", "kipekee_worker", "--concurrency", "1", "--batch-size", "5",
            "--poll-interval", "0.2"]
    first = start(args, settings.KIPEKEE)
    try:
        deadline = time.monotonic() + 60
        while len(arrivals) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert arrivals, output(first)
        first.kill()  # SIGKILL: no chance to give its permit back
        first.wait()
        assert ProviderPermit.objects.count() == 1  # still held by the dead process
        killed_at = time.monotonic()
        second = start(args, settings.KIPEKEE)
        try:
            deadline = time.monotonic() + 60
            while (not arrivals or arrivals[-1] < killed_at) and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            second.send_signal(signal.SIGTERM)
            second.wait(timeout=30)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert arrivals[-1] > killed_at, output(second)
    # The dead worker's permit was taken over once its lease (3 s) had run out.
    assert server.peak_connections == 1
