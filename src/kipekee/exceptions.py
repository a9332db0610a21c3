"""Kipekee's exceptions.

Two separate trees, on purpose (as django-anymail does):

- ``InvalidMessage`` (a ``ValueError``) is raised at the call site for bad input — a
  header with CR/LF, an invalid address, a missing template or variable. Nothing is
  written when it is raised.
- ``ConfigurationError`` (an ``ImproperlyConfigured``) is raised for settings that cannot
  work. It sits outside ``InvalidMessage`` so that code catching bad input never swallows
  a broken deployment.

Delivery failures are not exceptions for the caller: they are recorded on the outbox row
and readable on the ``Receipt``.
"""

from __future__ import annotations

import django
from django.core.exceptions import ImproperlyConfigured


class KipekeeError(Exception):
    """Base class of every exception Kipekee raises itself."""


class KipekeeWarning(UserWarning):
    """Something Kipekee did differently from what the call asked, on purpose."""


class InvalidMessage(KipekeeError, ValueError):
    """The message cannot be accepted into the outbox as given."""


class TemplateError(InvalidMessage):
    """A template of the message is missing or refers to a variable the context lacks."""


class ConfigurationError(KipekeeError, ImproperlyConfigured):
    """The KIPEKEE setting (or a provider it names) cannot work."""


if django.VERSION >= (6, 1):
    from django.core.mail import InvalidMailer as _DjangoInvalidMailer
else:

    class _DjangoInvalidMailer(ImproperlyConfigured):  # type: ignore[no-redef]
        # Django 6.1's, for older Djangos (which have no MAILERS: the alias is a
        # Kipekee provider's).
        def __init__(self, msg: str, *, alias: str | None = None) -> None:
            super().__init__(f"{alias!r}: {msg}" if alias is not None else msg)


class InvalidMailer(ConfigurationError, _DjangoInvalidMailer):
    """A backend's OPTIONS cannot work: Django 6.1's ``InvalidMailer`` (raised where
    Django raises it, with Django's message) and a ``ConfigurationError``."""

    def __init__(self, msg: str, *, alias: str | None = None) -> None:
        _DjangoInvalidMailer.__init__(self, msg, alias=alias)


class UnknownProvider(ConfigurationError, KeyError):
    """A provider alias that is not in ``KIPEKEE["PROVIDERS"]``."""

    def __init__(self, alias: str, known: list[str]) -> None:
        self.alias = alias
        names = ", ".join(repr(k) for k in known) or "none are configured"
        super().__init__(f"Unknown Kipekee provider {alias!r} (known: {names}).")

    def __str__(self) -> str:  # KeyError would otherwise repr() the message
        return str(self.args[0])


class RoutingLoop(ConfigurationError):
    """A provider's backend sends back into Kipekee's outbox instead of delivering."""


class MailLoop(KipekeeError):
    """A mail reporting a signal receiver's error about a mail that itself reports such
    an error (Django's AdminEmailHandler through the drop-in backend): each report's
    delivery would raise again, without end. Not queued; the error is logged."""


class UnknownMailingList(InvalidMessage):
    """``mailing_list=`` names no :class:`~kipekee.models.MailingList`: refused, because
    a misspelt list has no unsubscriptions and would mail everyone who left the real one."""


class InvalidToken(KipekeeError, ValueError):
    """An unsubscribe token that was altered, signed with another key, or has expired."""
