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
import uuid
from collections.abc import Callable, Collection, Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.db import IntegrityError, connections, models, router, transaction
from django.db.models import F, Q
from django.db.models.expressions import RawSQL
from django.utils import timezone

from . import conf, signals, suppression
from .addresses import canonical
from .exceptions import InvalidMessage
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
from .redact import redact
from .wire import check_size

if TYPE_CHECKING:
    from django.core.mail import EmailMessage
    from django.db.models import Model

    from .delivery import Outcome

logger = logging.getLogger("kipekee.outbox")


def db_for_write() -> str:
    return router.db_for_write(OutboxEmail)


def stored_time(value: datetime, name: str) -> datetime:
    """``value`` as the outbox stores and compares times, as Django's ``DateTimeField``
    does: with ``USE_TZ``, aware (a naive one is refused: which zone it meant would be
    a guess); without, naive wall-clock time in ``TIME_ZONE`` (an aware one is
    converted to it). Raises ``InvalidMessage`` naming ``name``."""
    if settings.USE_TZ:
        if timezone.is_naive(value):
            raise InvalidMessage(f"{name} must be an aware datetime (USE_TZ is True).")
        return value
    return timezone.make_naive(value) if timezone.is_aware(value) else value


def enqueue(
    message: EmailMessage,
    *,
    mode: str,
    idempotency_key: str | None = None,
    send_at: datetime | None = None,
    provider: str = "",
    template: str = "",
    metadata: dict[str, Any] | None = None,
    event: str = "",
    target: Model | None = None,
    hold: timedelta | None = None,
    using: str | None = None,
    own_transaction: bool = False,
) -> tuple[OutboxEmail, bool]:
    """Write ``message`` to the outbox in the caller's transaction.

    ``hold``: keep engines off a row due now for this long (``due_at`` in the future)
    because the caller delivers it itself right after commit; only ``claim(pk, own=True)``
    takes it earlier. Should the caller die first, an engine picks it up when the hold ends.

    ``own_transaction``: the caller opened the current transaction for this row alone,
    so a failure cannot spoil anything of its own and no savepoint is needed (one round
    trip less per enqueue on PostgreSQL) unless there is more than one row to write.

    Returns ``(row, created)``. With an ``idempotency_key`` that is already in the
    outbox, returns the first row and ``created=False`` and writes nothing. Raises
    ``InvalidMessage`` / ``UnknownProvider`` before writing anything.
    """
    validate(message)
    check_size(message, conf.get().max_message_size)
    if provider:
        conf.get().provider(provider)  # raises UnknownProvider at the call site
    if send_at is not None:
        send_at = stored_time(send_at, "send_at")
    if target is not None and target.pk is None:
        raise InvalidMessage(f"The email's target {target!r} is not saved (it has no pk).")
    fields, attachments = to_fields(message)
    headers: dict[str, str] = fields.pop("headers")
    message_id = _pop_header(headers, "Message-ID") or make_message_id(
        fields["from_email"], conf.get().message_id_domain
    )
    db = using or db_for_write()
    now = timezone.now()
    if target is not None:
        from django.contrib.contenttypes.models import ContentType

        fields["content_type"] = ContentType.objects.db_manager(db).get_for_model(target)
        fields["object_id"] = str(target.pk)
    row = OutboxEmail(
        **fields,
        headers=headers,
        message_id=message_id,
        mode=mode,
        idempotency_key=idempotency_key or None,
        template=template,
        metadata=metadata or {},
        event=event,
        provider=provider,
        created_at=now,
        # A hold applies to mail due now; a future send_at is the engines' anyway.
        due_at=now + hold if hold and (send_at is None or send_at <= now) else send_at or now,
    )
    # A savepoint: a failure part-way (say, an attachment) leaves nothing behind, and an
    # idempotency collision or a refused INSERT does not poison the caller's transaction.
    with transaction.atomic(using=db, savepoint=not own_transaction or bool(attachments)):
        if idempotency_key:
            existing = OutboxEmail.objects.using(db).filter(idempotency_key=idempotency_key).first()
            if existing is not None:
                return existing, False
        _apply_suppressions(row, db)
        if not idempotency_key:
            # Nothing to recover from here: an error rolls back the savepoint above.
            row.save(using=db, force_insert=True)
        else:
            try:
                with transaction.atomic(using=db):
                    row.save(using=db, force_insert=True)
            except IntegrityError:
                # A concurrent enqueue with the same key committed first.
                return OutboxEmail.objects.using(db).get(idempotency_key=idempotency_key), False
        if attachments:
            Attachment.objects.using(db).bulk_create(
                Attachment(email=row, filename=a.filename, mimetype=a.mimetype,
                           content=a.content, content_id=a.content_id)
                for a in attachments
            )
    if row.status == Status.SUPPRESSED:
        signals.send_on_commit(signals.suppressed, using=db, sender=OutboxEmail, email=row,
                               outcome=None)
    else:
        signals.send_on_commit(signals.queued, using=db, sender=OutboxEmail, email=row)
    return row, True


