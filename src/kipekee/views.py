"""Views Kipekee serves: delivery webhooks. Include ``kipekee.urls`` to mount them."""

from __future__ import annotations

from typing import Any

from anymail.utils import get_anymail_setting
from anymail.webhooks.mailtrap import (
    MailtrapTrackingWebhookView as AnymailMailtrapTrackingWebhookView,
)

from . import conf
from .exceptions import ConfigurationError


class MailtrapTrackingWebhookView(AnymailMailtrapTrackingWebhookView):
    """Mailtrap's delivery events, through anymail's view, into Kipekee.

    Anymail checks the request (HTTP basic auth; also Mailtrap's ``Mailtrap-Signature``
    when ``ANYMAIL["MAILTRAP_TRACKING_SECRET"]`` is set), answers 400 to a bad one, and
    sends each normalised event as ``anymail.signals.tracking``; Kipekee's receiver
    (:mod:`kipekee.webhooks`) updates the outbox row and the suppression list.

    The basic-auth secrets are ``KIPEKEE["WEBHOOK_SECRET"]`` (or anymail's
    ``WEBHOOK_SECRET``): ``"user:password"``, or a list to rotate (add the new one, change
    the URL at Mailtrap, then drop the old one). Without one the view refuses to run:
    an open webhook would let anyone put addresses on the suppression list.
    """

    def __init__(self, **kwargs: Any) -> None:
        secrets = list(conf.get().webhook_secrets) or get_anymail_setting(
            "webhook_secret", default=[])
        if not secrets:
            raise ConfigurationError(
                'Kipekee\'s Mailtrap webhook needs KIPEKEE["WEBHOOK_SECRET"] = "user:password" '
                "(put the same in the webhook URL at Mailtrap: https://user:password@host/...)."
            )
        kwargs.setdefault("webhook_secret", secrets)
        super().__init__(**kwargs)
