"""Settings for Kipekee's own test suite.

SQLite by default; set KIPEKEE_TEST_DATABASE=postgres to run the same suite on the
PostgreSQL server at 127.0.0.1:5432 (database ``test``, trust auth).
"""

import json
import os
from typing import Any

SECRET_KEY = "kipekee-tests-only"
USE_TZ = True
TIME_ZONE = "UTC"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
DEFAULT_FROM_EMAIL = "Kipekee Tests <noreply@kipekee.test>"

INSTALLED_APPS = [
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.admin",
    # {% inline_image %} finds files with its finders; the browser tests' live server
    # serves the admin's CSS and JS from here.
    "django.contrib.staticfiles",
    "kipekee",
    "tests.app",
    # The "tasks" engine's tests (tests/test_tasks_engine.py): tasks in the test database,
    # run by real db_worker processes.
    "django_tasks_db",
]

import django  # noqa: E402

if django.VERSION < (6, 0):
    INSTALLED_APPS.append("django_tasks")  # the backport of django.tasks

TASKS = {"default": {"BACKEND": "django_tasks_db.DatabaseBackend", "QUEUES": ["default", "kipekee"]}}

if os.environ.get("KIPEKEE_TEST_DATABASE") == "postgres":
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": os.environ.get("KIPEKEE_PG_NAME", "test"),
            "HOST": "127.0.0.1",
            "PORT": "5432",
            "USER": os.environ.get("KIPEKEE_PG_USER", "postgres"),
            # One test database per run, so parallel runs (CI, developers) never collide.
            "TEST": {"NAME": f"kipekee_test_{os.getpid()}"},
        }
    }
else:
    import tempfile

    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            # KIPEKEE_SQLITE_NAME: a subprocess started by a test uses the test's database.
            "NAME": os.environ.get("KIPEKEE_SQLITE_NAME",
                                   os.path.join(tempfile.gettempdir(), "kipekee-dev.sqlite3")),
            # A file with WAL, as in production: engines write from several threads, and
            # an in-memory shared-cache database fails them at once with "table is locked"
            # instead of waiting. IMMEDIATE avoids deadlocks on lock upgrades.
            # KIPEKEE_SQLITE_TIMEOUT: the soak's workers wait less than its write locks.
            "OPTIONS": {"timeout": float(os.environ.get("KIPEKEE_SQLITE_TIMEOUT", "20")),
                        "init_command": "PRAGMA journal_mode=WAL;",
                        "transaction_mode": "IMMEDIATE"},
            "TEST": {"NAME": os.path.join(tempfile.gettempdir(), f"kipekee-test-{os.getpid()}.sqlite3")},
        }
    }

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ]
        },
    }
]

MIDDLEWARE = [
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
]
ROOT_URLCONF = "tests.urls"
STATIC_URL = "/static/"
ADMINS = [("Tours Office", "office@tours.example")]

# Tests configure providers per test. No in-process engine unless a test starts one:
# a background thread would deliver rows other tests are asserting on.
KIPEKEE: dict[str, Any] = {
    "PROVIDERS": {},
    "ENGINE": None,
}

# Worker subprocesses started by the tests get the test's KIPEKEE this way.
if os.environ.get("KIPEKEE_TEST_SETTINGS"):
    KIPEKEE = json.loads(os.environ["KIPEKEE_TEST_SETTINGS"])

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {"kipekee": {"handlers": ["console"], "level": os.environ.get("KIPEKEE_LOG_LEVEL", "WARNING")}},
}
