"""Delivery events from providers (anymail's normalised ``tracking`` events) into Kipekee.

Anymail's webhook views authenticate and parse each ESP's payload into
:class:`~anymail.signals.AnymailTrackingEvent`; this module never reads an ESP's
payload itself. :func:`apply` takes the events of one webhook request and, for each,
once (:class:`~kipekee.models.WebhookEvent` is unique per provider and event id, so a
provider's retry or a replay changes nothing the second time):

- the outbox row it is about (found by the provider's message id, else by the
  ``kipekee_id`` metadata) records it in ``delivery``; a bounce or a rejection also puts
  the recipient in ``refused``;
- a hard bounce, a spam complaint or an unsubscribe (and a rejection because the address
  bounced, is invalid, complained or unsubscribed before) puts the recipient on the
  suppression list, which every later send respects.

All events of one request are applied in one transaction: an event Kipekee cannot take
(:class:`BadEvent`) rolls back the whole request, so a provider is never told "failed"
about events that were kept.

Kipekee's own views (:mod:`kipekee.webhooks`) call :func:`apply`. For anymail's own URLs
(``include("anymail.urls")``) the :func:`on_tracking` receiver applies each event as
anymail sends it.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from anymail.signals import AnymailTrackingEvent, EventType, RejectReason, tracking
from django.db import IntegrityError, transaction
from django.dispatch import receiver
from django.utils import timezone

from . import outbox, suppression
from .addresses import canonical
from .message import check_address
from .models import OutboxEmail, ProviderMessage, SuppressionReason, WebhookEvent

logger = logging.getLogger("kipekee.webhooks")

#: Events that put the recipient on the suppression list, and why.
SUPPRESSING = {
    EventType.BOUNCED: SuppressionReason.HARD_BOUNCE,
    EventType.COMPLAINED: SuppressionReason.SPAM_COMPLAINT,
    EventType.UNSUBSCRIBED: SuppressionReason.UNSUBSCRIBE,
}
#: A rejection for one of these reasons means the address is known bad at the provider.
SUPPRESSING_REJECTIONS = {
    RejectReason.BOUNCED: SuppressionReason.HARD_BOUNCE,
    RejectReason.INVALID: SuppressionReason.HARD_BOUNCE,
    RejectReason.SPAM: SuppressionReason.SPAM_COMPLAINT,
    RejectReason.UNSUBSCRIBED: SuppressionReason.UNSUBSCRIBE,
}
#: Events that mean the recipient did not get the message.
REFUSING = {EventType.BOUNCED, EventType.REJECTED}


def _ses_soft(event: Mapping[str, Any]) -> bool:
    return str((event.get("bounce") or {}).get("bounceType", "")) in {"Transient",
                                                                     "Undetermined"}


#: Anymail reports some temporary bounces as ``bounced`` (it keeps the ESP's own word in
#: ``esp_event``): these are recorded, but do not suppress the address. One field per ESP,
#: the one its documentation says tells a temporary bounce from a permanent one.
SOFT_BOUNCES: dict[str, Callable[[Mapping[str, Any]], bool]] = {
    "Amazon SES": _ses_soft,  # bounce.bounceType: Permanent | Transient | Undetermined
    "Postmark": lambda e: e.get("Type") == "SoftBounce",
    "SendGrid": lambda e: e.get("type") == "blocked",  # "bounce" is the permanent one
}

_MAX_ID = 255
_MAX_ADDRESS = 254


class BadEvent(ValueError):
    """An event Kipekee cannot apply (a field of the wrong type or size)."""


@receiver(tracking, dispatch_uid="kipekee.tracking.on_tracking")
def on_tracking(sender: Any, event: AnymailTrackingEvent, esp_name: str, **kwargs: Any) -> None:
    """Anymail's ``tracking`` signal, for views Kipekee does not serve itself."""
    if getattr(sender, "applies_events", False):
        return  # Kipekee's own view applied its events before sending the signal
    apply([event], provider=esp_name)


def apply(events: Iterable[AnymailTrackingEvent], *, provider: str) -> int:
    """Apply the events of one webhook request, all or none; how many were new.

    Raises :class:`BadEvent` (nothing kept) for an event that cannot be applied.
    """
    checked = [_checked(event, provider) for event in events]
    applied = 0
    with transaction.atomic():
        for event in checked:
            applied += _apply(event, provider)
    return applied


