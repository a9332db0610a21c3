"""``manage.py kipekee_check``: is email going out? A table, and an exit status.

Exit 0 when every check passes (warnings included), 1 when one fails: usable as a
probe. ``--only database,engines`` picks checks (a liveness probe should ask only what a
restart can fix); ``--no-providers`` keeps a frequent probe from opening an SMTP session
every few seconds.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from ... import health


def _names(value: str) -> list[str]:
    names = [n.strip() for n in value.split(",") if n.strip()]
    unknown = set(names) - set(health.CHECKS)
    if not names or unknown:
        raise argparse.ArgumentTypeError(
            f"choose among {', '.join(health.CHECKS)} (got {value!r})")
    return names


class Command(BaseCommand):
    help = "Check the database, providers, engines and queue; exit 1 if something is wrong."
    requires_system_checks: list[str] = []  # report broken settings as a row, not a crash

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--no-providers", action="store_true",
                            help="Do not connect to the providers (for frequent probes).")
        parser.add_argument("--only", type=_names, default=None,
                            help=f"Comma-separated checks among {', '.join(health.CHECKS)}.")
        parser.add_argument("--json", action="store_true", help="One JSON object per line.")

    def handle(self, *args: Any, **options: Any) -> None:
        results = health.run(only=options["only"], with_providers=not options["no_providers"])
        if options["json"]:
            for r in results:
                self.stdout.write(json.dumps({"check": r.name, "status": r.level,
                                              "detail": r.detail}))
        else:
            width = max(len(r.name) for r in results)
            style = {"ok": self.style.SUCCESS, "warn": self.style.WARNING,
                     "fail": self.style.ERROR}
            for r in results:
                self.stdout.write(f"{r.name:<{width}}  {style[r.level](f'{r.level.upper():<4}')}"
                                  f"  {r.detail}")
        failed = [r.name for r in results if r.level == "fail"]
        if failed:
            raise CommandError(f"failing: {', '.join(failed)}", returncode=1)
