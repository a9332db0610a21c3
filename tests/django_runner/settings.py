"""The settings of a project that uses Kipekee, for Django's test runner.

Its provider is a real SMTP server (started by tests/test_testmode.py, port in
``KIPEKEE_RUNNER_SMTP_PORT``) that the tests must never reach: under Django's test runner
Kipekee delivers to ``django.core.mail.outbox`` instead.
"""

import os

import django

SECRET_KEY = "kipekee-runner-tests-only"
USE_TZ = True
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
DEFAULT_FROM_EMAIL = "Shop <shop@example.com>"
INSTALLED_APPS = ["django.contrib.contenttypes", "kipekee", "tests.app"]
DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}}
TEMPLATES = [{"BACKEND": "django.template.backends.django.DjangoTemplates", "APP_DIRS": True}]
ADMINS = ["office@example.com"] if django.VERSION >= (6, 0) else [("Office", "office@example.com")]

# Send Django's own mail through Kipekee too (README, "Quickstart").
if django.VERSION >= (6, 1):
    MAILERS = {"default": {"BACKEND": "kipekee.backend.EmailBackend"}}
else:
    EMAIL_BACKEND = "kipekee.backend.EmailBackend"

KIPEKEE = {
    "PROVIDERS": {
        "primary": {
            "BACKEND": "kipekee.backends.smtp.EmailBackend",
            "OPTIONS": {"host": "127.0.0.1", "port": int(os.environ["KIPEKEE_RUNNER_SMTP_PORT"]),
                        "timeout": 2},
        },
    },
    "ENGINE": None,
}