def _apply_suppressions(row: OutboxEmail, db: str) -> None:
    """Take suppressed recipients off a new row; with none left, it is ``suppressed``."""
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


def claim_batch(limit: int, *, engine: str = "", ids: Sequence[int] | None = None,
                using: str | None = None) -> list[OutboxEmail]:
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
            locked = _due_pks(rows, now, limit, ids, lock=True)
            if not locked:
                return []
            rows.filter(pk__in=locked).update(**changes)
    else:
        candidates = _due_pks(rows, now, limit, ids, lock=False)
        # The due condition is repeated on the UPDATE: a row another engine claimed
        # between the select and the update no longer matches.
        if not candidates or not rows.due(now).filter(pk__in=candidates).update(**changes):
            return []
    # Attachments for the whole batch in one query, not one per message.
    return list(rows.filter(claimed_by=token, status=Status.SENDING).order_by("due_at", "pk")
                .prefetch_related("attachments"))


def _due_pks(rows: Any, now: datetime, limit: int, ids: Sequence[int] | None, *,
             lock: bool) -> list[int]:
    """The pks of up to ``limit`` due rows, oldest due first; with ``lock``, locked
    (``FOR UPDATE SKIP LOCKED``) until the caller's transaction ends.

    ``ids``: only these rows (a task naming its rows); those already taken are passed
    over. The two kinds of due rows are asked for separately, each through its partial
    index (``kipekee_waiting_due``, ``kipekee_sending_lease``): with the OR of ``due()``
    in one query PostgreSQL and SQLite scan and sort the whole backlog on every claim
    (PostgreSQL 144 ms, SQLite 66 ms a claim with 100,000 rows queued). The two lists are
    merged in due order; rows locked beyond ``limit`` are released when the claiming
    transaction ends a moment later.
    """
    branches = (rows.filter(status__in=WAITING_STATUSES, due_at__lte=now),
                rows.filter(status=Status.SENDING, lease_until__lt=now))
    found: list[tuple[datetime, int]] = []
    for branch in branches:
        if ids is not None:
            branch = branch.filter(pk__in=list(ids))
        branch = branch.order_by("due_at", "pk")
        if lock:
            branch = branch.select_for_update(skip_locked=True)
        found += list(branch.values_list("due_at", "pk")[:limit])
    return [pk for _, pk in sorted(found)[:limit]]


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


def renew_lease(token: str, pks: Sequence[int], *, using: str | None = None) -> int:
    """Extend by a whole lease the rows of claim ``token`` still being sent (a delivery
    that takes longer than the lease); how many still were. Fenced by the claim's token:
    a row taken over by another engine, or finished, is left alone."""
    return (OutboxEmail.objects.using(using or db_for_write())
            .filter(pk__in=list(pks), status=Status.SENDING, claimed_by=token)
            .update(lease_until=timezone.now() + conf.get().lease))


