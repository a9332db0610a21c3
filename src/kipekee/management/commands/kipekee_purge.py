"""``manage.py kipekee_purge``: anonymise or delete old finished outbox rows.

Defaults come from ``KIPEKEE["RETENTION"]``; run it daily (cron, a Kubernetes CronJob).
"""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from ... import conf, retention


class Command(BaseCommand):
    help = "Anonymise (or delete) finished outbox rows older than RETENTION['DAYS'], in batches."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--days", type=int, help="Age in days (default: RETENTION['DAYS']).")
        parser.add_argument("--action", choices=["anonymise", "delete"],
                            help="Default: RETENTION['ACTION'] (anonymise).")
        parser.add_argument("--batch-size", type=int, help="Default: RETENTION['BATCH_SIZE'].")
        parser.add_argument("--dry-run", action="store_true", help="Only count.")

    def handle(self, *args: Any, **options: Any) -> None:
        settings = conf.get().retention
        days = options["days"] or settings.days
        if not days or days < 1:
            raise CommandError('No retention age: set KIPEKEE["RETENTION"]["DAYS"] or pass '
                               "--days N (N >= 1).")
        action = options["action"] or settings.action
        batch = options["batch_size"] or settings.batch_size
        if batch < 1:
            raise CommandError("--batch-size must be >= 1.")
        counts = retention.purge(days=days, action=action, batch_size=batch,
                                 dry_run=options["dry_run"])
        verb = {"anonymise": "anonymised", "delete": "deleted"}[action]
        if options["dry_run"]:
            verb = f"would be {verb}"
        by_status = ", ".join(f"{s}: {n}" for s, n in sorted(counts.items())) or "none"
        self.stdout.write(f"{sum(counts.values())} rows older than {days} days {verb} "
                          f"({by_status})")
