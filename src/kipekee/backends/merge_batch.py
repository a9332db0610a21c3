"""Many identical messages, one recipient each, as one anymail batch send.

A newsletter or an announcement written as one outbox row per recipient gives rows
whose messages differ only in their recipient and Message-ID. Anymail's batch sending
(every ``to`` address gets its own copy) sends them in one API request
where the ESP has a batch or merge API (Postmark's ``/email/batch``, SendGrid's
personalizations, Mailgun's recipient variables, …). ``merge_headers`` (which makes it a
batch send for anymail) keeps each row's own Message-ID, and ``merge_metadata`` its
``kipekee_id``; no ``merge_data`` is needed, the content being the same.

:class:`MergeBatch` offers that through Kipekee's
:class:`~kipekee.delivery.BatchBackend` protocol for any anymail backend that supports
it (:func:`for_backend` asks anymail, once per backend class). Each item carries a
``key``, the digest of its message without recipient and Message-ID: only items with
the same key share a request.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from email.utils import parseaddr
from typing import Any

from anymail.backends.base import AnymailBaseBackend
from anymail.exceptions import AnymailRecipientsRefused, AnymailUnsupportedFeature
from anymail.message import AnymailStatus
from django.core.mail import EmailMessage

#: Recipients per request: within Postmark's 500 messages per batch, SendGrid's 1,000
#: personalizations and Mailgun's 1,000 recipients.
MAX_MESSAGES = 500
_REFUSED = {"rejected", "invalid", "failed"}
_supported: dict[type, bool] = {}


@dataclass(frozen=True)
class MergeItem:
    """One row's message, ready to share a request with others of the same ``key``."""

    message: EmailMessage
    key: str | None  # None: cannot share (several recipients, cc or bcc)
    address: str
    message_id: str
    size: int = 1


def _digest(message: EmailMessage) -> str:
    headers = {k.lower(): v for k, v in message.extra_headers.items()
               if k.lower() != "message-id"}
    parts = {
        "from": message.from_email, "subject": message.subject, "body": message.body,
        "subtype": message.content_subtype, "reply_to": list(message.reply_to),
        "headers": sorted(headers.items()),
        "alternatives": [[str(c), m] for c, m in getattr(message, "alternatives", [])],
        "attachments": [hashlib.sha256(repr(a).encode()).hexdigest()
                        for a in message.attachments],
        "metadata": sorted((getattr(message, "kipekee_metadata", None) or {}).items()),
        "template": getattr(message, "kipekee_template", ""),
    }
    return hashlib.sha256(json.dumps(parts, default=str, sort_keys=True).encode()).hexdigest()


class MergeBatch:
    """An anymail backend seen as a :class:`~kipekee.delivery.BatchBackend`."""

    batch_max_messages = MAX_MESSAGES
    batch_max_bytes = MAX_MESSAGES  # every item counts 1: the content is sent once

    def __init__(self, backend: AnymailBaseBackend) -> None:
        self.backend = backend
        self.esp_name = backend.esp_name

    def send_batch_item(self, message: EmailMessage) -> MergeItem:
        message_id = next((v for k, v in message.extra_headers.items()
                           if k.lower() == "message-id"), "")
        alone = len(message.to) != 1 or message.cc or message.bcc or not message_id
        return MergeItem(message=message, key=None if alone else _digest(message),
                         address=message.to[0] if message.to else "", message_id=message_id)

    def send_batch(self, items: Sequence[MergeItem]) -> list[BaseException | None]:
        """Send ``items`` (same key, distinct recipients) as one batch send; per item
        ``None`` (sent, with ``provider_message_ids``) or why its recipient was refused."""
        if len({item.address.lower() for item in items}) != len(items) or any(
                item.key != items[0].key or item.key is None for item in items):
            raise ValueError("a merge batch needs one key and distinct recipients")
        merged = copy.copy(items[0].message)
        merged.extra_headers = {k: v for k, v in merged.extra_headers.items()
                                if k.lower() != "message-id"}
        merged.to = [item.address for item in items]
        addr_specs = [_addr_spec(item.address) for item in items]
        merged.merge_headers = {  # type: ignore[attr-defined]
            a: {"Message-ID": item.message_id} for a, item in zip(addr_specs, items, strict=True)}
        merged.merge_metadata = {  # type: ignore[attr-defined]
            a: {"kipekee_id": str(getattr(item.message, "kipekee_id", ""))}
            for a, item in zip(addr_specs, items, strict=True)}
        try:
            self.backend.send_messages([merged])
        except AnymailRecipientsRefused:
            pass  # every recipient refused: each item gets its own refusal below
        status = getattr(merged, "anymail_status", None)
        recipients = {k.lower(): v for k, v in (status.recipients if status else {}).items()}
        results: list[BaseException | None] = []
        for address, item in zip(addr_specs, items, strict=True):
            one = recipients.get(address.lower())
            item_status = AnymailStatus()
            if one is not None:
                item_status.set_recipient_status({address: one})
            item.message.anymail_status = item_status  # type: ignore[attr-defined]
            if one is None or one.status in _REFUSED:
                results.append(AnymailRecipientsRefused(email_message=item.message,
                                                        backend=self.backend))
                continue
            item.message.provider_message_ids = (  # type: ignore[attr-defined]
                {address: str(one.message_id)} if one.message_id else {})
            item.message.refused_recipients = {}  # type: ignore[attr-defined]
            results.append(None)
        return results

    def classify_error(self, exc: BaseException) -> None:
        return None  # as for the backend itself (kipekee.providers.classify_anymail)


def _addr_spec(address: str) -> str:
    return parseaddr(address)[1] or address


def for_backend(backend: Any) -> MergeBatch | None:
    """A :class:`MergeBatch` over ``backend`` if it is an anymail backend whose ESP takes
    batch sends with per-recipient headers (asked of anymail once per backend class)."""
    if not isinstance(backend, AnymailBaseBackend) or backend.ignore_unsupported_features:
        # (Ignoring unsupported features would drop the per-recipient Message-IDs.)
        return None
    cls = type(backend)
    if cls not in _supported:
        probe = EmailMessage("probe", "probe", "probe@example.com",
                             ["a@example.com", "b@example.com"])
        probe.merge_headers = {"a@example.com": {"Message-ID": "<a@example.com>"},  # type: ignore[attr-defined]
                               "b@example.com": {"Message-ID": "<b@example.com>"}}
        probe.merge_metadata = {"a@example.com": {"kipekee_id": "1"},  # type: ignore[attr-defined]
                                "b@example.com": {"kipekee_id": "2"}}
        try:
            payload = backend.build_message_payload(probe, {})
            serialize = getattr(payload, "serialize_data", None)
            if serialize is not None:
                serialize()  # some ESPs refuse batch features only here (Postmark)
            _supported[cls] = bool(payload.is_batch())
        except AnymailUnsupportedFeature:
            _supported[cls] = False
    return MergeBatch(backend) if _supported[cls] else None
