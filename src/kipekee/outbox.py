"""The outbox: enqueue, claim and every status change. The only code that writes status.

Each transition is one conditional UPDATE (``WHERE status = <expected>``), so two engines
can never both own a row. Results are fenced by the attempt number: a stale engine whose
lease expired cannot overwrite the result of a newer attempt.

Status machine::

    queued ──claim──▶ sending ──▶ sent
      │                  │ ▲
      │                  ▼ │claim
      │               deferred ──▶ (claim) …
      │                  │
      ▼                  ▼
    cancelled          failed

    suppressed: every recipient is on the suppression list, found when the row is
    written (``enqueue``) or when it is about to be sent (``sending → suppressed``).
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import TYPE_CHECKING, Any

from django.db import IntegrityError, router, transaction
from django.db.models import F, Q
from django.utils import timezone

from . import conf, signals
from .message import make_message_id, to_fields, validate
from .models import (
    WAITING_STATUSES,
    Attachment,
    Attempt,
    ErrorKind,
    OutboxEmail,
    ProviderMessage,
    Status,
)

if TYPE_CHECKING:
    from django.core.mail import EmailMessage

    from .delivery import Outcome

logger = logging.getLogger("kipekee.outbox")


def db_for_write() -> str:
    return router.db_for_write(OutboxEmail)


def enqueue(
    message: EmailMessage,
    *,
    mode: str,
    idempotency_key: str | None = None,
    send_at: datetime | None = None,
    provider: str = "",
    template: str = "",
    metadata: dict[str, Any] | None = None,
    using: str | None = None,
) -> tuple[OutboxEmail, bool]:
    """Write ``message`` to the outbox in the caller's transaction.

    Returns ``(row, created)``. With an ``idempotency_key`` that is already in the
    outbox, returns the first row and ``created=False`` and writes nothing. Raises
    ``InvalidMessage`` / ``UnknownProvider`` before writing anything.
    """
    validate(message)
    if provider:
        conf.get().provider(provider)  # raises UnknownProvider at the call site
    if send_at is not None and timezone.is_naive(send_at):
        from .exceptions import InvalidMessage

        raise InvalidMessage("send_at must be an aware datetime.")
    fields, attachments = to_fields(message)
    headers: dict[str, str] = fields.pop("headers")
    message_id = _pop_header(headers, "Message-ID") or make_message_id(
        fields["from_email"], conf.get().message_id_domain
    )
    db = using or db_for_write()
    now = timezone.now()
    row = OutboxEmail(
        **fields,
        headers=headers,
        message_id=message_id,
        mode=mode,
        idempotency_key=idempotency_key or None,
        template=template,
        metadata=metadata or {},
        provider=provider,
        created_at=now,
        due_at=send_at or now,
    )
    # A savepoint: a failure part-way (say, an attachment) leaves nothing behind, and an
    # idempotency collision does not poison the caller's transaction.
    with transaction.atomic(using=db):
        if idempotency_key:
            existing = OutboxEmail.objects.using(db).filter(idempotency_key=idempotency_key).first()
            if existing is not None:
                return existing, False
        _apply_suppressions(row, db)
        try:
            with transaction.atomic(using=db):
                row.save(using=db, force_insert=True)
        except IntegrityError:
            if not idempotency_key:
                raise
            # A concurrent enqueue with the same key committed first.
            return OutboxEmail.objects.using(db).get(idempotency_key=idempotency_key), False
        if attachments:
            Attachment.objects.using(db).bulk_create(
                Attachment(email=row, filename=a.filename, mimetype=a.mimetype,
                           content=a.content, content_id=a.content_id)
                for a in attachments
            )
    if row.status == Status.SUPPRESSED:
        signals.suppressed.send(sender=OutboxEmail, email=row, outcome=None)
    else:
        signals.queued.send(sender=OutboxEmail, email=row)
    return row, True


def _apply_suppressions(row: OutboxEmail, db: str) -> None:
    """Take suppressed recipients off a new row; with none left, it is ``suppressed``."""
    from . import suppression

    refused = suppression.check(row.recipients, using=db)
    if not refused:
        return
    row.to = [a for a in row.to if a not in refused]
    row.cc = [a for a in row.cc if a not in refused]
    row.bcc = [a for a in row.bcc if a not in refused]
    row.refused = refused
    if not row.recipients:
        row.status = Status.SUPPRESSED
        row.last_error = "not sent, every recipient is on the suppression list: " + "; ".join(
            f"{a} ({why})" for a, why in refused.items())


def _pop_header(headers: dict[str, str], name: str) -> str:
    for key in list(headers):
        if key.lower() == name.lower():
            return headers.pop(key)
    return ""


def claim(pk: int, *, using: str | None = None) -> OutboxEmail | None:
    """Take one row for sending if it is due (or its lease expired); ``None`` if not.

    Sets ``sending``, a lease, and counts the attempt.
    """
    db = using or db_for_write()
    now = timezone.now()
    claimed = (
        OutboxEmail.objects.using(db)
        .filter(pk=pk)
        .filter(
            Q(status__in=WAITING_STATUSES, due_at__lte=now)
            | Q(status=Status.SENDING, lease_until__lt=now)
        )
        .update(status=Status.SENDING, lease_until=now + conf.get().lease,
                attempts=F("attempts") + 1)
    )
    if not claimed:
        return None
    return OutboxEmail.objects.using(db).get(pk=pk)


def mark_sent(row: OutboxEmail, outcome: Outcome) -> bool:
    """Record a successful attempt: ``sending → sent``, with the provider's message ids."""
    return _finish(row, outcome, status=Status.SENT, changes={
        "sent_at": outcome.finished_at, "sent_by": outcome.provider,
        "error_kind": "", "last_error": "", "refused": outcome.refused,
    }, signal=signals.sent)


