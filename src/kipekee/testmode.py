"""Kipekee under Django's test runner: what it delivers lands in ``django.core.mail.outbox``.

Django's test runner (``manage.py test``; pytest-django does the same) replaces the
project's email backend with its locmem backend for the whole run, so that no test sends
real email and each test reads what was sent from ``django.core.mail.outbox``; a test that
sets ``EMAIL_BACKEND`` itself gets the backend it sets. Kipekee does the same with its
providers: while Django's test environment is set up, the providers of the settings file
(``KIPEKEE["PROVIDERS"]``) deliver through Django's locmem backend instead of their own
``BACKEND``; a test that sets ``KIPEKEE`` itself (``override_settings``, pytest-django's
``settings`` fixture) gets the providers it sets — a local SMTP server, a provider that
is down. Everything before delivery is unchanged — the outbox row, the mode, retries,
the receipt — so a test runs what production runs, up to the wire. This holds for
``kipekee.send``, ``kipekee.notify`` and Django's ``send_mail()`` through the drop-in.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from types import ModuleType
from typing import Any

from django.conf import UserSettingsHolder, settings
from django.core.mail import EmailMessage
from django.core.mail.backends import locmem
from django.core.mail.backends.base import BaseEmailBackend

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


def set_by_a_test() -> bool:
    """Whether ``KIPEKEE`` comes from a test's ``override_settings``, not the settings file.

    Each ``override_settings`` wraps the settings in a ``UserSettingsHolder`` over the
    previous ones; ``settings.configure()`` makes one over Django's global defaults (a
    module), which is the settings "file" of a configured project, not a test's.
    """
    holder: Any = getattr(settings, "_wrapped", None)
    while isinstance(holder, UserSettingsHolder) and not isinstance(
            holder.default_settings, ModuleType):
        if "KIPEKEE" in holder.__dict__ or "KIPEKEE" in holder._deleted:
            return True
        holder = holder.default_settings
    return False


def active() -> bool:
    """Deliver to ``django.core.mail.outbox`` instead of through the providers?"""
    return django_test_environment() and not set_by_a_test()


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