def due_ids(limit: int, *, queued_grace: timedelta = timedelta(0),
            using: str | None = None) -> list[int]:
    """Ids of rows an engine may claim now (without claiming them), oldest due first.

    ``queued_grace``: pass over ``queued`` rows that were due when they were written and
    fell due less than this long ago (a task was sent for them on commit and is probably
    still in a queue). Rows written for later (``send_at``, a request's hold) and rows
    queued again (released, retried by a person) have no task coming: no grace.
    """
    now = timezone.now()
    rows = OutboxEmail.objects.using(using or db_for_write()).filter(
        Q(status=Status.DEFERRED, due_at__lte=now)
        | (Q(status=Status.QUEUED, due_at__lte=now)
           & (Q(due_at__lte=now - queued_grace) | Q(due_at__gt=F("created_at"))))
        | Q(status=Status.SENDING, lease_until__lt=now)
    )
    return list(rows.order_by("due_at", "pk").values_list("pk", flat=True)[:limit])


def next_due_at(*, using: str | None = None) -> datetime | None:
    """When the next waiting row falls due (or a lease expires), for engines to sleep until."""
    rows = OutboxEmail.objects.using(using or db_for_write())
    waiting = rows.filter(status__in=WAITING_STATUSES).order_by("due_at").values_list(
        "due_at", flat=True).first()
    lease = rows.filter(status=Status.SENDING).order_by("lease_until").values_list(
        "lease_until", flat=True).first()
    times = [t for t in (waiting, lease) if t is not None]
    return min(times) if times else None


def claim(pk: int, *, own: bool = False, using: str | None = None) -> OutboxEmail | None:
    """Take one row for sending if it is due (or its lease expired); ``None`` if not.

    ``own``: the caller that enqueued the row with a ``hold`` takes it before its
    ``due_at`` (a waiting row only: never one another sender holds); the hold ends
    there (``due_at`` now). Sets ``sending``, a lease, and counts the attempt.
    """
    db = using or db_for_write()
    now = timezone.now()
    rows = OutboxEmail.objects.using(db)
    candidates = rows.filter(status__in=WAITING_STATUSES) if own else rows.due(now)
    claimed = (
        candidates
        .filter(pk=pk)
        .update(status=Status.SENDING, lease_until=now + conf.get().lease,
                attempts=F("attempts") + 1, claimed_by=f"request:{uuid.uuid4().hex[:12]}",
                **({"due_at": now} if own else {}))
    )
    if not claimed:
        return None
    return OutboxEmail.objects.using(db).get(pk=pk)


def mark_sent(row: OutboxEmail, outcome: Outcome, *, again: Collection[str] = (),
              again_at: datetime | None = None) -> bool:
    """Record a successful attempt: ``sending → sent``, with the provider's message ids.

    ``again`` (envelope addresses, as in ``outcome.refused``) and ``again_at``: recipients
    the provider refused for now (a 4xx reply to their ``RCPT TO``) get the message in a
    follow-up row, ``deferred`` until ``again_at``, written in the same transaction: same
    content and Message-ID, ``metadata["recipients_of"]`` naming this row, its attempts
    counted on from this one's and its lifetime from this one's creation. This row stays
    ``sent`` and keeps their replies in ``refused``.
    """
    follow_up: list[OutboxEmail] = []

    def write_follow_up(db: str) -> None:
        if again and again_at is not None:
            follow_up.extend(_follow_up(row, outcome, again, again_at, db))

    done = _finish(row, outcome, status=Status.SENT, changes=_sent_changes(outcome),
                   signal=signals.sent, then=write_follow_up)
    for copy in follow_up:
        signals.send_on_commit(signals.queued, using=copy._state.db or db_for_write(),
                               sender=OutboxEmail, email=copy)
    return done


def _sent_changes(outcome: Outcome) -> dict[str, Any]:
    """What a sent row's fields become (besides its status and claim)."""
    return {"sent_at": outcome.finished_at, "sent_by": outcome.provider,
            "error_kind": "", "last_error": "", "refused": outcome.refused}


