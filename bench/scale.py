"""Scale-out on PostgreSQL: provider limits shared by worker and web processes, and
throughput of many workers on two "hosts".

    make .venvs/django52/.installed && createdb -h 127.0.0.1 -U postgres kipekee_scale
    .venvs/django52/bin/python bench/scale.py            # all three parts
    .venvs/django52/bin/python bench/scale.py --part rate --store redis

Parts:

- ``rate``: one SMTP provider limited to ``--rate`` messages/s and ``--concurrency``
  connections (``LIMITS``), ``--workers`` ``kipekee_worker`` processes with a backlog and
  ``--web`` web processes sending in the request (``tests/sender.py``: ``kipekee.send``
  in mode hybrid in a loop, as a view does), for ``--seconds``. The local SMTP server
  records when each message arrived and the most sessions open at once. Passes when it
  received 0.9× to 1.05× of rate × seconds in the ``--seconds`` after the first message,
  never more than ``--concurrency`` sessions at once, nothing twice, and no row failed.
  Run with ``--store database`` (the default) and ``--store redis``.
- ``scale``: the server answers every reply ``--latency`` seconds late (a provider 20 ms
  away), no limits; one worker delivers a backlog, then ``--many`` workers, half of them
  in a UTS namespace with another host name (``unshare --uts``: a second host as the
  heartbeats and the engines' names see it), deliver ``--many`` times that backlog.
  Throughput is measured between the 10th and the 90th percentile of arrivals (both
  runs alike, so the processes' start-up is left out). Passes when many/one ≥ 7 and
  nothing arrived twice.

Exits non-zero when a part does not pass. The database (``--db``) is emptied first.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def env(db: str, kipekee: dict[str, Any]) -> dict[str, str]:
    return {**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings",
            "KIPEKEE_TEST_DATABASE": "postgres", "KIPEKEE_PG_NAME": db,
            "KIPEKEE_TEST_SETTINGS": json.dumps(kipekee), "KIPEKEE_LOG_LEVEL": os.environ.get("KIPEKEE_LOG_LEVEL", "WARNING"),
            "PYTHONPATH": str(ROOT)}


class Procs:
    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def start(self, args: list[str], environ: dict[str, str], host: str | None = None
              ) -> subprocess.Popen:
        command = [sys.executable, *args]
        if host:
            command = ["unshare", "--uts", "sh", "-c",
                       f'hostname {host} && exec "$0" "$@"', *command]
        log = tempfile.TemporaryFile(mode="w+")
        proc = subprocess.Popen(command, cwd=ROOT, env=environ, stdout=log,
                                stderr=subprocess.STDOUT, text=True)
        proc.log = log  # type: ignore[attr-defined]
        self.procs.append(proc)
        return proc

    @staticmethod
    def output(proc: subprocess.Popen) -> str:
        proc.log.seek(0)  # type: ignore[attr-defined]
        return str(proc.log.read())  # type: ignore[attr-defined]

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


class Arrivals:
    """The server's hook: when each message arrived, and its Message-ID."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.ids: Counter[str] = Counter()
        self.lock = threading.Lock()

    def __call__(self, message: Any) -> None:
        now = time.monotonic()
        with self.lock:
            self.times.append(now)
            self.ids[message.message_id or ""] += 1

    def snapshot(self) -> tuple[list[float], Counter[str]]:
        with self.lock:
            return list(self.times), Counter(self.ids)


def _children_cpu() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def busiest(times: list[float], span: float) -> int:
    times = sorted(times)
    most, first = 0, 0
    for last, t in enumerate(times):
        while times[first] <= t - span:
            first += 1
        most = max(most, last - first + 1)
    return most


def setup_django(db: str) -> None:
    os.environ.update({"DJANGO_SETTINGS_MODULE": "tests.settings",
                       "KIPEKEE_TEST_DATABASE": "postgres", "KIPEKEE_PG_NAME": db})
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)


def empty_tables() -> None:
    from django.db import connection

    from kipekee import models

    tables = [m._meta.db_table for m in (
        models.Attempt, models.Attachment, models.ProviderMessage, models.OutboxEmail,
        models.EngineHeartbeat, models.LimiterHit, models.LimiterKey, models.ProviderPermit)]
    with connection.cursor() as cursor:
        cursor.execute(f"TRUNCATE {', '.join(tables)} CASCADE")


def enqueue(n: int, tag: str) -> None:
    from django.utils import timezone

    from kipekee.message import make_message_id
    from kipekee.models import OutboxEmail

    now = timezone.now()
    OutboxEmail.objects.bulk_create(
        [OutboxEmail(from_email="shop@example.com", to=[f"{tag}{i}@example.com"],
                     subject=f"Order {tag}{i}", body="Thanks for your order.", mode="queue",
                     message_id=make_message_id("shop@example.com"), created_at=now,
                     due_at=now) for i in range(n)], batch_size=2000)


