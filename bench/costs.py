"""What one message costs Kipekee: CPU per message of a drain split into build, SMTP and
database; a claim with a 100,000-row backlog; ``send_many`` against ``send`` calls.

    .venvs/bench/bin/python bench/costs.py [--db postgres|sqlite] [--messages 1000] [--json]

Run by ``bench/compare.py`` (``make bench``) in its own process, once per database; by
hand it prints the same figures. The parts:

``cpu``
    N messages of ``bench/compare.py``'s workload queued with ``send_many``, then sent
    by one sender (``Sender.run_once`` in a loop: claim 10, deliver, record, in this
    thread) to the sink of ``bench/sink.py`` answering at once. The thread's CPU time
    (``time.thread_time``, not wall time: the sink and the database run elsewhere) per
    message is measured without a profiler; a second, profiled run (cProfile with the
    same CPU clock) splits it by where each function lives: **build** (``from_row``,
    Django's ``EmailMessage.message()``, the email package's generator), **SMTP**
    (``smtplib``, sockets, Kipekee's SMTP backend), **database** (outbox, dispatch,
    suppression, Django's ORM and the driver), the rest **other**. The split is the
    profiled run's fractions applied to the unprofiled total.
``claim``
    100,000 rows queued (copied in SQL from one ``send``, due 1 ms apart), then
    ``outbox.claim_batch(10)`` 200 times: median and p95 wall time of a claim (the rows,
    with their attachments, in hand). Its bar is on SQLite.
``send_many``
    1,000 messages through ``kipekee.send_many`` against 1,000 ``kipekee.send`` calls,
    each call in autocommit as a view makes it, and the same calls inside one
    transaction; wall and CPU time (median of 3).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

#: Where a function's file lives → the part of the work it belongs to (first match wins).
PARTS = (
    ("build", ("kipekee/message.py", "django/core/mail/message.py", "/email/",
               "django/utils/encoding.py", "django/core/mail/utils.py", "css_inline",
               "inscriptis")),
    ("SMTP", ("smtplib.py", "socket.py", "ssl.py", "kipekee/backends/", "selectors.py",
              "django/core/mail/backends/")),
    ("database", ("kipekee/outbox.py", "kipekee/dispatch.py", "kipekee/suppression.py",
                  "kipekee/lanes.py", "django/db/", "psycopg", "sqlite3", "json/",
                  "kipekee/signals.py", "django/dispatch/", "kipekee/logs.py")),
)


def setup(db: str) -> None:
    os.environ["DJANGO_SETTINGS_MODULE"] = "bench.compare_settings"
    os.environ["KIPEKEE_BENCH_DB"] = db
    if db == "postgres":
        from bench.compare import ensure_pg_database

        ensure_pg_database()
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)


def empty() -> None:
    from bench.compare import empty_tables

    empty_tables()


def queue(tag: str, n: int) -> None:
    import kipekee
    from bench.compare import FROM, workload

    for start in range(0, n, 1000):
        kipekee.send_many([
            kipekee.Email(subject=it.subject, text=it.text, html=it.html, to=it.to,
                          from_email=FROM, headers={"Message-ID": it.message_id})
            for it in workload(tag, n)[start:start + 1000]], lane="transactional")


def drain_once(sender: Any) -> int:
    sent = 0
    while handled := sender.run_once():
        sent += handled
    return sent


def part_of(filename: str) -> str:
    for part, needles in PARTS:
        if any(needle in filename for needle in needles):
            return part
    return "other"


#: Helpers whose time is their callers': the standard library's plumbing.
HELPERS = ("~", "/re/", "typing.py", "functools.py", "enum.py", "contextlib.py",
           "threading.py", "copy.py", "/abc.py", "/collections/", "weakref", "/random.py",
           "/uuid.py", "/datetime.py", "/_strptime.py", "/locale.py", "/string.py",
           "/base64.py", "/quopri.py", "/textwrap.py", "asgiref/", "django/utils/functional.py")


def split(stats: pstats.Stats) -> dict[str, float]:
    """Exclusive CPU time per part. A helper (a built-in such as ``str.join`` or a
    socket's ``sendall``, the ``re`` module, ``typing``'s checks …) counts for the parts
    of the functions that called it, in proportion to their calls, up the call chain."""
    table = stats.stats  # type: ignore[attr-defined]
    shares: dict[Any, dict[str, float]] = {}

    def share(func: Any, depth: int = 0) -> dict[str, float]:
        if func in shares:
            return shares[func]
        filename = func[0]
        callers = table[func][4] if func in table else {}
        if depth > 30 or not callers or not any(h in filename for h in HELPERS):
            result = {part_of(filename): 1.0}
        else:
            shares[func] = {"other": 1.0}  # a cycle among helpers: "other"
            total = sum(c[1] for c in callers.values()) or 1
            result = {}
            for caller, counts in callers.items():
                for part, fraction in share(caller, depth + 1).items():
                    result[part] = result.get(part, 0.0) + fraction * counts[1] / total
        shares[func] = result
        return result

    by_part = {part: 0.0 for part, _ in PARTS} | {"other": 0.0}
    for func, (_, _, tottime, _, _) in table.items():
        for part, fraction in share(func).items():
            by_part[part] += tottime * fraction
    return by_part


def top_other(stats: pstats.Stats, n: int = 15) -> list[tuple[float, str]]:
    """The functions whose time counts as "other" (to keep PARTS honest)."""
    table = stats.stats  # type: ignore[attr-defined]
    found = [(tottime, f"{filename}:{line}({name})")
             for (filename, line, name), (_, _, tottime, _, _) in table.items()
             if part_of(filename) == "other" and not any(h in filename for h in HELPERS)]
    return sorted(found, reverse=True)[:n]


def cpu(n: int) -> dict[str, float]:
    from kipekee.engines import Sender, Stats

    sender = Sender(engine="bench", batch_size=10, stats=Stats())
    try:
        empty()
        queue("cpu-warm", 50)
        drain_once(sender)  # connections open, caches warm
        empty()
        queue("cpu", n)
        started = time.thread_time()
        sent = drain_once(sender)
        total = (time.thread_time() - started) / sent
        empty()
        queue("cpu-prof", n)
        profile = cProfile.Profile(time.thread_time)
        profile.enable()
        drain_once(sender)
        profile.disable()
    finally:
        sender.close()
    if os.environ.get("KIPEKEE_COSTS_OTHER"):
        for seconds, where in top_other(pstats.Stats(profile)):
            print(f"  other: {seconds * 1000 / n:.3f} ms/msg  {where}", file=sys.stderr)
    by_part = split(pstats.Stats(profile))
    profiled = sum(by_part.values())
    return {"cpu_ms": total * 1000, **{f"{part}_ms": total * 1000 * seconds / profiled
                                        for part, seconds in by_part.items()}}


def fill(rows: int) -> None:
    """``rows`` queued rows: one through ``kipekee.send``, copied in SQL, due 1 ms apart
    (older first), each with its own Message-ID."""
    from django.db import connection

    from bench.compare import fill_backlog
    from kipekee.models import OutboxEmail

    if connection.vendor == "postgresql":
        fill_backlog(rows)
        return
    empty()
    queue("backlog", 1)
    template = OutboxEmail.objects.get()
    columns = [f.column for f in OutboxEmail._meta.concrete_fields
               if f.column not in ("id", "message_id", "due_at")]
    cols = ", ".join(f'"{c}"' for c in columns)
    with connection.cursor() as cursor:
        cursor.execute(
            f"WITH RECURSIVE g(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM g WHERE n < %s) "
            f"INSERT INTO {OutboxEmail._meta.db_table} ({cols}, message_id, due_at) "
            f"SELECT {cols}, '<backlog.' || n || '@bench.example>', "
            "strftime('%%Y-%%m-%%d %%H:%%M:%%f', due_at, '-' || ((%s - n) / 1000.0) || ' seconds') "
            f"FROM {OutboxEmail._meta.db_table}, g WHERE id = %s",
            [rows - 1, rows, template.pk])
        cursor.execute("ANALYZE")


def claim(rows: int, claims: int) -> dict[str, float]:
    from kipekee import outbox

    fill(rows)
    times = []
    for _ in range(claims):
        started = time.perf_counter()
        got = outbox.claim_batch(10, engine="bench")
        times.append(time.perf_counter() - started)
        assert len(got) == 10, f"claimed {len(got)} with {rows} rows queued"
    times.sort()
    return {"claim_p50_ms": statistics.median(times) * 1000,
            "claim_p95_ms": times[int(len(times) * 0.95)] * 1000, "backlog": rows}


def send_many(n: int, rounds: int = 3) -> dict[str, float]:
    from django.db import transaction

    import kipekee
    from bench.compare import FROM, workload

    def one_by_one(tag: str) -> None:
        for it in workload(tag, n):
            kipekee.send(subject=it.subject, text=it.text, html=it.html, to=it.to,
                         from_email=FROM, headers={"Message-ID": it.message_id}, mode="queue")

    def in_one_transaction(tag: str) -> None:
        with transaction.atomic():
            one_by_one(tag)

    def many(tag: str) -> None:
        kipekee.send_many([
            kipekee.Email(subject=it.subject, text=it.text, html=it.html, to=it.to,
                          from_email=FROM, headers={"Message-ID": it.message_id})
            for it in workload(tag, n)])

    result: dict[str, float] = {}
    for name, run in (("send", one_by_one), ("send_txn", in_one_transaction),
                      ("send_many", many)):
        walls, cpus = [], []
        for i in range(rounds):
            empty()
            wall, cpu_time = time.perf_counter(), time.process_time()
            run(f"{name}{i}")
            walls.append(time.perf_counter() - wall)
            cpus.append(time.process_time() - cpu_time)
        result[f"{name}_wall_ms"] = statistics.median(walls) * 1000
        result[f"{name}_cpu_ms"] = statistics.median(cpus) * 1000
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", default="postgres",
                        help="postgres, or sqlite (a fresh WAL file)")
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--backlog", type=int, default=100_000)
    parser.add_argument("--sink-port", type=int, help="a running sink (bench/sink.py)")
    parser.add_argument("--parts", default="cpu,claim,send_many")
    parser.add_argument("--json", action="store_true", help="one JSON line, for compare.py")
    args = parser.parse_args(argv)
    db = (os.path.join(tempfile.mkdtemp(prefix="kipekee-costs-"), "costs.sqlite3")
          if args.db == "sqlite" else args.db)
    sink = None
    if args.sink_port is None and "cpu" in args.parts:
        from bench.sink import Sink

        sink = Sink()
        args.sink_port = sink.port
    os.environ["KIPEKEE_BENCH_SINK_PORT"] = str(args.sink_port or 0)
    try:
        setup(db)
        result: dict[str, Any] = {"db": args.db}
        if "cpu" in args.parts:
            result.update(cpu(args.messages))
        if "send_many" in args.parts:
            result.update(send_many(args.messages))
        if "claim" in args.parts:
            result.update(claim(args.backlog, 200))
        empty()
    finally:
        if sink is not None:
            sink.stop()
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>22}  {value:.3f}" if isinstance(value, float) else
                  f"{key:>22}  {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