def _envelope_key(address: str) -> str:
    """``address`` as an SMTP envelope names it: lower-cased addr-spec, IDNA domain."""
    return canonical(address)


def _follow_up(row: OutboxEmail, outcome: Outcome, again: Collection[str], due_at: datetime,
               db: str) -> list[OutboxEmail]:
    # ``row`` is the claimed row as read (the state fields _copy skips are set below).
    wanted = {_envelope_key(a) for a in again}

    def keep(addresses: list[str]) -> list[str]:
        return [a for a in addresses if _envelope_key(a) in wanted]

    to, cc, bcc = keep(row.to), keep(row.cc), keep(row.bcc)
    if not (to or cc or bcc):
        # The provider named addresses this row does not have: nothing to send again.
        logger.warning("Outbox email %s: refused-for-now recipients %s are not on the row; "
                       "no follow-up written.", row.pk, sorted(again))
        return []
    replies = "; ".join(f"{a}: {outcome.refused.get(a, '')}" for a in sorted(again))
    copy = _copy(row, db, status=Status.DEFERRED, due_at=due_at, mode="queue",
                 to=to, cc=cc, bcc=bcc, message_id=row.message_id,
                 created_at=row.created_at, attempts=row.attempts,
                 error_kind=ErrorKind.TRANSIENT,
                 last_error=redact(f"recipients refused for now by {outcome.provider}: {replies}"),
                 metadata={**row.metadata, "recipients_of": row.pk})
    return [copy]


def _copy(original: OutboxEmail, db: str, **fields: Any) -> OutboxEmail:
    """A new row with ``original``'s message and attachments, and ``fields`` (which must
    set the state: a status, a Message-ID); saved in the caller's transaction."""
    copy = OutboxEmail(
        **{f.attname: getattr(original, f.attname) for f in OutboxEmail._meta.concrete_fields
           if f.name not in _STATE_FIELDS},
    )
    for name, value in fields.items():
        setattr(copy, name, value)
    copy.save(using=db, force_insert=True)
    Attachment.objects.using(db).bulk_create(
        Attachment(email=copy, filename=a.filename, mimetype=a.mimetype, content=a.content,
                   content_id=a.content_id)
        for a in original.attachments.using(db).all()
    )
    return copy


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


def postpone(row: OutboxEmail, outcome: Outcome, *, due_at: datetime) -> bool:
    """No provider was tried (every circuit was open): ``sending → deferred`` until
    ``due_at``, and the claim not counted as an attempt (nor written to the attempt log),
    as :func:`release` does for a row not tried at all."""
    return _finish(row, outcome, status=Status.DEFERRED, changes={
        "due_at": due_at, "attempts": row.attempts - 1, "error_kind": outcome.kind,
        "last_error": outcome.error, "refused": outcome.refused,
    }, signal=signals.deferred, attempted=False)


def fail(row: OutboxEmail, outcome: Outcome) -> bool:
    """Record a final failure: ``sending → failed``."""
    return _finish(row, outcome, status=Status.FAILED, changes={
        "error_kind": outcome.kind or ErrorKind.PERMANENT, "last_error": outcome.error,
        "refused": outcome.refused,
    }, signal=signals.failed)


def _finish(row: OutboxEmail, outcome: Outcome, *, status: str, changes: dict[str, Any],
            signal: Any, then: Callable[[str], None] | None = None,
            attempted: bool = True) -> bool:
    db = row._state.db or db_for_write()
    if changes.get("last_error"):  # redacted again: a custom engine may build an Outcome
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
        if attempted:
            _write_attempts(db, [(row, outcome)])
        if then is not None:  # more writes that stand or fall with this result
            then(db)
    _finished(row, outcome, status=status, changes=changes, signal=signal)
    return True


