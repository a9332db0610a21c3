"""Time ``kipekee_purge`` (anonymise, then delete) on a 1,000,000-row PostgreSQL table.

    .venvs/django52/bin/python bench/purge.py [--rows 1000000] [--days 90] [--batch-size 1000]

Uses its own database, ``kipekee_bench_purge`` (the purge rewrites the rows, so it does
not share the admin benchmark's table), refilled on every run with the rows of
``admin_changelist.py`` (one every 30 s, so 90 days keeps about a quarter of them).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ["DJANGO_SETTINGS_MODULE"] = "bench.settings"
os.environ["KIPEKEE_BENCH_DB"] = "kipekee_bench_purge"

import django  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--days", type=int, default=90)
    parser.add_argument("--batch-size", type=int, default=1000)
    args = parser.parse_args()

    import psycopg

    with psycopg.connect("host=127.0.0.1 user=postgres dbname=postgres", autocommit=True) as c:
        if not c.execute("SELECT 1 FROM pg_database WHERE datname = 'kipekee_bench_purge'").fetchone():
            c.execute("CREATE DATABASE kipekee_bench_purge")

    django.setup()
    from django.core.management import call_command
    from django.db import connection

    from bench.admin_changelist import FILL
    from kipekee.models import OutboxEmail

    call_command("migrate", verbosity=0)
    print(f"filling {args.rows:,} rows …", flush=True)
    with connection.cursor() as cursor:
        cursor.execute("TRUNCATE kipekee_outboxemail CASCADE")
        cursor.execute(FILL, {"rows": args.rows})
        cursor.execute("VACUUM ANALYZE kipekee_outboxemail")
    print(f"PostgreSQL {connection.pg_version // 10000}, Django {django.get_version()}, "
          f"batches of {args.batch_size}, older than {args.days} days\n")
    for action in ("anonymise", "delete"):
        started = time.monotonic()
        call_command("kipekee_purge", days=args.days, action=action, batch_size=args.batch_size)
        elapsed = time.monotonic() - started
        print(f"  {action}: {elapsed:.1f} s; {OutboxEmail.objects.count():,} rows left\n",
              flush=True)


if __name__ == "__main__":
    main()