def provider(server: Any, limits: dict[str, Any] | None = None) -> dict[str, Any]:
    entry: dict[str, Any] = {"BACKEND": "kipekee.backends.smtp.EmailBackend",
                             "OPTIONS": {"host": server.host, "port": server.port,
                                         "timeout": 10}}
    if limits:
        entry["LIMITS"] = limits
    return entry


def wait_until(predicate: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.05)


def part_rate(args: argparse.Namespace) -> bool:
    from kipekee.models import Attempt, EngineHeartbeat, OutboxEmail, Status
    from kipekee.testing import LocalSMTPServer

    empty_tables()
    arrivals = Arrivals()
    limiter: dict[str, Any] = {"STORE": args.store}
    if args.store == "redis":
        limiter.update(LOCATION=args.redis, KEY_PREFIX=f"kipekee-bench-{uuid.uuid4().hex[:8]}")
    with LocalSMTPServer(on_message=arrivals) as server:
        kipekee = {"ENGINE": None, "LIMITER": limiter,
                   "PROVIDERS": {"primary": provider(server, {
                       **({"RATE": f"{args.rate}/s"} if args.rate else {}),
                       **({"CONCURRENCY": args.concurrency} if args.concurrency else {})})}}
        environ = env(args.db, kipekee)
        procs = Procs()
        cpu_before = _children_cpu()
        start_file = Path(tempfile.mkdtemp()) / "go"
        web_seconds = args.seconds + 3
        try:
            workers = [procs.start(["-m", "django", "kipekee_worker", "--concurrency", "2",
                                    "--batch-size", "10", "--poll-interval", "0.5"], environ)
                       for _ in range(args.workers)]
            web = [procs.start(["-m", "tests.sender", "--seconds", str(web_seconds),
                                "--rate", str(args.web_rate), "--tag", f"web{i}-",
                                "--start-file", str(start_file)], environ)
                   for i in range(args.web)]
            # Everyone booted (on a loaded machine that takes a while) before the clock
            # starts: the workers beat, the web processes said "ready".
            wait_until(lambda: EngineHeartbeat.objects.count() >= args.workers
                       and all("ready" in Procs.output(p) for p in web), 180)
            enqueue(args.rate * args.seconds * 2, "backlog")  # more than the limit allows
            start_file.touch()
            wait_until(lambda: bool(arrivals.times), 60)
            if not arrivals.times:
                print("\n".join(Procs.output(p)[-3000:] for p in procs.procs))
                return False
            t0 = arrivals.times[0]
            time.sleep(max(0.0, t0 + args.seconds + 0.5 - time.monotonic()))
            times, ids = arrivals.snapshot()
            for p in web:
                p.wait(timeout=web_seconds + 60)
        finally:
            procs.stop()
        window = [t for t in times if t0 <= t < t0 + args.seconds]
        peak = server.peak_connections
        cpu = _children_cpu() - cpu_before
    expected = args.rate * args.seconds
    duplicates = sum(c - 1 for c in ids.values())
    failed = OutboxEmail.objects.filter(status=Status.FAILED).count()
    charged = Attempt.objects.filter(error__contains="LIMITS[").count()
    deferred = OutboxEmail.objects.filter(status=Status.DEFERRED, attempts=0).count()
    web_statuses: Counter[str] = Counter()
    for p in web:
        lines = Procs.output(p).strip().splitlines()
        try:
            web_statuses.update(json.loads(lines[-1]))
        except (IndexError, ValueError):
            print("web process output:", Procs.output(p)[-2000:])
    degraded = any("per process only" in Procs.output(p) for p in workers + web)
    ratio = len(window) / expected
    ok = (0.9 <= ratio <= 1.05 and peak <= args.concurrency and duplicates == 0
          and failed == 0 and charged == 0 and not degraded)
    print(f"\n## rate — store {args.store}: {args.workers} workers + {args.web} web processes, "
          f"provider limit {args.rate}/s and {args.concurrency} connections, {args.seconds} s")
    print("| | |\n|---|---|")
    print(f"| received in {args.seconds} s after the first | {len(window)} of {expected} "
          f"(**{ratio:.3f}×**; bar 0.9×–1.05×) |")
    print(f"| busiest 1 s | {busiest(times, 1.0)} (limit {args.rate}) |")
    print(f"| most sessions open at once at the server | **{peak}** (limit {args.concurrency}) |")
    print(f"| sent twice | {duplicates} |")
    print(f"| rows failed / attempts charged for a limit / rows waiting uncharged | {failed} / "
          f"{charged} / {deferred} |")
    print(f"| web sends (receipts) | {dict(web_statuses)} |")
    print(f"| store fell back to per-process limits | {'yes' if degraded else 'no'} |")
    print(f"| CPU of all processes per message received | {cpu / max(1, len(times)) * 1000:.0f} ms "
          f"({cpu:.1f} s for {len(times)}); machine load average {os.getloadavg()[0]:.1f} |")
    print(f"| result | {'PASS' if ok else 'FAIL'} |")
    if not ok:
        print("\n".join(Procs.output(p)[-1500:] for p in procs.procs))
    return ok


