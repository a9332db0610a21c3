"""Demo settings: embedded defaults — SQLite (WAL), delivery in the request, and a local
SMTP capture server started by the demo itself."""

import os
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent
SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "demo-only-not-secret")
DEBUG = True
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
USE_TZ = True
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
DEFAULT_FROM_EMAIL = "Kipekee Shop <orders@shop.example>"

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "kipekee",
    "shop",
]
MIDDLEWARE = [
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
]
ROOT_URLCONF = "demo_site.urls"
TEMPLATES = [{
    "BACKEND": "django.template.backends.django.DjangoTemplates",
    "APP_DIRS": True,
    "OPTIONS": {"context_processors": [
        "django.template.context_processors.request",
        "django.contrib.auth.context_processors.auth",
        "django.contrib.messages.context_processors.messages",
    ]},
}]
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": BASE_DIR / "demo.sqlite3",
        # WAL lets readers and the writer work at once; IMMEDIATE avoids lock upgrades.
        "OPTIONS": {"init_command": "PRAGMA journal_mode=WAL;", "transaction_mode": "IMMEDIATE"},
    }
}

# Django's own send_mail() goes through the outbox too.
EMAIL_BACKEND = "kipekee.backend.EmailBackend"

# The demo command starts a capture server and points "local" at its port.
KIPEKEE = {
    "PROVIDERS": {
        "local": {
            "BACKEND": "kipekee.backends.smtp.EmailBackend",
            "OPTIONS": {"host": "127.0.0.1", "port": int(os.environ.get("KIPEKEE_DEMO_SMTP_PORT", "2525"))},
        },
    },
    "MODE": "hybrid",
}