class _Event:
    """The fields of an anymail event that Kipekee uses, checked."""

    __slots__ = ("event_id", "kind", "recipient", "message_id", "occurred", "detail",
                 "suppress", "refused", "kipekee_id")

    def __init__(self, event: AnymailTrackingEvent, provider: str) -> None:
        kind = _text(event.event_type, "event_type", 32) or EventType.UNKNOWN
        recipient = _text(event.recipient, "recipient", _MAX_ADDRESS)
        if recipient:
            try:
                check_address("recipient", recipient)
            except ValueError as exc:
                raise BadEvent(f"recipient {recipient!r} is not an address: {exc}") from None
            recipient = canonical(recipient)
        self.recipient = recipient
        self.kind = kind
        self.message_id = _text(event.message_id, "message_id", _MAX_ID)
        timestamp = event.timestamp
        if timestamp is not None and not isinstance(timestamp, datetime):
            raise BadEvent(f"timestamp {timestamp!r} is not a time")
        if timestamp is not None and timezone.is_naive(timestamp):
            timestamp = timestamp.replace(tzinfo=UTC)
        self.occurred = timestamp or timezone.now()
        # Free text, for people: taken as it comes.
        self.detail = next((str(v) for v in (event.mta_response, event.description,
                                            event.reject_reason) if v), "")
        event_id = _text(event.event_id, "event_id", None)
        if not event_id or len(event_id) > _MAX_ID:
            # No id from the provider (or one too long to keep): the event's own facts
            # identify it.
            stamp = timestamp.isoformat() if timestamp else ""
            key = event_id or f"{self.message_id}|{kind}|{recipient}|{stamp}"
            event_id = "sha256:" + hashlib.sha256(key.encode()).hexdigest()
        self.event_id = event_id
        self.refused = kind in REFUSING
        reason = SUPPRESSING.get(kind)
        if kind == EventType.BOUNCED and _soft(event, provider):
            reason = None
        if kind == EventType.REJECTED:
            reason = SUPPRESSING_REJECTIONS.get(str(event.reject_reason or ""))
        self.suppress = reason
        metadata = event.metadata if isinstance(event.metadata, Mapping) else {}
        kipekee_id = metadata.get("kipekee_id")
        self.kipekee_id = (int(kipekee_id) if isinstance(kipekee_id, (str, int))
                           and str(kipekee_id).isdigit() and len(str(kipekee_id)) < 19
                           else None)


def _soft(event: AnymailTrackingEvent, provider: str) -> bool:
    is_soft = SOFT_BOUNCES.get(provider)
    raw = event.esp_event
    return bool(is_soft and isinstance(raw, Mapping) and is_soft(raw))


def _text(value: Any, name: str, limit: int | None) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise BadEvent(f"{name} {value!r} is not text")
    if limit is not None and len(value) > limit:
        raise BadEvent(f"{name} is longer than {limit} characters")
    return value


def _checked(event: Any, provider: str) -> _Event:
    if not isinstance(event, AnymailTrackingEvent):
        raise BadEvent(f"{event!r} is not a tracking event")
    return _Event(event, provider)


def _apply(event: _Event, provider: str) -> int:
    try:
        with transaction.atomic():
            record = WebhookEvent.objects.create(
                provider=provider[:50], event_id=event.event_id, event=event.kind,
                recipient=event.recipient, message_id=event.message_id, detail=event.detail,
                occurred_at=event.occurred,
            )
    except IntegrityError:
        logger.info("%s event %s seen before: ignored", provider, event.event_id)
        return 0
    email_id = _email_for(event)
    if email_id is not None:
        WebhookEvent.objects.filter(pk=record.pk).update(email_id=email_id)
        if event.recipient:
            outbox.record_delivery_event(
                email_id, recipient=event.recipient, event=event.kind, at=event.occurred,
                detail=event.detail, refused=event.refused)
    if event.suppress is not None and event.recipient:
        suppression.add(event.recipient, event.suppress, source=f"{provider} webhook",
                        detail=event.detail)
        logger.info("%s suppressed (%s, %s webhook)", event.recipient, event.suppress, provider)
    return 1


def _email_for(event: _Event) -> int | None:
    """The outbox row an event is about: by the provider's id for the message (for this
    recipient first: a batch request may share one id), else by the message's own
    Message-ID (an ESP that reports the MIME header, as Mailgun does when it is set),
    else by the ``kipekee_id`` metadata."""
    if event.message_id:
        ids = ProviderMessage.objects.filter(message_id=event.message_id).order_by("-id")
        found = (ids.filter(recipient=event.recipient).values_list("email_id", flat=True).first()
                 or ids.values_list("email_id", flat=True).first())
        if found is not None:
            return int(found)
        mime_id = event.message_id if event.message_id.startswith("<") else f"<{event.message_id}>"
        found = (OutboxEmail.objects.filter(message_id=mime_id).order_by("-id")
                 .values_list("pk", flat=True).first())
        if found is not None:
            return int(found)
    if event.kipekee_id is not None and OutboxEmail.objects.filter(pk=event.kipekee_id).exists():
        return event.kipekee_id
    return None

