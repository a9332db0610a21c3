"""``make demo``: migrate, start the capture SMTP servers, serve the demo site.

The capture servers ("primary" and "backup", the failover chain) run in this process,
each message stored for the dev inbox. ``--addrport``/``--smtp-port``/``--backup-port``
with port 0 pick free ports (the browser tests do); the providers follow the ports.
The admin's static files are served too, with ``DEBUG`` on or off.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandParser
from django.test.utils import override_settings
from django.utils import timezone

from devinbox import capture
from shop.models import Show

DEMO_USER = ("admin", "kipekee-demo", "admin@payments.example")


def seed() -> None:
    """The demo admin (payments sign-in) and shows more than 24 h away (cinema)."""
    User = get_user_model()
    username, password, email = DEMO_USER
    if not User.objects.filter(username=username).exists():
        User.objects.create_superuser(username, email, password)
    if not Show.objects.filter(starts_at__gt=timezone.now() + timedelta(hours=26)).exists():
        evening = (timezone.now() + timedelta(days=2)).replace(hour=19, minute=30, second=0, microsecond=0)
        for days, film in enumerate(("Black Panther", "Queen of Katwe", "Vuta N'kuvute")):
            Show.objects.create(film=film, starts_at=evening + timedelta(days=days))


class Command(BaseCommand):
    help = "Run the Kipekee demo site with its capture SMTP servers and dev inbox."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--addrport", default="127.0.0.1:8000")
        parser.add_argument("--smtp-port", type=int,
                            default=int(os.environ.get("KIPEKEE_DEMO_SMTP_PORT", 2525)))
        parser.add_argument("--backup-port", type=int,
                            default=int(os.environ.get("KIPEKEE_DEMO_BACKUP_SMTP_PORT", 2526)))

    def handle(self, *args: Any, addrport: str, smtp_port: int, backup_port: int, **options: Any) -> None:
        call_command("migrate", verbosity=0)
        seed()
        primary = capture.start("primary", smtp_port)
        backup = capture.start("backup", backup_port)
        providers = {name: {**config, "OPTIONS": {**config["OPTIONS"], "port": capture.servers[name].port}}
                     for name, config in settings.KIPEKEE["PROVIDERS"].items()}
        # Follow the ports actually bound (port 0 = a free one), for the whole process.
        # (SETTINGS_MODULE kept: runserver's banner names it, and an override drops it.)
        # The unsubscribe links point at this server.
        host, _, port = addrport.rpartition(":")
        site = f"http://{host if host not in ('', '0.0.0.0', '[::]') else '127.0.0.1'}:{port}"
        unsubscribe = {**settings.KIPEKEE.get("UNSUBSCRIBE", {}), "BASE_URL": site}
        override_settings(KIPEKEE={**settings.KIPEKEE, "PROVIDERS": providers,
                                   "UNSUBSCRIBE": unsubscribe},
                          SETTINGS_MODULE=settings.SETTINGS_MODULE).enable()
        url = f"http://{addrport}/"
        self.stdout.write(self.style.MIGRATE_HEADING("Kipekee demo"))
        self.stdout.write(f"  site:       {url}\n  dev inbox:  {url}inbox/\n"
                          f"  admin:      {url}admin/  (user {DEMO_USER[0]}, password {DEMO_USER[1]})\n"
                          f"  SMTP capture: primary 127.0.0.1:{primary.port}, backup 127.0.0.1:{backup.port}\n"
                          f"  engine: {settings.KIPEKEE['ENGINE']}, database: {settings.DATABASES['default']['ENGINE']}")
        try:
            # No autoreloader: it would run the site in a child process, away from the
            # capture servers the inbox page switches.
            # insecure_serving: the admin's static files also with DEBUG off. That is
            # runserver's --insecure, Django's own static view, made for exactly this (a
            # development server without a web server in front); a deployment would put
            # WhiteNoise or the web server there instead. No extra dependency for a demo.
            call_command("runserver", addrport, use_reloader=False, skip_checks=True,
                         insecure_serving=True)
        finally:
            capture.stop_all()
