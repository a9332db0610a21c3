"""Under Django's test runner, Kipekee delivers to ``django.core.mail.outbox``.

Django's runner replaces the email backend with its locmem backend for every test run;
Kipekee does the same with its providers (kipekee.testmode). A project's own test suite,
run by Django's runner in a separate process as ``manage.py test`` runs it, finds the
mail of kipekee.send, kipekee.notify and send_mail (through the drop-in) in
``mail.outbox``, and the project's real provider is never contacted.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import django
import pytest
from django.core import mail
from django.test import override_settings

import kipekee
from kipekee import providers, testmode
from kipekee.message import from_row
from kipekee.models import OutboxEmail
from kipekee.testmode import OutboxBackend

from .conftest import smtp_provider

ROOT = Path(__file__).resolve().parent.parent


def run_djangos_runner(label: str, smtp_port: int) -> subprocess.CompletedProcess[str]:
    """``manage.py test label`` in a new process, on the project settings of
    tests/django_runner (an in-memory SQLite database, as a new project has)."""
    return subprocess.run(
        [sys.executable, "-m", "django", "test", label, "--noinput",
         "-v", "2", "--settings", "tests.django_runner.settings"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
        env={**os.environ, "KIPEKEE_RUNNER_SMTP_PORT": str(smtp_port),
             "PYTHONWARNINGS": "error::RuntimeWarning"},
    )


def test_a_projects_tests_under_djangos_runner_see_the_mail(smtp_sink):
    completed = run_djangos_runner("tests.django_runner.cases", smtp_sink.port)
    report = completed.stderr
    assert completed.returncode == 0, report
    assert "Ran 9 tests" in report and "\nOK\n" in report, report
    # The project's provider, a real SMTP server, saw nothing.
    assert smtp_sink.connections == 0 and smtp_sink.messages == []


def test_engines_wait_for_table_locks_on_djangos_in_memory_test_database(smtp_sink):
    """Django's runner makes an in-memory SQLite database a shared-cache one, where a
    statement meeting another connection's table lock fails at once ("database table is
    locked"). Claims, due times and records wait for the lock instead: the worker records
    what it sent while another connection holds the outbox table (kipekee.sqlite)."""
    completed = run_djangos_runner("tests.django_runner.locks", smtp_sink.port)
    report = completed.stderr
    assert completed.returncode == 0, report
    assert "Ran 3 tests" in report and "\nOK\n" in report, report
    assert smtp_sink.connections == 0


def test_the_mode_follows_djangos_test_environment_and_the_settings_file(settings, smtp_sink):
    """pytest-django sets Django's test environment up, as Django's runner does: the
    providers of the settings file deliver to mail.outbox; providers a test sets are used
    as set (as Django uses an EMAIL_BACKEND a test sets)."""
    assert testmode.django_test_environment()
    assert testmode.active()  # tests/settings.py's KIPEKEE
    settings.KIPEKEE = {"ENGINE": None, "PROVIDERS": {"primary": smtp_provider(smtp_sink)}}
    assert testmode.set_by_a_test() and not testmode.active()
    assert not isinstance(providers.build("primary"), OutboxBackend)
    with override_settings(KIPEKEE={"ENGINE": None, "PROVIDERS": {}}):
        assert not testmode.active()
    del settings.KIPEKEE
    assert not testmode.active()  # deleted by a test: still the test's choice


@pytest.mark.django_db(transaction=True)
def test_the_outbox_backend_marks_what_the_drop_in_accepted(sink_provider):
    """Django 6.1's locmem backend marks each message with the mailer it was sent with
    (``sent_using``): a message the drop-in accepted as ``MAILERS["default"]`` says
    "default", kipekee.send's says None, as Django's own tests expect."""
    first = kipekee.send(subject="via the drop-in", text="b", to="ann@example.com", mode="queue")
    second = kipekee.send(subject="via kipekee.send", text="b", to="ann@example.com", mode="queue")
    testmode.remember_mailer(first.id, "default")
    messages = []
    for receipt in (first, second):
        message = from_row(OutboxEmail.objects.get(pk=receipt.id))
        message.kipekee_id = receipt.id  # as delivery marks it
        messages.append(message)
    mail.outbox = []
    assert OutboxBackend(alias="primary").send_messages(messages) == 2
    assert [m.subject for m in mail.outbox] == ["via the drop-in", "via kipekee.send"]
    if django.VERSION >= (6, 1):
        assert [m.sent_using for m in mail.outbox] == ["default", None]
    assert sink_provider.messages == []
