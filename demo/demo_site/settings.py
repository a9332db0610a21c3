"""Demo settings: the four seed systems on Kipekee.

Embedded defaults: SQLite (WAL), the in-process thread engine, and two local SMTP capture
servers ("primary" and "backup", a failover chain) started by ``manage.py
kipekee_demo_serve``, whose messages the dev inbox at /inbox/ shows. Environment:

- ``KIPEKEE_DEMO_DATABASE``: ``postgres://user@host:port/name`` for PostgreSQL
  (default: ``demo/demo.sqlite3``, or a path for another SQLite file);
- ``KIPEKEE_DEMO_ENGINE``: ``thread`` (default), ``worker`` (run ``manage.py
  kipekee_worker`` beside the site) or ``celery`` (run ``celery -A demo_site worker -B``);
- ``KIPEKEE_DEMO_SMTP_PORT`` / ``KIPEKEE_DEMO_BACKUP_SMTP_PORT``: the capture servers'
  ports (2525, 2526);
- ``KIPEKEE_DEMO_RATE_LIMIT``: public form submissions per client, ``"5/600"``
  (5 per 10 minutes);
- ``KIPEKEE_DEMO_DEBUG``: ``1`` (default) or ``0``. With ``0`` the site runs as it would
  be deployed: Django's plain error pages, and the dev inbox only for staff.
"""

import os
from pathlib import Path
from urllib.parse import unquote, urlsplit

import django

BASE_DIR = Path(__file__).resolve().parent.parent
SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "demo-only-not-secret")
_debug = os.environ.get("KIPEKEE_DEMO_DEBUG", "1")
if _debug not in ("0", "1"):
    raise ValueError(f"KIPEKEE_DEMO_DEBUG must be 1 or 0, not {_debug!r}")
DEBUG = _debug == "1"
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
USE_TZ = True
TIME_ZONE = "UTC"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
DEFAULT_FROM_EMAIL = "Kipekee Demo <hello@kipekee.example>"

# Fixed on the server, never taken from a form: where the admin mails of the public
# forms go (tours: quotes; careers: applications).
ADMINS = [("Tours office", "office@tours.example")]
DEMO_CAREERS_EMAIL = "careers@tours.example"

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",  # the admin's CSS and JS
    "kipekee",
    "devinbox",
    "shop",
]
MIDDLEWARE = [
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
]
ROOT_URLCONF = "demo_site.urls"
# Served by `kipekee_demo_serve` (runserver's static handler, with DEBUG on or off):
# there is no web server in front of the demo to do it.
STATIC_URL = "static/"
TEMPLATES = [{
    "BACKEND": "django.template.backends.django.DjangoTemplates",
    "APP_DIRS": True,
    "OPTIONS": {"context_processors": [
        "django.template.context_processors.request",
        "django.contrib.auth.context_processors.auth",
        "django.contrib.messages.context_processors.messages",
    ]},
}]


def _database(url: str) -> dict:
    if url.startswith(("postgres://", "postgresql://")):
        parts = urlsplit(url)
        return {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": unquote(parts.path.lstrip("/")) or "kipekee_demo",
            "USER": unquote(parts.username or "postgres"),
            "PASSWORD": unquote(parts.password or ""),
            "HOST": parts.hostname or "127.0.0.1",
            "PORT": str(parts.port or 5432),
        }
    return {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": url or BASE_DIR / "demo.sqlite3",
        # WAL lets readers and the writer work at once; IMMEDIATE avoids lock upgrades.
        "OPTIONS": {"init_command": "PRAGMA journal_mode=WAL;", "transaction_mode": "IMMEDIATE"},
    }


DATABASES = {"default": _database(os.environ.get("KIPEKEE_DEMO_DATABASE", ""))}

# Django's own send_mail() goes through the outbox too (MAILERS on Django 6.1, where
# EMAIL_BACKEND is deprecated).
if django.VERSION >= (6, 1):
    MAILERS = {"default": {"BACKEND": "kipekee.backend.EmailBackend"}}
else:
    EMAIL_BACKEND = "kipekee.backend.EmailBackend"

_engine = os.environ.get("KIPEKEE_DEMO_ENGINE", "thread")
if _engine not in ("thread", "worker", "celery"):
    raise ValueError(f"KIPEKEE_DEMO_ENGINE must be thread, worker or celery, not {_engine!r}")


def _smtp(port_variable: str, default: int) -> dict:
    return {
        "BACKEND": "kipekee.backends.smtp.EmailBackend",
        "OPTIONS": {"host": "127.0.0.1", "port": int(os.environ.get(port_variable, default)),
                    "timeout": 5},
    }


KIPEKEE = {
    # The failover chain: "backup" takes over while "primary" is down (a switch in the
    # dev inbox takes it down).
    "PROVIDERS": {
        "primary": _smtp("KIPEKEE_DEMO_SMTP_PORT", 2525),
        "backup": _smtp("KIPEKEE_DEMO_BACKUP_SMTP_PORT", 2526),
    },
    "MODE": "hybrid",
    # Short breaker cool-down and retries, so a person sees recovery within the demo.
    "CIRCUIT_BREAKER": {"FAILURES": 3, "COOLDOWN_SECONDS": 10},
    "RETRY": {"BASE_DELAY": 2, "MAX_DELAY": 60},
    "ENGINE": _engine,
    # The newsletter's unsubscribe links (kipekee.lists): `kipekee_demo_serve` puts the
    # address it serves on in BASE_URL. Mail to MAILTO reaching the capture servers is
    # acted on as a mailbox provider's inbound webhook would be (devinbox.capture).
    "UNSUBSCRIBE": {"BASE_URL": "http://127.0.0.1:8000", "MAILTO": "unsubscribe@kipekee.example"},
}

CELERY_BROKER_URL = os.environ.get("KIPEKEE_DEMO_CELERY_BROKER", "redis://127.0.0.1:6379/0")

if os.environ.get("KIPEKEE_DEMO_FAST_PASSWORDS"):  # the browser tests only: quick sign-ins
    PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]

DEMO_RATE_LIMIT = os.environ.get("KIPEKEE_DEMO_RATE_LIMIT", "5/600")
CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}
