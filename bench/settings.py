"""The test settings, on the benchmark's own PostgreSQL database."""

import os

from tests.settings import *  # noqa: F403

DEBUG = False
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": os.environ.get("KIPEKEE_BENCH_DB", "kipekee_bench"),
        "HOST": "127.0.0.1",
        "PORT": "5432",
        "USER": "postgres",
    }
}
KIPEKEE = {
    "PROVIDERS": {
        alias: {"BACKEND": "kipekee.backends.smtp.EmailBackend", "OPTIONS": {"host": "127.0.0.1"}}
        for alias in ("primary", "backup")
    }
}
