"""Delivery webhooks for every ESP anymail supports, mounted by ``kipekee.urls``.

Each view is anymail's own view for that ESP (it checks the request — HTTP basic auth,
the ESP's signature where it signs — and parses the ESP's payload into normalised
events) with :class:`TrackingWebhookMixin` in front, which changes three things:

- **authentication is required**: the view refuses to run unless the request can be
  authenticated, by basic auth (``KIPEKEE["WEBHOOK_SECRET"]``, or anymail's
  ``WEBHOOK_SECRET``) or by the ESP's own signature (Mailgun's signing key, SendGrid's
  verification key, …, in anymail's settings). Anymail only warns; an open webhook would
  let anyone put addresses on the suppression list;
- **all or nothing**: the events of one request are applied in one transaction
  (:func:`kipekee.tracking.apply`); a body that cannot be parsed, or an event that cannot
  be applied, is answered 400 and nothing of it is kept (anymail answers 500, after
  keeping what came before the bad event);
- **a receiver never undoes it**: anymail's ``tracking`` signal is still sent for each
  event after Kipekee recorded them, and what another receiver raises is logged.

Replays change nothing: each event is kept once (:class:`~kipekee.models.WebhookEvent`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from anymail.exceptions import AnymailError, AnymailWebhookValidationFailure
from anymail.signals import AnymailTrackingEvent
from anymail.utils import get_anymail_setting
from anymail.webhooks.amazon_ses import AmazonSESTrackingWebhookView
from anymail.webhooks.brevo import BrevoTrackingWebhookView
from anymail.webhooks.mailersend import MailerSendTrackingWebhookView
from anymail.webhooks.mailgun import MailgunTrackingWebhookView
from anymail.webhooks.mailjet import MailjetTrackingWebhookView
from anymail.webhooks.mailtrap import MailtrapTrackingWebhookView as AnymailMailtrapView
from anymail.webhooks.mandrill import MandrillCombinedWebhookView
from anymail.webhooks.postal import PostalTrackingWebhookView
from anymail.webhooks.postmark import PostmarkTrackingWebhookView
from anymail.webhooks.resend import ResendTrackingWebhookView
from anymail.webhooks.sendgrid import SendGridTrackingWebhookView
from anymail.webhooks.sparkpost import SparkPostTrackingWebhookView
from anymail.webhooks.unisender_go import UnisenderGoTrackingWebhookView
from django.core.exceptions import ImproperlyConfigured
from django.db import DataError
from django.dispatch import Signal
from django.http import HttpRequest, HttpResponse, HttpResponseBadRequest

from . import conf, tracking
from .exceptions import ConfigurationError

logger = logging.getLogger("kipekee.webhooks")

#: What parsing a malformed body raises in anymail's views (JSON errors are ValueErrors;
#: a missing or mistyped field a KeyError, TypeError, AttributeError …; Amazon SES's view
#: raises AnymailAPIError), and what applying a bad event raises.
MALFORMED = (ValueError, LookupError, TypeError, AttributeError, ArithmeticError,
             AnymailError, ImproperlyConfigured, DataError)


class _LoggedReceivers:
    """Sends a signal to its receivers; what one raises is logged, not raised."""

    def __init__(self, signal: Signal) -> None:
        self.signal = signal

    def send(self, sender: Any, **named: Any) -> list[tuple[Any, Any]]:
        results = self.signal.send_robust(sender, **named)
        for receiver_, result in results:
            if isinstance(result, Exception):
                logger.error("Receiver %r of anymail's %s signal raised; the events were "
                             "recorded by Kipekee all the same", receiver_, named.get("esp_name"),
                             exc_info=result)
        return results


class TrackingWebhookMixin:
    """In front of an anymail tracking webhook view: see the module docstring."""

    #: Read by :func:`kipekee.tracking.on_tracking`: these events are applied already.
    applies_events = True

    # Provided by anymail's view behind this mixin.
    basic_auth: Sequence[str]
    warn_if_no_basic_auth: bool
    esp_name: str
    signal: Any

    def __init__(self, **kwargs: Any) -> None:
        secrets = list(conf.get().webhook_secrets) or get_anymail_setting(
            "webhook_secret", default=[], kwargs=dict(kwargs))
        if secrets:
            kwargs.setdefault("webhook_secret", secrets)
        super().__init__(**kwargs)
        if not self.basic_auth and self.warn_if_no_basic_auth:
            raise ConfigurationError(
                f"Kipekee's {self.esp_name} webhook needs authentication: set "
                'KIPEKEE["WEBHOOK_SECRET"] = "user:password" and put the same in the webhook '
                "URL at the provider (https://user:password@host/...), or configure the "
                f"provider's webhook signature in anymail's settings if {self.esp_name} "
                "signs its webhooks.")

    def post(self, request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        try:
            response: HttpResponse = super().post(request, *args, **kwargs)  # type: ignore[misc,unused-ignore]
        except AnymailWebhookValidationFailure:
            raise  # Django answers 400 and logs it to django.security
        except MALFORMED as exc:
            logger.warning("%s webhook: malformed request, nothing recorded: %s: %s",
                           self.esp_name, type(exc).__name__, exc)
            return HttpResponseBadRequest(
                f"Malformed {self.esp_name} webhook: {type(exc).__name__}",
                content_type="text/plain")
        return response

    def parse_events(self, request: HttpRequest) -> list[Any]:
        events = list(super().parse_events(request))  # type: ignore[misc,unused-ignore]
        tracking.apply([e for e in events if isinstance(e, AnymailTrackingEvent)],
                       provider=self.esp_name)
        # Only now, with the events recorded, anymail's view sends them to receivers.
        self.signal = _LoggedReceivers(self.signal)
        return events


class AmazonSESWebhook(TrackingWebhookMixin, AmazonSESTrackingWebhookView):
    """Amazon SES (through an SNS topic; basic auth required)."""


class BrevoWebhook(TrackingWebhookMixin, BrevoTrackingWebhookView):
    """Brevo."""


class MailerSendWebhook(TrackingWebhookMixin, MailerSendTrackingWebhookView):
    """MailerSend (signed)."""


class MailgunWebhook(TrackingWebhookMixin, MailgunTrackingWebhookView):
    """Mailgun (signed with the webhook signing key)."""


class MailjetWebhook(TrackingWebhookMixin, MailjetTrackingWebhookView):
    """Mailjet."""


class MailtrapWebhook(TrackingWebhookMixin, AnymailMailtrapView):
    """Mailtrap (basic auth; also ``Mailtrap-Signature`` with
    ``ANYMAIL["MAILTRAP_TRACKING_SECRET"]``)."""


class MandrillWebhook(TrackingWebhookMixin, MandrillCombinedWebhookView):
    """Mandrill (signed)."""


class PostalWebhook(TrackingWebhookMixin, PostalTrackingWebhookView):
    """Postal (signed)."""


class PostmarkWebhook(TrackingWebhookMixin, PostmarkTrackingWebhookView):
    """Postmark (basic auth)."""


class ResendWebhook(TrackingWebhookMixin, ResendTrackingWebhookView):
    """Resend (signed through Svix)."""


class SendGridWebhook(TrackingWebhookMixin, SendGridTrackingWebhookView):
    """SendGrid (basic auth, or its signed event webhook)."""


class SparkPostWebhook(TrackingWebhookMixin, SparkPostTrackingWebhookView):
    """SparkPost."""


class UnisenderGoWebhook(TrackingWebhookMixin, UnisenderGoTrackingWebhookView):
    """Unisender Go (signed)."""


#: URL segment → view, for :mod:`kipekee.urls`.
VIEWS: dict[str, type[TrackingWebhookMixin]] = {
    "amazon_ses": AmazonSESWebhook,
    "brevo": BrevoWebhook,
    "mailersend": MailerSendWebhook,
    "mailgun": MailgunWebhook,
    "mailjet": MailjetWebhook,
    "mailtrap": MailtrapWebhook,
    "mandrill": MandrillWebhook,
    "postal": PostalWebhook,
    "postmark": PostmarkWebhook,
    "resend": ResendWebhook,
    "sendgrid": SendGridWebhook,
    "sparkpost": SparkPostWebhook,
    "unisender_go": UnisenderGoWebhook,
}