def _finished(row: OutboxEmail, outcome: Outcome, *, status: str, changes: dict[str, Any],
              signal: Any) -> None:
    """After the write: the row in hand as the database now has it, then the signal
    (once the write is committed: an engine records a batch in one transaction)."""
    row.status, row.lease_until, row.claimed_by = status, None, ""
    for name, value in changes.items():
        setattr(row, name, value)
    signals.send_on_commit(signal, using=row._state.db or db_for_write(), sender=OutboxEmail,
                           email=row, outcome=outcome)


def _write_attempts(db: str, results: Sequence[tuple[OutboxEmail, Outcome]]) -> None:
    """The attempt log and the provider's message ids of finished attempts."""
    Attempt.objects.using(db).bulk_create(
        Attempt(email=row, number=row.attempts, provider=outcome.provider,
                started_at=outcome.started_at, finished_at=outcome.finished_at,
                outcome="sent" if outcome.ok else (
                    "suppressed" if outcome.suppressed else outcome.kind),
                # Last fence before the database: classify() already redacted, but a
                # custom engine may build an Outcome by hand.
                code=outcome.code, error=redact(outcome.error), refused=outcome.refused)
        for row, outcome in results
    )
    ids = [ProviderMessage(email=row, provider=outcome.provider, message_id=mid,
                           recipient=recipient)
           for row, outcome in results for recipient, mid in outcome.provider_message_ids.items()]
    if ids:
        # A sandbox gives one id for all recipients; a resend may repeat one.
        ProviderMessage.objects.using(db).bulk_create(ids, ignore_conflicts=True)


class _Moved(Exception):
    """Inside :func:`mark_sent_many`: a row of the batch is no longer this attempt's."""


def mark_sent_many(results: Sequence[tuple[OutboxEmail, Outcome]]) -> list[bool]:
    """Record several successful attempts of one claim at once: what :func:`mark_sent`
    does for each, in one UPDATE and one INSERT instead of two statements per row.

    Engines finish a claimed batch with it. The rows must come from one claim (one
    ``claimed_by`` token, which names that attempt of each row as the attempt number
    does). Should any row have moved on (its lease expired and another engine took it),
    nothing of the bulk write stays and every row is recorded on its own, so only the
    moved row's result is refused. For plain successes only: outcomes with ``refused``
    recipients (which may need a follow-up row) go through :func:`mark_sent`. Returns,
    per row, whether its result was recorded.
    """
    token = results[0][0].claimed_by if results else ""
    providers = {outcome.provider for _, outcome in results}
    if (len(results) < 2 or not token or len(providers) != 1
            or any(row.claimed_by != token or outcome.refused or not outcome.ok
                   for row, outcome in results)):
        # Also one by one: a batch sent through several providers (failover part-way).
        return [mark_sent(row, outcome) for row, outcome in results]
    db = results[0][0]._state.db or db_for_write()
    ops = connections[db].ops
    # Each row's own sent_at in one CASE. Raw, because the ORM's Case(When(...)) takes
    # about 4 ms a batch of 10 to compile, more than the UPDATE takes to run.
    params: list[Any] = []
    for row, outcome in results:
        params += [row.pk, ops.adapt_datetimefield_value(outcome.finished_at)]
    sent_at = RawSQL(f"CASE {ops.quote_name(OutboxEmail._meta.pk.column)} "
                     + " ".join(["WHEN %s THEN %s"] * len(results)) + " END",
                     params, output_field=models.DateTimeField())
    try:
        with transaction.atomic(using=db):
            updated = (
                OutboxEmail.objects.using(db)
                .filter(pk__in=[row.pk for row, _ in results], status=Status.SENDING,
                        claimed_by=token)
                # The same provider and no refusals throughout (checked above): the first
                # outcome's changes hold for every row but sent_at.
                .update(status=Status.SENT, lease_until=None, claimed_by="",
                        **{**_sent_changes(results[0][1]), "sent_at": sent_at})
            )
            if updated != len(results):
                raise _Moved  # undo the bulk write; each row on its own below
            _write_attempts(db, results)
    except _Moved:
        return [mark_sent(row, outcome) for row, outcome in results]
    for row, outcome in results:
        _finished(row, outcome, status=Status.SENT, changes=_sent_changes(outcome),
                  signal=signals.sent)
    return [True] * len(results)


