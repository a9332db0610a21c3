"""Drop-in email backend: Django's ``send_mail`` and ``EmailMessage.send()`` go through
the outbox, unchanged.

Django 5.2 and 6.0::

    EMAIL_BACKEND = "kipekee.backend.EmailBackend"

Django 6.1 (``MAILERS``; ``EMAIL_BACKEND`` is deprecated there)::

    MAILERS = {"default": {"BACKEND": "kipekee.backend.EmailBackend",
                           "OPTIONS": {"mode": "hybrid"}}}

It takes Django's keywords as Django's own backends do: ``fail_silently``; an ``alias``
(Django 6.1); unknown keywords — among them the SMTP ones, ``username``/``password``
from ``send_mail(auth_user=...)``, which belong to the providers here — are ignored
(Django 6.1 warns, or raises ``InvalidMailer`` for a ``MAILERS`` entry's OPTIONS).

``send_messages`` takes any iterable, returns how many messages the outbox accepted
(delivery outcomes are on the rows; a message without recipients is skipped, as Django's
SMTP backend does, and one whose every recipient is on the suppression list is not
counted), and leaves each message's :class:`~kipekee.dispatch.Receipt` on
``message.kipekee_receipt``. Bad input raises ``InvalidMessage`` (a ``ValueError``) and
nothing of that call is written.

``fail_silently=True`` (``mail_admins`` from Django's error reporting, …) never raises:
a provider that is down leaves the message queued in the outbox, retried by an engine;
what cannot even be written (bad input, no database) is logged at ERROR and skipped.
"""

from __future__ import annotations

import logging
import threading
import warnings
from collections.abc import Iterable
from typing import Any

import django
from django.core.mail import EmailMessage
from django.core.mail.backends.base import BaseEmailBackend
from django.db import transaction

if django.VERSION >= (6, 1):
    from django.core.mail import InvalidMailer as DjangoInvalidMailer

from . import conf, signals, testmode
from .delivery import in_delivery
from .dispatch import Receipt, submit
from .exceptions import ConfigurationError, InvalidMailer, KipekeeWarning, MailLoop, RoutingLoop
from .message import validate
from .options import SendOptions

logger = logging.getLogger("kipekee.backend")

# Set while a fail_silently error is being logged: a logging handler that mails (Django's
# AdminEmailHandler on the root logger) through this backend, failing again, must not
# log again and again.
_reporting = threading.local()


class EmailBackend(BaseEmailBackend):
    def __init__(self, *, mode: str | None = None, provider: str = "",
                 fail_silently: bool = False, **kwargs: Any) -> None:
        if kwargs.get("username") or kwargs.get("password"):
            # Django's locmem and console backends ignore them silently; here the mail
            # goes out with a provider's account, not this one: say so.
            warnings.warn(
                "kipekee.backend.EmailBackend ignores username/password (send_mail's "
                "auth_user/auth_password): mail goes out through the providers of "
                'KIPEKEE["PROVIDERS"], with their credentials.',
                KipekeeWarning, stacklevel=2,
            )
        if django.VERSION >= (6, 1):
            # alias, and unknown keywords: an InvalidMailer for a MAILERS entry's OPTIONS,
            # ignored with Django's deprecation warning otherwise.
            try:
                super().__init__(**kwargs)
            except DjangoInvalidMailer as exc:
                raise InvalidMailer(str(exc)) from None  # also a ConfigurationError
        else:
            super().__init__()
            self.alias = kwargs.pop("alias", None)
            if kwargs and self.alias is not None:
                # Django passes no alias before 6.1: whoever does gets 6.1's check (as
                # from Kipekee's SMTP backend).
                raise InvalidMailer(
                    f"Unknown options {', '.join(map(repr, sorted(kwargs)))}.", alias=self.alias)
            # Without an alias Django's backends ignore unknown keywords; so does this.
        if mode is not None and mode not in conf.MODES:
            raise ConfigurationError(
                f"kipekee.backend.EmailBackend: mode must be one of {conf.MODES}, not {mode!r}.")
        self.mode = mode
        self.provider = provider
        self.fail_silently = fail_silently

    def send_messages(self, email_messages: Iterable[EmailMessage]) -> int:
        if in_delivery():
            raise RoutingLoop(
                "A Kipekee provider sent through Django's default email backend, which is "
                "Kipekee's drop-in backend: give the provider a real BACKEND."
            )
        # Any iterable, once (a generator is used up by the first pass).
        messages = [message for message in email_messages if message.recipients()]
        if not messages:
            return 0
        if signals.report_depth() >= 2:
            loop = MailLoop(
                "Not queued: a report of a signal receiver's error about a mail that itself "
                "reports such an error (its delivery would raise again, without end); "
                "the error is in the log.")
            if not self.fail_silently:
                raise loop
            for message in messages:
                self._report_silenced(message, loop)
            return 0
        if not self.fail_silently:
            for message in messages:  # all or nothing: check every one first
                validate(message)
            with transaction.atomic():
                return sum(self._submit(message) for message in messages)
        count = 0
        for message in messages:  # each on its own: one that fails costs only itself
            try:
                with transaction.atomic():
                    validate(message)
                    count += self._submit(message)
            except Exception:  # noqa: BLE001 - fail_silently: logged below, never raised
                self._report_silenced(message)
        return count

    def _submit(self, message: EmailMessage) -> int:
        """Enqueue one validated message; 1 if it counts as sent."""
        depth = signals.report_depth()  # a receiver's error being reported: say so
        receipt: Receipt = submit(message, SendOptions(
            mode=self.mode, provider=self.provider,
            metadata={signals.REPORT_DEPTH: depth} if depth else None))
        # The caller can read what happened (and why it was not sent) here.
        message.kipekee_receipt = receipt  # type: ignore[attr-defined]
        if testmode.active():
            testmode.remember_mailer(receipt.id, self.alias)
        return 0 if receipt.suppressed else 1  # every recipient suppressed: not "sent"

    @staticmethod
    def _report_silenced(message: EmailMessage, error: BaseException | None = None) -> None:
        if getattr(_reporting, "active", False):
            return  # the error being logged below came back here: once is enough
        _reporting.active = True
        try:
            logger.error("Email %r not accepted into the outbox (fail_silently): "
                         "nothing was written for it", message.subject,
                         exc_info=error if error is not None else True)
        finally:
            _reporting.active = False
