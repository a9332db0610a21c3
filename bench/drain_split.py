"""Where a worker's drain at 0 ms spends its CPU, and how long its senders wait for rows.

    .venvs/bench/bin/python bench/drain_split.py [--messages 2000] [--connections 4] [--rounds 3]

One ``Worker`` (``--connections`` sender threads, batches of 10, ``once``) in this process
drains ``--messages`` rows of ``bench/compare.py``'s workload, written in one transaction,
to the sink of ``bench/sink.py`` answering at once, on PostgreSQL (the database of
``bench/compare.py``, or ``KIPEKEE_BENCH_PG_NAME``). Per message, without a profiler:

- the worker's CPU (``os.times``), split with ``time.thread_time`` around its parts:
  **build** (``_wire_bytes``), **SMTP** (the client's ``sendmail``), the rest of
  **delivery** (``Deliverer.deliver_many`` less those two: suppression, the message from
  the row, providers, pool), **claim** (``Feed._claim``, in whichever thread), **record**
  (``Feed._record``), the senders' **loop** (the rest of their threads' time), and the
  **rest** of the process;
- **PostgreSQL**: the CPU of the database's backends (``/proc``, sampled every 20 ms);
- **sink**: the CPU of the sink's process;
- statements, by kind;
- the senders' wall time in ``Feed.take``: waiting for a claim under way, for free slots,
  and claiming themselves.

The first round warms up (connections, caches) and is not shown. Timings only: the
figures move with the machine's load, which each line gives.
"""

from __future__ import annotations

import argparse
import collections
import functools
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

_TICK = os.sysconf("SC_CLK_TCK")


def process_cpu(pid: int) -> float | None:
    """User and system CPU seconds of process ``pid`` so far."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / _TICK


class Backends(threading.Thread):
    """The CPU of the PostgreSQL backends of this database (but its own) while it runs."""

    def __init__(self, dbname: str) -> None:
        import psycopg

        super().__init__(daemon=True)
        self._conn = psycopg.connect(host="127.0.0.1", user="postgres", dbname=dbname,
                                     autocommit=True)
        self._done = threading.Event()
        self._first: dict[int, float] = {}
        self._last: dict[int, float] = {}
        self._sample(at_start=True)
        self.start()

    def _sample(self, at_start: bool = False) -> None:
        pids = [pid for (pid,) in self._conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
            "AND pid <> pg_backend_pid()")]
        for pid in pids:
            cpu = process_cpu(pid)
            if cpu is not None:
                # A backend that started meanwhile counts from nothing.
                self._first.setdefault(pid, cpu if at_start else 0.0)
                self._last[pid] = cpu

    def run(self) -> None:
        while not self._done.wait(0.02):
            self._sample()

    def stop(self) -> float:
        self._done.set()
        self.join()
        self._sample()
        self._conn.close()
        return sum(self._last[pid] - self._first[pid] for pid in self._last)


class Meter:
    """Thread CPU time (and some wall time) of the worker's parts, and its statements."""

    def __init__(self) -> None:
        self.parts: collections.Counter[str] = collections.Counter()
        self.statements: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()
        self._inside = threading.local()

    def add(self, part: str, seconds: float) -> None:
        with self._lock:
            self.parts[part] += seconds

    def cpu(self, owner: Any, name: str, part: str) -> None:
        """Count ``owner.name``'s thread CPU time as ``part`` (outermost calls only)."""
        original = getattr(owner, name)

        @functools.wraps(original)
        def measured(*args: Any, **kwargs: Any) -> Any:
            if getattr(self._inside, part, False):
                return original(*args, **kwargs)
            setattr(self._inside, part, True)
            started = time.thread_time()
            try:
                return original(*args, **kwargs)
            finally:
                self.add(part, time.thread_time() - started)
                setattr(self._inside, part, False)

        setattr(owner, name, measured)

    def statement(self, execute: Any, sql: str, params: Any, many: bool, context: Any) -> Any:
        words = sql.split(None, 3)
        kind = words[0].upper()
        if kind in ("INSERT", "UPDATE") and len(words) > 2:
            kind += " " + words[2 if kind == "INSERT" else 1].strip('"')
        with self._lock:
            self.statements[kind] += 1
        return execute(sql, params, many, context)


