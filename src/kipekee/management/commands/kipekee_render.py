"""``manage.py kipekee_render``: render every previewable email with its sample, for CI.

Every message of every registered notification and every template registered with
:func:`kipekee.previews.register_template` is rendered as it would go out (strict
templates, the outbox's checks, the sample's rows rolled back). One line each::

    ok    notification/quote.received/admin   "New quote request from Ann"  5.1 kB
    FAIL  template/emails/otp   emails/otp.html: Email template 'emails/otp.html' uses
          {{ code }}, which the context does not define (strict templates: ...)

Exit status 1 when any fails, naming each. Email templates found on disk that no preview
covers are listed as warnings; ``--require-samples`` makes them failures too.
``--eml DIR`` writes each rendered message as ``DIR/<key>.eml``, to open in a mail client.
"""

from __future__ import annotations

import fnmatch
import logging
from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from ... import previews

logger = logging.getLogger("kipekee.previews")


class Command(BaseCommand):
    help = ("Render every registered notification and template with its sample context; "
            "fail naming each one that does not render.")

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--only", action="append", default=[], metavar="PATTERN",
                            help="Only previews whose key matches (shell pattern, e.g. "
                                 "'notification/order.*'); may be repeated.")
        parser.add_argument("--eml", metavar="DIR", type=Path,
                            help="Write each rendered message to DIR/<key>.eml.")
        parser.add_argument("--require-samples", action="store_true",
                            help="Fail also for email templates (*.subject.txt) that no "
                                 "notification or registered template sample covers.")

    def handle(self, *args: Any, only: list[str], eml: Path | None, require_samples: bool,
               **options: Any) -> None:
        chosen = [p for p in previews.all_previews()
                  if not only or any(fnmatch.fnmatchcase(p.key, pattern) for pattern in only)]
        if not chosen:
            raise CommandError("Nothing to render: no notification or template sample is "
                               "registered" + (f" matching {only}" if only else "") + ".")
        width = max(len(p.key) for p in chosen)
        failures: list[str] = []
        for preview in chosen:
            try:
                rendered = previews.render(preview)
            except Exception as exc:  # noqa: BLE001 - reported below, and the exit status says so
                logger.debug("Preview %s failed", preview.key, exc_info=True)
                failures.append(preview.key)
                self.stdout.write(self.style.ERROR(f"FAIL  {preview.key:<{width}}  ")
                                  + f"{preview.template}: {type(exc).__name__}: {exc}")
                continue
            self.stdout.write(self.style.SUCCESS("ok  ") + f"  {preview.key:<{width}}  "
                              f"{rendered.subject!r}  {rendered.size / 1000:.1f} kB"
                              + (f", {len(rendered.attachments)} attachments"
                                 if rendered.attachments else ""))
            if eml is not None:
                eml.mkdir(parents=True, exist_ok=True)
                (eml / (preview.key.replace("/", "__") + ".eml")).write_bytes(rendered.raw)
        uncovered = previews.without_sample() if not only else []
        for name in uncovered:
            line = (f"no sample: {name} (register(..., sample=...) for a notification, or "
                    "kipekee.previews.register_template)")
            self.stderr.write(self.style.ERROR(line) if require_samples
                              else self.style.WARNING(line))
        self.stdout.write(f"{len(chosen) - len(failures)} of {len(chosen)} rendered.")
        if require_samples:
            failures += [f"{name} (no sample)" for name in uncovered]
        if failures:
            raise CommandError(f"{len(failures)} failed: {', '.join(failures)}", returncode=1)
