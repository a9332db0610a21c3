"""Prometheus metrics with several processes (prometheus-client's multiprocess mode):
two real ``kipekee_worker`` processes count what they send into PROMETHEUS_MULTIPROC_DIR,
and one scrape of ``kipekee.metrics.view`` in a third process (the test's) answers the
sum, with the queue gauges read from the database."""

from __future__ import annotations

import signal
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import pytest
from django.test import Client
from django.utils import timezone

import kipekee
from kipekee.models import EngineHeartbeat, OutboxEmail, Status

from .conftest import smtp_provider, subprocess_env
from .test_operations import _sample

pytestmark = pytest.mark.django_db(transaction=True)

ROOT = Path(__file__).resolve().parent.parent


def test_two_worker_processes_one_scrape_sums_their_counters(settings, smtp_sink, tmp_path,
                                                             monkeypatch):
    settings.KIPEKEE = {"PROVIDERS": {"primary": smtp_provider(smtp_sink)}, "ENGINE": None,
                        "METRICS": True}
    env = {**subprocess_env(settings.KIPEKEE), "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    args = [sys.executable, "-m", "django", "kipekee_worker", "--concurrency", "1",
            "--batch-size", "5", "--poll-interval", "0.05"]
    logs = [tempfile.TemporaryFile(mode="w+") for _ in range(2)]
    procs = [subprocess.Popen(args + ["--name", f"metrics-{i}"], cwd=ROOT, env=env, stdout=log,
                              stderr=subprocess.STDOUT, text=True)
             for i, log in enumerate(logs)]
    try:
        deadline = time.monotonic() + 60
        while EngineHeartbeat.objects.filter(name__startswith="metrics-").count() < 2:
            assert time.monotonic() < deadline, "the workers did not start"
            time.sleep(0.1)
        for i in range(120):  # both workers are polling: each takes some
            kipekee.send(subject=f"Order {i}", text="thanks", to=["ann@example.com"],
                         mode="queue")
        while OutboxEmail.objects.exclude(status=Status.SENT).exists():
            assert time.monotonic() < deadline, "not all sent"
            time.sleep(0.1)
        kipekee.send(subject="Later", text="x", to=["bo@example.com"], mode="queue",
                     send_at=timezone.now() + timedelta(hours=1))
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc, log in zip(procs, logs):
            proc.wait(timeout=30)
            log.seek(0)
            assert proc.returncode == 0, log.read()[-3000:]
    per_process = dict(EngineHeartbeat.objects.filter(name__startswith="metrics-")
                       .values_list("name", "sent"))
    assert sum(per_process.values()) == 120 and all(per_process.values()), per_process

    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    text = Client().get("/metrics/").content.decode()
    # Each worker's sends, summed: not one process's share.
    assert _sample(text, "kipekee_emails_total", status="sent", provider="primary") == 120
    assert _sample(text, "kipekee_send_duration_seconds_count", provider="primary") == 120
    # Read from the database at the scrape: the scheduled one waits.
    assert _sample(text, "kipekee_queue_depth", status="queued") == 1
    assert len(list(tmp_path.glob("counter_*.db"))) == 2  # one file per writing process
