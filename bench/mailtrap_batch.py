"""Messages per second through Kipekee's Mailtrap batch path, against the local
Mailtrap-contract server with latency and Mailtrap's request limit enforced.

    .venvs/django52/bin/python bench/mailtrap_batch.py [--messages 20000] [--latency 0.02]

What it does: writes N queued rows (one recipient each, a text and an HTML body) to a
fresh SQLite outbox, claims them in engine-sized batches (``--claim``, default 500 rows,
one UPDATE standing in for an engine's batch claim), hands each batch to
``Deliverer.deliver_many`` and records every outcome on its row (``recording.record``),
as an engine does. The server answers each request after ``--latency`` seconds and
enforces 150 requests per 10 s per token with 429; the provider is configured with
``LIMITS = {"RATE": "150/10s"}``.

It prints the messages per second for the delivery alone and with recording, how many
requests were made, how many got 429 (it must be 0), and the most requests the server
saw in any 10-second window (it must be at most 150).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import tempfile
import time
from datetime import timedelta
from multiprocessing.connection import Connection
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))


def configure(db_path: str, api_url: str) -> None:
    import django
    from django.conf import settings

    settings.configure(
        SECRET_KEY="bench",
        USE_TZ=True,
        INSTALLED_APPS=["django.contrib.contenttypes", "django.contrib.auth", "kipekee"],
        # WAL and synchronous=NORMAL, as the demo runs SQLite: one fsync per commit would
        # measure the disk, not Kipekee.
        DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": db_path,
                               "OPTIONS": {"init_command": "PRAGMA journal_mode=WAL; "
                                                           "PRAGMA synchronous=NORMAL;"}}},
        DEFAULT_AUTO_FIELD="django.db.models.BigAutoField",
        DEFAULT_FROM_EMAIL="Tours <desk@tours.example>",
        KIPEKEE={"PROVIDERS": {"mailtrap": {
            "BACKEND": "kipekee.backends.mailtrap.EmailBackend",
            "OPTIONS": {"api_token": "bench-token", "api_url": api_url, "timeout": 30},
            "LIMITS": {"RATE": "150/10s"},
        }}},
    )
    django.setup()


def serve(conn: Connection, latency: float) -> None:
    """The Mailtrap-contract server, in its own process: the API is another machine in
    reality, and its JSON work must not share this process's interpreter lock."""
    from kipekee.testing import LocalMailtrapServer

    server = LocalMailtrapServer(tokens={"bench-token"}, latency=latency, rate=(150, 10.0),
                                 record_bodies=False)
    with server:
        conn.send(server.api_url)
        conn.recv()  # "stop"
        conn.send((server.statuses(), sorted(r.at for r in server.requests)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--latency", type=float, default=0.02, help="server seconds per answer")
    parser.add_argument("--claim", type=int, default=500, help="rows per deliver_many call")
    args = parser.parse_args(argv)

    ours, theirs = multiprocessing.Pipe()
    server = multiprocessing.Process(target=serve, args=(theirs, args.latency), daemon=True)
    server.start()
    with tempfile.TemporaryDirectory(prefix="kipekee-bench-") as tmp:
        configure(os.path.join(tmp, "bench.sqlite3"), ours.recv())
        from django.core.management import call_command
        from django.utils import timezone

        from kipekee.delivery import Deliverer
        from kipekee.models import OutboxEmail, Status
        from kipekee.recording import record

        call_command("migrate", verbosity=0)
        now = timezone.now()
        OutboxEmail.objects.bulk_create(
            (OutboxEmail(from_email="Tours <desk@tours.example>", to=[f"guest{i}@example.com"],
                         subject=f"Your booking #{i}", body=f"Booking {i} is confirmed.",
                         alternatives=[{"content": f"<p>Booking <b>{i}</b> is confirmed.</p>",
                                        "mimetype": "text/html"}],
                         message_id=f"<booking-{i}@tours.example>", mode="queue",
                         metadata={"category": "booking", "booking": i},
                         due_at=now, created_at=now)
             for i in range(args.messages)), batch_size=2000)
        ids = list(OutboxEmail.objects.order_by("pk").values_list("pk", flat=True))

        delivering = recording = 0.0
        sent = 0
        started = time.monotonic()
        with Deliverer() as deliverer:
            for first in range(0, len(ids), args.claim):
                chunk = ids[first:first + args.claim]
                OutboxEmail.objects.filter(pk__in=chunk).update(
                    status=Status.SENDING, attempts=1,
                    lease_until=timezone.now() + timedelta(minutes=5))
                rows = list(OutboxEmail.objects.filter(pk__in=chunk).order_by("pk"))
                t0 = time.monotonic()
                outcomes = deliverer.deliver_many(rows)
                t1 = time.monotonic()
                for row, outcome in zip(rows, outcomes):
                    record(row, outcome)
                    sent += outcome.ok
                recording += time.monotonic() - t1
                delivering += t1 - t0
        total = time.monotonic() - started

        ours.send("stop")
        statuses, times = ours.recv()
        server.join(timeout=10)
        busiest = max((sum(1 for t in times[i:] if t < start + 10.0)
                       for i, start in enumerate(times)), default=0)
        print(f"messages           {args.messages}")
        print(f"sent               {sent} ({OutboxEmail.objects.filter(status='sent').count()} "
              "rows sent)")
        print(f"requests           {len(statuses)} (/api/batch, {args.latency * 1000:.0f} ms "
              "latency each)")
        print(f"429 answers        {statuses.count(429)}")
        print(f"busiest 10 s       {busiest} requests (limit 150)")
        print(f"delivery only      {args.messages / delivering:,.0f} messages/s "
              f"({delivering:.1f} s)")
        print(f"with recording     {args.messages / total:,.0f} messages/s ({total:.1f} s, "
              f"{recording:.1f} s of it writing outcomes to SQLite)")
        ok = sent == args.messages and statuses.count(429) == 0 and busiest <= 150
        return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