def suppress(row: OutboxEmail, outcome: Outcome) -> bool:
    """Every recipient was suppressed after the row was queued: ``sending → suppressed``."""
    return _finish(row, outcome, status=Status.SUPPRESSED, changes={
        "error_kind": "", "last_error": outcome.error, "refused": outcome.refused,
    }, signal=signals.suppressed)


def defer(row: OutboxEmail, outcome: Outcome, *, due_at: datetime) -> bool:
    """Record a transient failure: ``sending → deferred`` until ``due_at``."""
    return _finish(row, outcome, status=Status.DEFERRED, changes={
        "due_at": due_at, "error_kind": outcome.kind, "last_error": outcome.error,
        "refused": outcome.refused,
    }, signal=signals.deferred)


def fail(row: OutboxEmail, outcome: Outcome) -> bool:
    """Record a final failure: ``sending → failed``."""
    return _finish(row, outcome, status=Status.FAILED, changes={
        "error_kind": outcome.kind or ErrorKind.PERMANENT, "last_error": outcome.error,
        "refused": outcome.refused,
    }, signal=signals.failed)


def _finish(row: OutboxEmail, outcome: Outcome, *, status: str, changes: dict[str, Any],
            signal: Any) -> bool:
    db = row._state.db or db_for_write()
    with transaction.atomic(using=db):
        # Fenced by the attempt number: only the attempt that holds the row may finish it.
        updated = (
            OutboxEmail.objects.using(db)
            .filter(pk=row.pk, status=Status.SENDING, attempts=row.attempts)
            .update(status=status, lease_until=None, **changes)
        )
        if not updated:
            logger.warning(
                "Result of attempt %s for outbox email %s not recorded: the row moved on "
                "(lease expired and another engine took it, or a person changed it).",
                row.attempts, row.pk,
            )
            return False
        Attempt.objects.using(db).create(
            email=row, number=row.attempts, provider=outcome.provider,
            started_at=outcome.started_at, finished_at=outcome.finished_at,
            outcome="sent" if outcome.ok else ("suppressed" if outcome.suppressed else outcome.kind),
            code=outcome.code, error=outcome.error, refused=outcome.refused,
        )
        if outcome.provider_message_ids:
            ProviderMessage.objects.using(db).bulk_create(
                [ProviderMessage(email=row, provider=outcome.provider, message_id=mid,
                                 recipient=recipient)
                 for recipient, mid in outcome.provider_message_ids.items()],
                # A sandbox gives one id for all recipients; a resend may repeat one.
                ignore_conflicts=True,
            )
    row.status = status
    row.lease_until = None
    for name, value in changes.items():
        setattr(row, name, value)
    signal.send(sender=OutboxEmail, email=row, outcome=outcome)
    return True


def cancel(pk: int, *, using: str | None = None) -> bool:
    """A person cancels a message that has not gone out: ``queued|deferred → cancelled``."""
    db = using or db_for_write()
    updated = (
        OutboxEmail.objects.using(db)
        .filter(pk=pk, status__in=WAITING_STATUSES)
        .update(status=Status.CANCELLED, lease_until=None)
    )
    if updated:
        signals.cancelled.send(sender=OutboxEmail, email=OutboxEmail.objects.using(db).get(pk=pk))
    return bool(updated)


def record_delivery_event(email_id: int, *, recipient: str, event: str, at: datetime,
                          detail: str = "", refused: bool = False,
                          using: str | None = None) -> bool:
    """Note what a provider reported after sending (a webhook) on the row.

    ``delivery[recipient]`` keeps the latest event by its time; with ``refused`` (a hard
    bounce, a rejection) the recipient is also added to ``refused``, so the receipt shows
    it. The status stays as it is: the row was sent, and that is what happened.
    """
    db = using or db_for_write()
    with transaction.atomic(using=db):
        row = OutboxEmail.objects.using(db).select_for_update().filter(pk=email_id).first()
        if row is None:
            return False
        delivery = dict(row.delivery)
        previous = delivery.get(recipient)
        if previous is None or previous.get("at", "") <= at.isoformat():
            delivery[recipient] = {"event": event, "at": at.isoformat(), "detail": detail}
        changes: dict[str, Any] = {"delivery": delivery}
        if refused:
            changes["refused"] = {**row.refused, recipient: detail or event}
        OutboxEmail.objects.using(db).filter(pk=email_id).update(**changes)
    return True
