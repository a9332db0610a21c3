"""Time the outbox admin's change list on a 1,000,000-row PostgreSQL table.

    .venvs/django52/bin/python bench/admin_changelist.py [--rows 1000000] [--runs 5] [--refill]

Creates (once) the database ``kipekee_bench`` on the PostgreSQL server at
127.0.0.1:5432, fills it with realistic rows (INSERT … SELECT generate_series), then
requests the change list as a logged-in superuser through Django's test client (the full
admin stack, no network) and prints the median time and query count of each URL.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ["DJANGO_SETTINGS_MODULE"] = "bench.settings"

import django  # noqa: E402

FILL = """
INSERT INTO kipekee_outboxemail (
    status, mode, message_id, from_email, "to", cc, bcc, reply_to, subject, body,
    content_subtype, alternatives, headers, template, metadata, provider, created_at, due_at,
    attempts, sent_at, sent_by, error_kind, last_error, refused)
SELECT
    s.status, 'hybrid', '<' || i || '.bench@shop.example>', 'Shop <orders@shop.example>',
    jsonb_build_array('customer' || i || '@example' || (i %% 1000) || '.com'), '[]', '[]', '[]',
    'Order ' || i || ' confirmed', 'Thank you for your order ' || i || '.', 'plain', '[]',
    '{}', 'orders/confirmation', '{}', CASE WHEN i %% 200 = 0 THEN 'backup' ELSE '' END,
    ts, ts, 1, CASE WHEN s.status = 'sent' THEN ts END,
    CASE WHEN s.status = 'sent' THEN (CASE WHEN i %% 20 = 0 THEN 'backup' ELSE 'primary' END)
         ELSE '' END,
    CASE WHEN s.status = 'failed' THEN 'permanent' ELSE '' END,
    CASE WHEN s.status = 'failed' THEN '550 5.1.1 no such user' ELSE '' END, '{}'
FROM generate_series(1, %(rows)s) AS i,
     LATERAL (SELECT now() - ((%(rows)s - i) * interval '30 seconds') AS ts) t,
     LATERAL (SELECT CASE WHEN i %% 100 < 90 THEN 'sent' WHEN i %% 100 < 95 THEN 'failed'
                          WHEN i %% 100 < 98 THEN 'deferred' WHEN i %% 100 < 99 THEN 'queued'
                          ELSE 'suppressed' END AS status) s
"""

URLS = [
    ("list, first page", ""),
    ("list, page 1000", "?p=1000"),
    ("status = failed", "?status__exact=failed"),
    ("status = queued", "?status__exact=queued"),
    ("provider = backup", "?provider=backup"),
    ("created in the last 7 days", "?created_at__gte={week}&created_at__lt={tomorrow}"),
    ("search recipient (rare)", "?q=customer777777%40"),
    ("search subject (common)", "?q=confirmed"),
    ("search Message-ID", "?q=%3C777777.bench%40shop.example%3E"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--refill", action="store_true", help="Empty and fill the table again.")
    args = parser.parse_args()

    import psycopg

    with psycopg.connect("host=127.0.0.1 user=postgres dbname=postgres", autocommit=True) as c:
        if not c.execute("SELECT 1 FROM pg_database WHERE datname = 'kipekee_bench'").fetchone():
            c.execute("CREATE DATABASE kipekee_bench")

    django.setup()
    from datetime import timedelta
    from urllib.parse import quote

    from django.contrib.auth.models import User
    from django.core.management import call_command
    from django.db import connection
    from django.test import Client
    from django.test.utils import CaptureQueriesContext
    from django.utils import timezone

    from kipekee.models import OutboxEmail

    call_command("migrate", verbosity=0)
    count = OutboxEmail.objects.count()
    if args.refill or count != args.rows:
        print(f"filling {args.rows:,} rows …", flush=True)
        started = time.monotonic()
        with connection.cursor() as cursor:
            cursor.execute("TRUNCATE kipekee_outboxemail CASCADE")
            cursor.execute(FILL, {"rows": args.rows})
            cursor.execute("VACUUM ANALYZE kipekee_outboxemail")
        print(f"filled in {time.monotonic() - started:.0f} s", flush=True)
    with connection.cursor() as cursor:
        # Statistics for the expression (trigram) indexes too, as autovacuum would soon.
        cursor.execute("ANALYZE kipekee_outboxemail")
    user, _ = User.objects.get_or_create(username="bench", defaults={"is_staff": True,
                                                                     "is_superuser": True})
    client = Client()
    client.force_login(user)
    now = timezone.now()
    week = quote(str((now - timedelta(days=7)).replace(microsecond=0)))
    tomorrow = quote(str((now + timedelta(days=1)).replace(microsecond=0)))
    print(f"\n{OutboxEmail.objects.count():,} rows, PostgreSQL "
          f"{connection.pg_version // 10000}, Django {django.get_version()}, "
          f"median of {args.runs} runs\n")
    print(f"{'change list':<30} {'median ms':>10} {'max ms':>8} {'queries':>8}")
    for name, query in URLS:
        url = "/admin/kipekee/outboxemail/" + query.format(week=week, tomorrow=tomorrow)
        client.get(url)  # warm the caches, as a second visit would
        times = []
        for _ in range(args.runs):
            with CaptureQueriesContext(connection) as ctx:
                started = time.perf_counter()
                response = client.get(url)
                times.append((time.perf_counter() - started) * 1000)
            assert response.status_code == 200, (url, response.status_code)
        print(f"{name:<30} {statistics.median(times):>10.0f} {max(times):>8.0f} {len(ctx):>8}")


if __name__ == "__main__":
    main()
