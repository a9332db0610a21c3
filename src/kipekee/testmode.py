"""Kipekee under Django's test runner: what it delivers lands in ``django.core.mail.outbox``.

Django's test runner (``manage.py test``; pytest-django does the same) replaces the email
backend with its locmem backend for the whole run, so that no test sends real email and
each test reads what was sent from ``django.core.mail.outbox``. Kipekee does the same
with its providers: while Django's test environment is set up, every provider of
``KIPEKEE["PROVIDERS"]`` delivers through Django's locmem backend instead of its own
``BACKEND``. Everything before that is unchanged — the outbox row, the mode, retries,
the receipt — so a test runs what production runs, up to the wire. This holds for
``kipekee.send``, ``kipekee.notify`` and Django's ``send_mail()`` through the drop-in.

For integration tests against real (local) servers — Kipekee's own test suite sends to
``kipekee.testing.LocalSMTPServer`` — :func:`deliver_through_providers` keeps the
configured providers, as a context manager or a decorator.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from django.core.mail import EmailMessage
from django.core.mail.backends import locmem
from django.core.mail.backends.base import BaseEmailBackend

_lock = threading.Lock()
# None: follow Django's test environment; True/False: forced (deliver_through_providers).
_forced: bool | None = None
# Outbox row id -> the alias of the drop-in (a MAILERS entry) that accepted it, for
# locmem's ``sent_using`` (Django 6.1). Only written while the test mode is active.
_mailers: dict[int, str | None] = {}


def django_test_environment() -> bool:
    """True between Django's ``setup_test_environment()`` and its teardown.

    Read from ``django.test.utils`` only when something imported it (the test runner
    did, if it is set up): nothing is imported in production. ``_TestState.saved_data``
    is what Django itself checks to refuse a second setup.
    """
    utils = sys.modules.get("django.test.utils")
    state = getattr(utils, "_TestState", None)
    return state is not None and hasattr(state, "saved_data")


def active() -> bool:
    """Deliver to ``django.core.mail.outbox`` instead of through the providers?"""
    return django_test_environment() if _forced is None else _forced


@contextmanager
def deliver_through_providers() -> Iterator[None]:
    """Deliver through the configured providers even under Django's test runner.

    For tests that check real delivery, e.g. to a ``kipekee.testing.LocalSMTPServer``.
    Process-wide (engine threads deliver too) while it is entered.
    """
    global _forced
    with _lock:
        previous, _forced = _forced, False
    try:
        yield
    finally:
        with _lock:
            _forced = previous


def remember_mailer(row_id: int, alias: str | None) -> None:
    """The drop-in mailer ``alias`` accepted outbox row ``row_id`` (see ``sent_using``)."""
    _mailers[row_id] = alias


class OutboxBackend(BaseEmailBackend):
    """What every provider becomes in the test mode: Django's locmem backend.

    A message the drop-in accepted is marked as sent using the drop-in's ``MAILERS``
    alias (``sent_using``, Django 6.1), as Django's locmem backend in its place would mark
    it; other mail (``kipekee.send``) as sent using none.
    """

    def send_messages(self, email_messages: Sequence[EmailMessage]) -> int:
        count = 0
        for message in email_messages:
            alias = _mailers.pop(getattr(message, "kipekee_id", None), None)  # type: ignore[arg-type]
            count += _locmem(alias).send_messages([message])
        return count


def _locmem(alias: str | None) -> Any:
    # Django before 6.1 takes no alias (its BaseEmailBackend ignores it).
    return locmem.EmailBackend(alias=alias) if alias is not None else locmem.EmailBackend()
