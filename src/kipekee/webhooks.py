"""Delivery events from providers (anymail's normalised ``tracking`` signal) into Kipekee.

For every event, once (:class:`~kipekee.models.WebhookEvent` is unique per provider and
event id, so a provider's retry or a replay changes nothing the second time):

- the outbox row it is about (found by the provider's message id, else by the
  ``kipekee_id`` custom variable) records it in ``delivery``; a hard bounce or a
  rejection also puts the recipient in ``refused``;
- a hard bounce, a spam complaint or an unsubscribe puts the recipient on the
  suppression list, which every later send respects.

All of it happens in one transaction: if anything fails the view answers 500, nothing is
kept, and the provider sends the event again later.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

from anymail.signals import AnymailTrackingEvent, EventType, tracking
from django.db import IntegrityError, transaction
from django.dispatch import receiver
from django.utils import timezone

from . import outbox, suppression
from .addresses import canonical
from .models import OutboxEmail, ProviderMessage, SuppressionReason, WebhookEvent

logger = logging.getLogger("kipekee.webhooks")

#: Events that put the recipient on the suppression list, and why.
SUPPRESSING = {
    EventType.BOUNCED: SuppressionReason.HARD_BOUNCE,
    EventType.COMPLAINED: SuppressionReason.SPAM_COMPLAINT,
    EventType.UNSUBSCRIBED: SuppressionReason.UNSUBSCRIBE,
}
#: Events that mean the recipient did not get the message.
REFUSING = {EventType.BOUNCED, EventType.REJECTED}


@receiver(tracking, dispatch_uid="kipekee.webhooks.on_tracking")
def on_tracking(sender: Any, event: AnymailTrackingEvent, esp_name: str, **kwargs: Any) -> None:
    handle(event, provider=esp_name)


def handle(event: AnymailTrackingEvent, *, provider: str) -> bool:
    """Apply one event; False if it was seen before (nothing changes then)."""
    recipient = canonical(event.recipient or "")
    occurred = event.timestamp or timezone.now()
    detail = event.mta_response or (str(event.reject_reason) if event.reject_reason else "")
    with transaction.atomic():
        try:
            with transaction.atomic():
                record = WebhookEvent.objects.create(
                    provider=provider, event_id=_event_id(event, recipient),
                    event=str(event.event_type), recipient=recipient,
                    message_id=event.message_id or "", detail=detail, occurred_at=occurred,
                )
        except IntegrityError:
            logger.info("%s event %s seen before: ignored", provider, event.event_id)
            return False
        email_id = _email_for(event)
        if email_id is not None:
            WebhookEvent.objects.filter(pk=record.pk).update(email_id=email_id)
            outbox.record_delivery_event(
                email_id, recipient=recipient, event=str(event.event_type), at=occurred,
                detail=detail, refused=event.event_type in REFUSING)
        reason = SUPPRESSING.get(event.event_type)
        if reason is not None and recipient:
            suppression.add(recipient, reason, source=f"{provider} webhook", detail=detail)
            logger.info("%s suppressed (%s, %s webhook)", recipient, reason, provider)
    return True


def _event_id(event: AnymailTrackingEvent, recipient: str) -> str:
    if event.event_id:
        return str(event.event_id)
    # No id from the provider: the event's own facts identify it.
    stamp = event.timestamp.isoformat() if event.timestamp else ""
    key = f"{event.message_id}|{event.event_type}|{recipient}|{stamp}"
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def _email_for(event: AnymailTrackingEvent) -> int | None:
    if event.message_id:
        found = (ProviderMessage.objects.filter(message_id=event.message_id)
                 .values_list("email_id", flat=True).first())
        if found is not None:
            return int(found)
    kipekee_id = (event.metadata or {}).get("kipekee_id")
    if (kipekee_id is not None and str(kipekee_id).isdigit()
            and OutboxEmail.objects.filter(pk=int(kipekee_id)).exists()):
        return int(kipekee_id)
    return None
