"""Settings for Kipekee's own test suite.

SQLite by default; set KIPEKEE_TEST_DATABASE=postgres to run the same suite on the
PostgreSQL server at 127.0.0.1:5432 (database ``test``, trust auth).
"""

import os

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
    # The browser tests' live server serves the admin's CSS and JS from here.
    "django.contrib.staticfiles",
    "kipekee",
    "tests.app",
]

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
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": "kipekee-tests.sqlite3",
            "TEST": {"NAME": os.environ.get("KIPEKEE_SQLITE_TEST_NAME", "")},
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

# Tests configure providers per test; the default points at nothing that listens.
KIPEKEE = {
    "PROVIDERS": {},
}