def run_workers(args: argparse.Namespace, count: int,
                rows: int) -> tuple[float, int, int, float]:
    """``count`` workers deliver ``rows``; (messages/s between the 10th and 90th
    percentile of arrivals, duplicates, hosts seen in the heartbeats, CPU seconds of
    the workers per message)."""
    from kipekee.models import EngineHeartbeat
    from kipekee.testing import Faults, LocalSMTPServer

    empty_tables()
    arrivals = Arrivals()
    with LocalSMTPServer(on_message=arrivals,
                         faults=Faults(reply_latency=args.latency)) as server:
        kipekee = {"ENGINE": None, "LIMITER": {"STORE": "database"},
                   "PROVIDERS": {"primary": provider(server)}}
        environ = env(args.db, kipekee)
        procs = Procs()
        cpu_before = _children_cpu()
        unshare = shutil.which("unshare") is not None and os.geteuid() == 0
        try:
            for i in range(count):
                host = "kipekee-bench-b" if unshare and count > 1 and i % 2 else None
                procs.start(["-m", "django", "kipekee_worker", "--concurrency",
                             str(args.threads), "--batch-size", "10",
                             "--poll-interval", "0.5"], environ, host=host)
            # The backlog arrives once every worker is up (its first heartbeat): eight
            # Pythons importing Django at once take seconds of both cores, and the rate
            # measured is delivery, not start-up (the CPU figure still counts both).
            wait_until(lambda: EngineHeartbeat.objects.count() >= count, 120)
            enqueue(rows, f"s{count}-")
            deadline = time.monotonic() + 600
            while len(arrivals.times) < rows and time.monotonic() < deadline:
                time.sleep(0.1)
            time.sleep(1.0)  # anything sent twice arrives now
            times, ids = arrivals.snapshot()
            hosts = len(set(EngineHeartbeat.objects.values_list("host", flat=True)))
        finally:
            procs.stop()
    cpu = (_children_cpu() - cpu_before) / max(1, len(times))
    times.sort()
    if len(times) < rows:
        print(f"only {len(times)} of {rows} arrived")
        print("\n".join(Procs.output(p)[-1500:] for p in procs.procs))
        return 0.0, 0, hosts, cpu
    low, high = times[int(rows * 0.1)], times[int(rows * 0.9)]
    rate = (int(rows * 0.9) - int(rows * 0.1)) / (high - low)
    return rate, sum(c - 1 for c in ids.values()), hosts, cpu


def part_scale(args: argparse.Namespace) -> bool:
    load = os.getloadavg()[0]
    one, dup_one, _, cpu_one = run_workers(args, 1, args.rows)
    many, dup_many, hosts, cpu_many = run_workers(args, args.many, args.rows * args.many)
    ratio = many / one if one else 0.0
    ok = ratio >= 7 and dup_one == 0 and dup_many == 0
    print(f"\n## scale — workers with {args.threads} sender threads each, provider "
          f"{args.latency * 1000:.0f} ms away (every reply), PostgreSQL")
    print("| workers | messages | messages/s (10th–90th percentile) | sent twice "
          "| worker CPU per message |")
    print("|---|---|---|---|---|")
    print(f"| 1 | {args.rows} | {one:.0f} | {dup_one} | {cpu_one * 1000:.1f} ms |")
    print(f"| {args.many}, on {hosts} host names | {args.rows * args.many} | {many:.0f} "
          f"| {dup_many} | {cpu_many * 1000:.1f} ms |")
    print(f"\nmachine load average before: {load:.1f}, after: {os.getloadavg()[0]:.1f} "
          f"({os.cpu_count()} cores)")
    print(f"\n{args.many} workers / 1 worker: **{ratio:.2f}×** (bar ≥ 7×): "
          f"{'PASS' if ok else 'FAIL'}")
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=["rate", "scale", "all"], default="all")
    parser.add_argument("--db", default=os.environ.get("KIPEKEE_BENCH_DB", "kipekee_scale"))
    parser.add_argument("--store", choices=["database", "redis", "process", "both"],
                        default="both")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/11")
    parser.add_argument("--rate", type=int, default=20)
    parser.add_argument("--concurrency", type=int, default=3)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--web", type=int, default=2)
    parser.add_argument("--web-rate", type=float, default=4.0,
                        help="sends a second each web process tries")
    parser.add_argument("--seconds", type=int, default=30)
    parser.add_argument("--latency", type=float, default=0.02)
    parser.add_argument("--many", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2, help="sender threads per worker")
    parser.add_argument("--rows", type=int, default=600, help="messages per worker (scale)")
    args = parser.parse_args()
    setup_django(args.db)
    ok = True
    if args.part in ("rate", "all"):
        for store in (["database", "redis"] if args.store == "both" else [args.store]):
            args.store = store
            ok = part_rate(args) and ok
    if args.part in ("scale", "all"):
        ok = part_scale(args) and ok
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
