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
import uuid
from datetime import datetime
from typing import TYPE_CHECKING, Any

from django.db import IntegrityError, connections, router, transaction
from django.db.models import F
from django.utils import timezone

from . import conf, signals
from .message import make_message_id, to_fields, validate
from .models import WAITING_STATUSES, Attachment, Attempt, ErrorKind, OutboxEmail, Status
from .redact import redact

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


def claim_batch(limit: int, *, engine: str = "", using: str | None = None) -> list[OutboxEmail]:
    """Claim up to ``limit`` due rows (oldest due first) for one sender, with a lease.

    On databases with ``SELECT … FOR UPDATE SKIP LOCKED`` (PostgreSQL) the candidates are
    locked in a short transaction, so concurrent engines take disjoint batches without
    waiting for each other. Elsewhere (SQLite, which serialises writers anyway) one
    conditional UPDATE takes them. Either way each row is tagged with a fresh claim
    token, and the rows carrying it are ours. Sending happens after this returns,
    outside any transaction.
    """
    db = using or db_for_write()
    now = timezone.now()
    token = f"{engine}:{uuid.uuid4().hex[:12]}"[-100:]
    changes = {"status": Status.SENDING, "lease_until": now + conf.get().lease,
               "attempts": F("attempts") + 1, "claimed_by": token}
    rows = OutboxEmail.objects.using(db)
    if connections[db].features.has_select_for_update_skip_locked:
        with transaction.atomic(using=db):
            ids = list(rows.due(now).order_by("due_at", "pk")
                       .select_for_update(skip_locked=True).values_list("pk", flat=True)[:limit])
            if not ids:
                return []
            rows.filter(pk__in=ids).update(**changes)
    else:
        candidates = rows.due(now).order_by("due_at", "pk").values("pk")[:limit]
        # The due condition is repeated on the outer UPDATE: a row another engine claimed
        # between the sub-select and the update no longer matches.
        if not rows.due(now).filter(pk__in=candidates).update(**changes):
            return []
    # Attachments for the whole batch in one query, not one per message.
    return list(rows.filter(claimed_by=token, status=Status.SENDING).order_by("due_at", "pk")
                .prefetch_related("attachments"))


def release(row: OutboxEmail) -> bool:
    """Give back a claimed row that was not attempted (an engine stopping): ``sending →
    queued``, due now, and the claim not counted as an attempt."""
    db = row._state.db or db_for_write()
    return bool(
        OutboxEmail.objects.using(db)
        .filter(pk=row.pk, status=Status.SENDING, attempts=row.attempts)
        .update(status=Status.QUEUED, lease_until=None, claimed_by="", due_at=timezone.now(),
                attempts=F("attempts") - 1)
    )


def next_due_at(*, using: str | None = None) -> datetime | None:
    """When the next waiting row falls due (or a lease expires), for engines to sleep until."""
    rows = OutboxEmail.objects.using(using or db_for_write())
    waiting = rows.filter(status__in=WAITING_STATUSES).order_by("due_at").values_list(
        "due_at", flat=True).first()
    lease = rows.filter(status=Status.SENDING).order_by("lease_until").values_list(
        "lease_until", flat=True).first()
    times = [t for t in (waiting, lease) if t is not None]
    return min(times) if times else None


def claim(pk: int, *, using: str | None = None) -> OutboxEmail | None:
    """Take one row for sending if it is due (or its lease expired); ``None`` if not.

    Sets ``sending``, a lease, and counts the attempt.
    """
    db = using or db_for_write()
    now = timezone.now()
    claimed = (
        OutboxEmail.objects.using(db)
        .due(now)
        .filter(pk=pk)
        .update(status=Status.SENDING, lease_until=now + conf.get().lease,
                attempts=F("attempts") + 1, claimed_by="request")
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
    # Last fence before the database: classify() already redacted, but a custom engine
    # may build an Outcome by hand.
    error = redact(outcome.error)
    if changes.get("last_error"):
        changes["last_error"] = redact(changes["last_error"])
    with transaction.atomic(using=db):
        # Fenced by the attempt number: only the attempt that holds the row may finish it.
        updated = (
            OutboxEmail.objects.using(db)
            .filter(pk=row.pk, status=Status.SENDING, attempts=row.attempts)
            .update(status=status, lease_until=None, claimed_by="", **changes)
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
            error=error, refused=outcome.refused,
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
        .update(status=Status.CANCELLED, lease_until=None, claimed_by="")
    )
    if updated:
        signals.cancelled.send(sender=OutboxEmail, email=OutboxEmail.objects.using(db).get(pk=pk))
    return bool(updated)