def instrument(meter: Meter) -> None:
    from django.db.backends.signals import connection_created

    from kipekee import delivery
    from kipekee.backends import smtp, smtp_client
    from kipekee.engines import feed, worker

    meter.cpu(smtp, "_wire_bytes", "build")
    meter.cpu(smtp_client.SMTP, "sendmail", "SMTP")
    meter.cpu(delivery.Deliverer, "deliver_many", "deliver")
    meter.cpu(feed.Feed, "_claim", "claim")
    meter.cpu(feed.Feed, "_record", "record")
    send_loop = worker.Worker._send_loop

    def sender(self: Any, index: int) -> None:
        started = time.thread_time()
        try:
            send_loop(self, index)
        finally:
            meter.add("senders", time.thread_time() - started)

    worker.Worker._send_loop = sender  # type: ignore[method-assign]
    init = feed.Feed.__init__

    def feed_init(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        wait, claim = self._lock.wait, self._claim

        def waiting(timeout: float | None = None) -> bool:
            why = ("wait for a claim" if self._claiming
                   else "wait for slots" if self._free() <= 0 else "wait")
            started = time.perf_counter()
            try:
                return bool(wait(timeout))
            finally:
                meter.add(why, time.perf_counter() - started)

        def claiming(*args: Any) -> None:
            started, cpu = time.perf_counter(), time.thread_time()
            try:
                claim(*args)
            finally:
                if threading.current_thread().name.startswith("kipekee-sender"):
                    meter.add("claim of their own", time.perf_counter() - started)
                    meter.add("claim of own cpu", time.thread_time() - cpu)
                    meter.add("own claims", 1)
                else:
                    meter.add("claims ahead", 1)

        self._lock.wait, self._claim = waiting, claiming

    feed.Feed.__init__ = feed_init  # type: ignore[method-assign]

    def watch(sender: Any, connection: Any, **kwargs: Any) -> None:
        connection.execute_wrappers.append(meter.statement)

    connection_created.connect(watch, weak=False)


def drain(args: argparse.Namespace, sink: Any, meter: Meter, tag: str) -> str:
    from django.db import connection

    from bench.compare import empty_tables, enqueue_kipekee, workload
    from kipekee.engines.worker import Worker

    n = args.messages
    empty_tables()
    enqueue_kipekee(workload(tag, n))
    connection.close()
    meter.parts.clear()
    meter.statements.clear()
    backends = Backends(os.environ["KIPEKEE_BENCH_PG_NAME"])
    sink_before = process_cpu(sink._process.pid) or 0.0
    worker = Worker(concurrency=args.connections, batch_size=args.batch, once=True)
    started, times = time.perf_counter(), os.times()
    worker.run()
    seconds = time.perf_counter() - started
    after = os.times()
    postgres = backends.stop()
    time.sleep(0.3)
    sink_cpu = (process_cpu(sink._process.pid) or 0.0) - sink_before
    missing, duplicated, unexpected = sink.check([it.message_id for it in workload(tag, n)])
    p = meter.parts
    total = after.user + after.system - times.user - times.system
    split = {"build": p["build"], "SMTP": p["SMTP"],
             "delivery": p["deliver"] - p["build"] - p["SMTP"],
             "claim": p["claim"], "record": p["record"],
             "loop": p["senders"] - p["deliver"] - p["claim of own cpu"]}
    split["rest"] = total - sum(split.values())
    ms = {k: v * 1000 / n for k, v in split.items()}
    waits = ", ".join(f"{k} {p[k] / args.connections / seconds:.0%}" for k in
                      ("wait for a claim", "wait for slots", "claim of their own"))
    return (f"{n / seconds:,.0f} msg/s, load {os.getloadavg()[0]:.1f}; CPU ms/msg: worker "
            f"{total * 1000 / n:.3f} (" + ", ".join(f"{k} {v:.3f}" for k, v in ms.items())
            + f"), PostgreSQL {postgres * 1000 / n:.3f}, sink {sink_cpu * 1000 / n:.3f}; "
            f"statements/msg {sum(meter.statements.values()) / n:.2f} "
            f"({', '.join(f'{k} {v}' for k, v in sorted(meter.statements.items()))}); "
            f"claims {p['own claims'] + p['claims ahead']:.0f} ({p['own claims']:.0f} by "
            f"senders); senders' time: {waits}; missing {missing}, duplicated {duplicated}, "
            f"unexpected {unexpected}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--batch", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    from bench.compare import ensure_pg_database, setup_django
    from bench.sink import Sink

    sink = Sink()
    os.environ.update(KIPEKEE_BENCH_DB="postgres", KIPEKEE_BENCH_SINK_PORT=str(sink.port))
    try:
        ensure_pg_database()
        setup_django()
        meter = Meter()
        instrument(meter)
        drain(args, sink, meter, "warm")
        for round_ in range(1, args.rounds + 1):
            sink.reset()
            print(f"round {round_}: {drain(args, sink, meter, f'split{round_}')}", flush=True)
    finally:
        sink.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