def cancel(pk: int, *, using: str | None = None) -> bool:
    """A person cancels a message that has not gone out: ``queued|deferred → cancelled``."""
    db = using or db_for_write()
    updated = (
        OutboxEmail.objects.using(db)
        .filter(pk=pk, status__in=WAITING_STATUSES)
        .update(status=Status.CANCELLED, lease_until=None, claimed_by="")
    )
    if updated:
        signals.send_on_commit(signals.cancelled, using=db, sender=OutboxEmail,
                               email=OutboxEmail.objects.using(db).get(pk=pk))
    return bool(updated)


def reschedule(pk: int, due_at: datetime, *, metadata: dict[str, Any] | None = None,
               using: str | None = None) -> bool:
    """Move a message that has not gone out to ``due_at`` (a reminder whose booking moved).

    Only ``queued|deferred`` rows move, in one conditional UPDATE (which also replaces
    the row's ``metadata``, when given); a row being sent, sent or cancelled stays as it
    is and ``False`` is returned.
    """
    due_at = stored_time(due_at, "due_at")
    db = using or db_for_write()
    updated = (
        OutboxEmail.objects.using(db)
        .filter(pk=pk, status__in=WAITING_STATUSES)
        .update(due_at=due_at, **({"metadata": metadata} if metadata is not None else {}))
    )
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
    "lease_until", "claimed_by", "attempts", "sent_at", "sent_by", "error_kind", "last_error",
    "refused", "delivery",
})


def resend(pk: int, *, mode: str = "queue", using: str | None = None) -> OutboxEmail:
    """A person sends a finished message again: a new ``queued`` row, copied from ``pk``.

    The copy has its own Message-ID (it is a new message, not a duplicate receivers
    should drop) and ``metadata["resent_from"] = pk``; attachments are copied. Only rows
    in a final status can be resent (a waiting one would go out twice). Recipients on
    the suppression list are taken off the copy, as :func:`enqueue` does; a message left
    with no recipient is not resent. Raises ``OutboxEmail.DoesNotExist`` or
    ``InvalidMessage`` (saying why), and then writes nothing.
    """
    from .models import FINAL_STATUSES

    db = using or db_for_write()
    original = OutboxEmail.objects.using(db).get(pk=pk)
    if original.status not in FINAL_STATUSES:
        raise InvalidMessage(
            f"Outbox email {pk} is {original.status}, not finished: it is still going out."
        )
    if not original.recipients:
        # Every recipient was taken off when it was written (suppressed): a copy would
        # be an empty envelope. Their addresses are only in ``refused``, without saying
        # which were Bcc, so they are not put back.
        taken_off = "; ".join(f"{a} ({why})" for a, why in original.refused.items())
        raise InvalidMessage(f"Outbox email {pk} has no recipients left to resend to"
                             + (f"; taken off when it was written: {taken_off}"
                                if taken_off else "."))
    # As for a new message: recipients suppressed since are taken off the copy.
    refused = suppression.check(original.recipients, using=db)
    to, cc, bcc = ([a for a in addresses if a not in refused]
                   for addresses in (original.to, original.cc, original.bcc))
    if not (to or cc or bcc):
        raise InvalidMessage(
            f"Outbox email {pk} was not resent: every recipient is on the suppression list: "
            + "; ".join(f"{a} ({why})" for a, why in refused.items()))
    now = timezone.now()
    with transaction.atomic(using=db):
        copy = _copy(original, db, mode=mode, created_at=now, due_at=now, to=to, cc=cc, bcc=bcc,
                     refused=refused,
                     message_id=make_message_id(original.from_email, conf.get().message_id_domain),
                     metadata={**original.metadata, "resent_from": pk})
    signals.send_on_commit(signals.queued, using=db, sender=OutboxEmail, email=copy)
    return copy
