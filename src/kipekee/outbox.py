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
    cancelled          failed        (suppressed: a recipient is on the suppression list)
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
from .models import WAITING_STATUSES, Attachment, Attempt, ErrorKind, OutboxEmail, Status

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
    signals.queued.send(sender=OutboxEmail, email=row)
    return row, True


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
    """Record a successful attempt: ``sending → sent``."""
    return _finish(row, outcome, status=Status.SENT, changes={
        "sent_at": outcome.finished_at, "sent_by": outcome.provider,
        "error_kind": "", "last_error": "", "refused": outcome.refused,
    }, signal=signals.sent)


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
            outcome="sent" if outcome.ok else outcome.kind, code=outcome.code,
            error=outcome.error, refused=outcome.refused,
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


def retry(pk: int, *, using: str | None = None) -> bool:
    """A person retries a message: ``failed|deferred → queued``, due now.

    The attempt counter is kept (the attempt log goes on numbering), so a row that ran
    out of attempts gets one more try before the retry policy fails it again; an engine
    (or the caller, see :func:`kipekee.dispatch.retry`) takes it from there.
    """
    db = using or db_for_write()
    updated = (
        OutboxEmail.objects.using(db)
        .filter(pk=pk, status__in=(Status.FAILED, Status.DEFERRED))
        .update(status=Status.QUEUED, due_at=timezone.now(), lease_until=None)
    )
    if updated:
        logger.info("Outbox email %s queued again by a person", pk,
                    extra={"kipekee": {"event": "retried", "id": pk}})
    return bool(updated)


#: Fields a resend does not copy: the copy is a new message with its own state.
_STATE_FIELDS = frozenset({
    "id", "status", "mode", "idempotency_key", "message_id", "created_at", "due_at",
    "lease_until", "attempts", "sent_at", "sent_by", "error_kind", "last_error", "refused",
})


def resend(pk: int, *, mode: str = "queue", using: str | None = None) -> OutboxEmail:
    """A person sends a finished message again: a new ``queued`` row, copied from ``pk``.

    The copy has its own Message-ID (it is a new message, not a duplicate receivers
    should drop) and ``metadata["resent_from"] = pk``; attachments are copied. Only rows
    in a final status can be resent (a waiting one would go out twice). Raises
    ``OutboxEmail.DoesNotExist`` or ``InvalidMessage``.
    """
    from .exceptions import InvalidMessage
    from .models import FINAL_STATUSES

    db = using or db_for_write()
    original = OutboxEmail.objects.using(db).get(pk=pk)
    if original.status not in FINAL_STATUSES:
        raise InvalidMessage(
            f"Outbox email {pk} is {original.status}, not finished: it is still going out."
        )
    now = timezone.now()
    copy = OutboxEmail(
        **{f.attname: getattr(original, f.attname) for f in OutboxEmail._meta.concrete_fields
           if f.name not in _STATE_FIELDS},
        mode=mode, created_at=now, due_at=now,
        message_id=make_message_id(original.from_email, conf.get().message_id_domain),
    )
    copy.metadata = {**original.metadata, "resent_from": pk}
    with transaction.atomic(using=db):
        copy.save(using=db, force_insert=True)
        Attachment.objects.using(db).bulk_create(
            Attachment(email=copy, filename=a.filename, mimetype=a.mimetype, content=a.content,
                       content_id=a.content_id)
            for a in original.attachments.using(db).all()
        )
    signals.queued.send(sender=OutboxEmail, email=copy)
    return copy
