from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

import pytest

from kipekee.models import OutboxEmail
from kipekee.testing import LocalSMTPServer

pytest_plugins = ["tests.smtp_fixtures", "tests.mailtrap_fixtures", "tests.reliability_report",
                  "tests.browser_fixtures"]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``postgres`` run in the PostgreSQL pass of ``make test`` (deselected,
    not skipped, in the SQLite passes); the soak in the Django 5.2 passes only."""
    import django
    from django.conf import settings

    if django.VERSION[:2] != (5, 2):
        # The soak (tests/test_soak.py) runs once per database, in the Django 5.2 passes:
        # it exercises engines, providers and the database, none of which differ between
        # Django versions, and it takes a minute and a half.
        soak = [item for item in items if item.get_closest_marker("soak") is not None]
        if soak:
            config.hook.pytest_deselected(items=soak)
            items[:] = [item for item in items if item.get_closest_marker("soak") is None]
    if settings.DATABASES["default"]["ENGINE"].endswith("postgresql"):
        return
    keep = [item for item in items if item.get_closest_marker("postgres") is None]
    deselected = [item for item in items if item.get_closest_marker("postgres") is not None]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = keep


def pytest_configure(config: pytest.Config) -> None:
    import os

    if os.environ.get("KIPEKEE_TEST_DATABASE") != "postgres":
        return
    import psycopg

    try:
        psycopg.connect(host="127.0.0.1", port=5432, user=os.environ.get("KIPEKEE_PG_USER", "postgres"),
                        dbname="postgres", connect_timeout=3).close()
    except psycopg.OperationalError as exc:
        pytest.exit(
            "KIPEKEE_TEST_DATABASE=postgres needs a PostgreSQL server on 127.0.0.1:5432 with "
            f"trust auth for user postgres (start it: pg_ctlcluster <version> main start): {exc}",
            returncode=2,
        )

SMTP_BACKEND = "kipekee.backends.smtp.EmailBackend"
# Quick in-request retries keep the suite fast; the production default is 1, 2, 4 s.
FAST_NOW_DELAYS = [0.05, 0.1, 0.2]


def smtp_provider(server: LocalSMTPServer, **options: Any) -> dict[str, Any]:
    """A KIPEKEE provider entry pointing at a local test server."""
    return {
        "BACKEND": SMTP_BACKEND,
        "OPTIONS": {"host": server.host, "port": server.port, "timeout": 2, **options},
    }


def subprocess_env(kipekee: dict[str, Any]) -> dict[str, str]:
    """The environment of a Django process started by a test: the test's settings module,
    ``kipekee`` as its KIPEKEE, and the test's database (SQLite file or PostgreSQL)."""
    import json
    import os

    from django.db import connection

    name = connection.settings_dict["NAME"]
    database = ({"KIPEKEE_TEST_DATABASE": "postgres", "KIPEKEE_PG_NAME": name}
                if connection.vendor == "postgresql" else {"KIPEKEE_SQLITE_NAME": name})
    return {**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings",
            "KIPEKEE_TEST_SETTINGS": json.dumps(kipekee), "KIPEKEE_LOG_LEVEL": "INFO",
            **database}


def unused_port() -> int:
    """A port on 127.0.0.1 where nothing listens (connection refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(autouse=True)
def _no_thread_engine_left_running():
    """A test that starts the in-process engine (directly, or through a request with
    ENGINE "thread") must not leave it claiming rows in the tests after it."""
    yield
    from kipekee.engines import thread

    engine = thread._engine.current()
    if engine is not None and engine.alive:
        engine.stop()
    thread._engine.set(None)


@pytest.fixture
def kipekee_settings(settings: Any) -> Callable[..., None]:
    """Configure KIPEKEE for one test: ``kipekee_settings(primary=entry, backup=entry, MODE=...)``."""

    def configure(_extra: dict[str, Any] | None = None, **providers: dict[str, Any]) -> None:
        settings.KIPEKEE = {
            "PROVIDERS": providers,
            "NOW_RETRY_DELAYS": FAST_NOW_DELAYS,
            "NOW_TIME_BUDGET": 5,
            "ENGINE": None,
            **(_extra or {}),
        }

    return configure


@pytest.fixture
def sink_provider(smtp_sink: LocalSMTPServer, kipekee_settings: Callable[..., None]) -> LocalSMTPServer:
    """One plain SMTP provider, "primary", in hybrid mode, pointing at ``smtp_sink``."""
    kipekee_settings(primary=smtp_provider(smtp_sink))
    return smtp_sink


def rows() -> int:
    return OutboxEmail.objects.count()
