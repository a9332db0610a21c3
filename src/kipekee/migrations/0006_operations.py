"""Indexes for the admin on large outboxes.

- The provider filter: ``sent_by`` (with ``id``, the list's order) and the rare rows
  pinned to one provider.
- On PostgreSQL only, trigram indexes (pg_trgm) for the search by subject and recipient,
  which is ``UPPER(column::text) LIKE UPPER('%term%')``: without them a search reads the
  whole table. Built ``CONCURRENTLY`` (this migration is not atomic) so that migrating a
  live outbox does not block its writes. Where the extension cannot be created (no
  privilege), the migration says so and goes on: search works, just slower.
"""

import sys
from typing import Any

from django.db import migrations, models

TRIGRAM_INDEXES = {
    "kipekee_subject_trgm": 'UPPER("subject"::text)',
    "kipekee_to_trgm": 'UPPER("to"::text)',
}


def create_trigram_indexes(apps: Any, schema_editor: Any) -> None:
    connection = schema_editor.connection
    if connection.vendor != "postgresql":
        return
    table = schema_editor.quote_name(apps.get_model("kipekee", "OutboxEmail")._meta.db_table)
    with connection.cursor() as cursor:
        try:
            cursor.execute("CREATE EXTENSION IF NOT EXISTS pg_trgm")
        except Exception as exc:  # noqa: BLE001 - reported; the indexes are an optimisation
            sys.stderr.write(
                f"\n  kipekee: pg_trgm unavailable ({exc}); the admin's search will scan the "
                "outbox. Run CREATE EXTENSION pg_trgm as a superuser, then migrate "
                "kipekee 0002 and 0003 again.\n")
            return
        for name, expression in TRIGRAM_INDEXES.items():
            cursor.execute(f"CREATE INDEX CONCURRENTLY IF NOT EXISTS {name} ON {table} "
                           f"USING gin (({expression}) gin_trgm_ops)")


def drop_trigram_indexes(apps: Any, schema_editor: Any) -> None:
    if schema_editor.connection.vendor != "postgresql":
        return
    with schema_editor.connection.cursor() as cursor:
        for name in TRIGRAM_INDEXES:
            cursor.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {name}")


class Migration(migrations.Migration):
    atomic = False

    dependencies = [
        ("kipekee", "0005_mailtrap"),
    ]

    operations = [
        migrations.AddIndex(
            model_name="outboxemail",
            index=models.Index(fields=["sent_by", "id"], name="kipekee_sent_by"),
        ),
        migrations.AddIndex(
            model_name="outboxemail",
            index=models.Index(condition=models.Q(("provider", ""), _negated=True),
                               fields=["provider"], name="kipekee_pinned_provider"),
        ),
        migrations.RunPython(create_trigram_indexes, drop_trigram_indexes, elidable=False),
    ]
