"""``manage.py kipekee_sendtest ADDRESS [--provider NAME]``: one real email, end to end.

It goes the way every email goes (outbox row, then delivery in mode ``now`` with its
quick retries and failover), and the command reports where it went and how long it took.
"""

from __future__ import annotations

import socket
import time
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import timezone

from ... import compose


class Command(BaseCommand):
    help = "Send a test email through the outbox and the providers; report the outcome."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("address", help="Where to send the test email.")
        parser.add_argument("--provider", default="",
                            help="Only this provider alias (default: all, in failover order).")
        parser.add_argument("--from", dest="from_email", default=None,
                            help="Sender (default: DEFAULT_FROM_EMAIL).")

    def handle(self, *args: Any, **options: Any) -> None:
        host = socket.gethostname()
        now = timezone.now()
        started = time.monotonic()
        try:
            receipt = compose.send(
                to=options["address"], from_email=options["from_email"],
                subject=f"Kipekee test email from {host}",
                text=(f"This is a test email sent by `manage.py kipekee_sendtest` on {host} "
                      f"at {now.isoformat(timespec='seconds')}.\n\nIf you read this, "
                      "delivery works.\n"),
                mode="now", provider=options["provider"], metadata={"sendtest": True},
            )
        except Exception as exc:  # InvalidMessage, UnknownProvider, ConfigurationError
            raise CommandError(f"not queued: {exc}") from exc
        elapsed = time.monotonic() - started
        self.stdout.write(f"outbox email  #{receipt.id}  {receipt.message_id}")
        self.stdout.write(f"status        {receipt.status}")
        self.stdout.write(f"provider      {receipt.provider or '-'}")
        self.stdout.write(f"attempts      {receipt.attempts}")
        self.stdout.write(f"elapsed       {elapsed * 1000:.0f} ms")
        if receipt.error:
            self.stdout.write(f"error         {receipt.error_kind}: {receipt.error}")
        if receipt.refused:
            self.stdout.write(f"refused       {receipt.refused}")
        if not receipt.sent or receipt.refused:
            raise CommandError(f"test email not delivered ({receipt.status})", returncode=1)
        self.stdout.write(self.style.SUCCESS(
            f"sent to {options['address']} via {receipt.provider} in {elapsed:.2f} s"))
