"""Drop-in email backend: Django's ``send_mail`` and ``EmailMessage.send()`` go through
the outbox, unchanged.

Django 5.2::

    EMAIL_BACKEND = "kipekee.backend.EmailBackend"

Django 6.1 (``MAILERS``)::

    MAILERS = {"default": {"BACKEND": "kipekee.backend.EmailBackend",
                           "OPTIONS": {"mode": "hybrid"}}}

``send_messages`` returns how many messages the outbox accepted (delivery outcomes are
on the rows; a message whose every recipient is on the suppression list is not counted),
and leaves each message's :class:`~kipekee.dispatch.Receipt` on ``message.kipekee_receipt``. Bad input raises ``InvalidMessage`` and nothing of that call is written.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from django.core.mail import EmailMessage
from django.core.mail.backends.base import BaseEmailBackend
from django.db import transaction

from . import conf
from .exceptions import ConfigurationError, InvalidMessage, RoutingLoop


class EmailBackend(BaseEmailBackend):
    def __init__(self, *, mode: str | None = None, provider: str = "", alias: str | None = None,
                 fail_silently: bool = False, username: str | None = None,
                 password: str | None = None, **kwargs: Any) -> None:
        # Django 5.2's send_mail() passes username/password (None unless auth_user is
        # given). Credentials belong to the providers in KIPEKEE, not to this call.
        if username is not None or password is not None:
            raise ConfigurationError(
                "kipekee.backend.EmailBackend takes no credentials: set them in the "
                'provider OPTIONS of KIPEKEE["PROVIDERS"].'
            )
        if fail_silently:
            # An outbox records failures; it never hides them.
            raise ConfigurationError("kipekee.backend.EmailBackend does not fail silently.")
        if kwargs:
            raise ConfigurationError(
                f"kipekee.backend.EmailBackend: unknown options {sorted(kwargs)} "
                "(it takes 'mode' and 'provider')."
            )
        super().__init__()
        self.alias = alias
        if mode is not None and mode not in conf.MODES:
            raise ConfigurationError(f"kipekee.backend.EmailBackend: mode must be one of {conf.MODES}.")
        self.mode = mode
        self.provider = provider

    def send_messages(self, email_messages: Sequence[EmailMessage]) -> int:
        from .delivery import in_delivery
        from .dispatch import submit
        from .message import validate

        if in_delivery():
            raise RoutingLoop(
                "A Kipekee provider sent through Django's default email backend, which is "
                "Kipekee's drop-in backend: give the provider a real BACKEND."
            )
        if not email_messages:
            return 0
        for message in email_messages:  # all or nothing: check every one first
            validate(message)
        count = 0
        with transaction.atomic():
            for message in email_messages:
                if not message.recipients():
                    raise InvalidMessage("The message has no recipients.")
                receipt = submit(message, mode=self.mode, provider=self.provider)
                # The caller can read what happened (and why it was not sent) here.
                message.kipekee_receipt = receipt  # type: ignore[attr-defined]
                if not receipt.suppressed:  # every recipient suppressed: not "sent"
                    count += 1
        return count
