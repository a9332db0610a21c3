"""Settings for ``bench/compare.py``: Kipekee and django-post-office side by side, on the
same database and the same SMTP sink.

``KIPEKEE_BENCH_DB``: ``postgres`` (database ``kipekee_bench_compare``, or the one
``KIPEKEE_BENCH_PG_NAME`` names, on 127.0.0.1:5432, trust auth, user ``postgres``; the
default) or a path to an SQLite file (WAL,
``synchronous=NORMAL``, as the demo runs SQLite). ``KIPEKEE_BENCH_SINK_PORT``: the port of
the sink (``bench/sink.py``) on 127.0.0.1.
"""

import os

SECRET_KEY = "kipekee-bench-only"
DEBUG = False
USE_TZ = True
TIME_ZONE = "UTC"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
DEFAULT_FROM_EMAIL = "Tours <desk@tours.example>"
INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "django.contrib.auth",
    "kipekee",
    "post_office",
]

# post_office renders subjects and bodies as templates, even without a template.
TEMPLATES = [{"BACKEND": "django.template.backends.django.DjangoTemplates", "DIRS": [],
              "APP_DIRS": True, "OPTIONS": {}}]

_db = os.environ.get("KIPEKEE_BENCH_DB", "postgres")
if _db == "postgres":
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": os.environ.get("KIPEKEE_BENCH_PG_NAME", "kipekee_bench_compare"),
            "HOST": "127.0.0.1",
            "PORT": "5432",
            "USER": "postgres",
        }
    }
else:
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": _db,
            "OPTIONS": {"timeout": 30, "transaction_mode": "IMMEDIATE",
                        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;"},
        }
    }

_port = int(os.environ.get("KIPEKEE_BENCH_SINK_PORT", "2525"))

# Both systems reach the same sink. Django's own SMTP backend (post_office's default
# and the connection-per-message reference):
EMAIL_BACKEND = "django.core.mail.backends.smtp.EmailBackend"
EMAIL_HOST = "127.0.0.1"
EMAIL_PORT = _port
EMAIL_TIMEOUT = 30

KIPEKEE = {
    "PROVIDERS": {
        "sink": {"BACKEND": "kipekee.backends.smtp.EmailBackend",
                 "OPTIONS": {"host": "127.0.0.1", "port": _port, "timeout": 30}},
    },
    "MODE": "queue",
    # The benchmark runs its own kipekee_worker processes: no thread engine in the
    # process that enqueues (it would send while the enqueue is being timed).
    "ENGINE": None,
}

# post_office's defaults (BATCH_SIZE 100, THREADS_PER_PROCESS 5); compare.py changes
# THREADS_PER_PROCESS for the runs that look for its best setting.
POST_OFFICE: dict = {}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"null": {"class": "logging.NullHandler"}},
    "loggers": {
        "kipekee": {"handlers": ["null"], "level": "WARNING", "propagate": False},
        "post_office": {"handlers": ["null"], "level": "WARNING", "propagate": False},
    },
}
