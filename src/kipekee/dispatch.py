"""Modes: when and where an enqueued email is delivered; receipts for the caller.

- ``now``: deliver in the request once the transaction commits, with quick retries
  (``NOW_RETRY_DELAYS``) inside a time budget; what is still failing is left deferred.
- ``hybrid``: deliver in the request once; a transient failure leaves the row deferred
  for an engine; a permanent one is on the receipt at once ("that address was refused").
- ``queue``: leave it to an engine.

Nothing is delivered before the caller's transaction commits, and a rolled-back
transaction delivers nothing: delivery starts from ``transaction.on_commit``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import replace
from datetime import datetime, timedelta
from functools import partial

from django.core.mail import EmailMessage
from django.db import DatabaseError, transaction
from django.utils import timezone

from . import conf, deadlines, engines, outbox
from .delivery import Deliverer
from .engines.worker import notify_if_listening
from .exceptions import InvalidMessage
from .models import ErrorKind, OutboxEmail, Status
from .options import SendOptions
from .recording import record, record_many
from .retry import RetryPolicy

logger = logging.getLogger("kipekee.dispatch")

#: How long engines leave alone a row that the request delivers itself after commit.
IN_REQUEST_HOLD = timedelta(seconds=30)


def request_lease(settings: conf.KipekeeSettings) -> timedelta:
    """The lease of a row a request sends itself: the hold, or the time budget with room
    to spare when that is longer; never longer than an engine's lease. Short, so that
    when the process dies between its commit and its send (a worker timeout kills it),
    an engine sends the mail within about the hold, not a whole engine lease later."""
    budget = timedelta(seconds=2 * settings.now_time_budget)
    return min(settings.lease, max(IN_REQUEST_HOLD, budget))


class Receipt:
    """What sending returns: the outbox row's id, Message-ID and its latest known state.

    Not frozen, on purpose: inside a transaction delivery happens on commit, after
    ``send()`` returned, and the outcome is written into this same receipt then.
    :meth:`refresh` reads the row again (to see what an engine did later).
    """

    __slots__ = ("id", "message_id", "created", "mode", "status", "error", "error_kind",
                 "refused", "provider", "attempts", "_using")

    def __init__(self, row: OutboxEmail, *, created: bool) -> None:
        self.id: int = row.pk
        self.message_id: str = row.message_id
        # False when an earlier enqueue with the same idempotency key is returned.
        self.created = created
        self.mode: str = row.mode
        self._using = row._state.db
        self._update(row)

    def _update(self, row: OutboxEmail) -> None:
        self.status: str = row.status
        self.error: str = row.last_error
        self.error_kind: str = row.error_kind
        self.refused: dict[str, str] = dict(row.refused)
        self.provider: str = row.sent_by
        self.attempts: int = row.attempts

    def refresh(self) -> Receipt:
        self._update(OutboxEmail.objects.using(self._using).get(pk=self.id))
        return self

    async def arefresh(self) -> Receipt:
        """:meth:`refresh` for async code."""
        self._update(await OutboxEmail.objects.using(self._using).aget(pk=self.id))
        return self

    @property
    def sent(self) -> bool:
        return self.status == Status.SENT

    @property
    def failed(self) -> bool:
        return self.status == Status.FAILED

    @property
    def suppressed(self) -> bool:
        """Not sent: every recipient is on the suppression list (``error`` says why)."""
        return self.status == Status.SUPPRESSED

    @property
    def pending(self) -> bool:
        """Not final yet: queued, sending or deferred (an engine will go on)."""
        return self.status in {Status.QUEUED, Status.SENDING, Status.DEFERRED}

    def __repr__(self) -> str:
        extra = f" error={self.error!r}" if self.error else ""
        return f"<Receipt #{self.id} {self.status}{extra}>"


def submit(message: EmailMessage, options: SendOptions | None = None, *,
           using: str | None = None) -> Receipt:
    """Enqueue ``message`` in the current transaction and arrange its delivery, as
    ``options`` say (:class:`~kipekee.options.SendOptions`; none: the defaults).

    ``options.event`` and ``options.target`` (a saved model instance) link the row to the
    notification and the business object it is about:
    ``OutboxEmail.objects.for_object(target)``. ``options.mailing_list``: the MailingList
    key of list mail (the caller added its headers, :func:`kipekee.lists.links`); who
    left that list is not sent to.
    """
    options = options or SendOptions()
    mode = options.mode or conf.get().mode
    if mode not in conf.MODES:
        raise InvalidMessage(f"mode must be one of {conf.MODES}, not {mode!r}.")
    send_at = options.send_at
    if send_at is not None:  # comparable with timezone.now() below, with or without USE_TZ
        send_at = outbox.stored_time(send_at, "send_at")
    db = using or outbox.db_for_write()
    later = send_at is not None and send_at > timezone.now()
    here = mode != "queue" and not later
    row, created = outbox.enqueue(
        message, replace(options, mode=mode, send_at=send_at),
        # Delivered here right after commit: written already claimed by this request
        # (no engine polling at that moment may take it first, and the caller would
        # lose its answer), so sending it costs no claim statement.
        claimed=request_lease(conf.get()) if here else None,
        # Workers LISTENing on PostgreSQL hear of it when (and only if) it is committed
        # (also of one with a send_at that has passed: the request delivers that itself,
        # and the workers find nothing they may take).
        announce=mode == "queue" or send_at is not None, using=db,
    )
    receipt = Receipt(row, created=created)
    if not created or receipt.suppressed:  # nothing (new) to deliver
        return receipt
    if row.status == Status.SENDING:
        # Claimed as written, for this request's own send after commit; to the caller
        # nothing has started yet (and a rollback leaves nothing): queued until then.
        receipt.status = Status.QUEUED
    if not here:
        # With when it falls due, if later: a task engine may schedule its task for
        # then (django.tasks' run_after); the thread engine wakes to sleep until then.
        transaction.on_commit(partial(engines.wake, [row.pk], due_at=send_at if later else None),
                              using=db)
    else:
        transaction.on_commit(partial(deliver_in_request, receipt, row,
                                      written=time.monotonic()), using=db)
    return receipt


#: The modes of :func:`submit_many`: many messages are never retried inside the request.
MANY_MODES = ("queue", "hybrid")
#: Rows claimed and delivered at a time when a request delivers what it sent in bulk.
IN_REQUEST_BATCH = 500


def submit_many(items: Sequence[outbox.NewEmail], *, using: str | None = None) -> list[Receipt]:
    """Enqueue many messages in the current transaction and arrange their delivery;
    their receipts, in order.

    Mode ``queue``: engines deliver them (woken on commit). Mode ``hybrid``: delivered in
    this thread right after commit, a batch at a time through the providers' batch APIs
    where they have one (as engines do), each once; what fails for a transient reason
    is left deferred to an engine. ``now`` is refused: in-request quick retries of many
    messages would hold the request for the sum of their budgets.
    """
    for index, item in enumerate(items):
        if item.options.mode not in MANY_MODES:
            raise InvalidMessage(f"Message {index}: mode must be one of {MANY_MODES} when "
                                 f"sending many, not {item.options.mode!r}.")
    items = [_stored_send_at(item, index) for index, item in enumerate(items)]
    db = using or outbox.db_for_write()
    outside_transaction = not transaction.get_connection(db).in_atomic_block
    now = timezone.now()
    with transaction.atomic(using=db) if outside_transaction else nullcontext():
        results = outbox.enqueue_many(
            [replace(item, in_request_hold=IN_REQUEST_HOLD)
             if item.options.mode == "hybrid" else item for item in items], using=db)
        receipts = [Receipt(row, created=created) for row, created in results]
        due: list[int] = []  # for engines, due now
        scheduled: list[tuple[int, datetime]] = []  # for engines, due later
        here: list[Receipt] = []
        for item, receipt in zip(items, receipts, strict=True):
            if not receipt.created or receipt.suppressed:
                continue
            send_at = item.options.send_at
            if send_at is not None and send_at > now:
                scheduled.append((receipt.id, send_at))
            elif item.options.mode == "queue":
                due.append(receipt.id)
            else:
                here.append(receipt)
        if due or scheduled:
            notify_if_listening(db)
        if due:
            transaction.on_commit(partial(engines.wake, due), using=db)
        if scheduled:  # when the first falls due (its task follows up the others)
            transaction.on_commit(partial(engines.wake, [pk for pk, _ in scheduled],
                                          due_at=min(at for _, at in scheduled)), using=db)
        if here:
            transaction.on_commit(partial(deliver_many_in_request, here, db), using=db)
    return receipts


def _stored_send_at(item: outbox.NewEmail, index: int) -> outbox.NewEmail:
    """``item`` with its ``send_at`` as the outbox stores it (see :func:`submit`)."""
    send_at = item.options.send_at
    if send_at is None:
        return item
    stored = outbox.stored_time(send_at, f"Message {index}: send_at")
    return replace(item, options=replace(item.options, send_at=stored))


def deliver_many_in_request(receipts: Sequence[Receipt], using: str) -> None:
    """Deliver freshly committed ``hybrid`` rows now, once each; update their receipts.

    A row an engine took first (its hold ran out) is left to it: its receipt stays as
    it was written (``refresh()`` reads what became of it). A database error is logged,
    never raised into the caller (see :func:`deliver_in_request`).
    """
    try:
        _deliver_many_in_request(receipts, using)
    except DatabaseError:
        logger.exception("In-request delivery of %d outbox email(s) failed on a database "
                         "error; what was not recorded stays queued for an engine",
                         len(receipts))
        engines.wake()  # never raises


def _deliver_many_in_request(receipts: Sequence[Receipt], using: str) -> None:
    by_id = {receipt.id: receipt for receipt in receipts}
    ids = list(by_id)
    deferred: list[OutboxEmail] = []
    with Deliverer() as deliverer:
        for start in range(0, len(ids), IN_REQUEST_BATCH):
            rows = outbox.claim_batch(IN_REQUEST_BATCH, engine="request", in_request=True,
                                      ids=ids[start:start + IN_REQUEST_BATCH], using=using)
            if not rows:
                continue
            outcomes = deliverer.deliver_many(rows)
            with transaction.atomic(using=using):
                record_many(rows, outcomes)
            for row in rows:
                by_id[row.pk]._update(row)
                if row.status == Status.DEFERRED:
                    deferred.append(row)
    if deferred:  # so an engine retries them when they are due
        engines.wake([row.pk for row in deferred], due_at=min(row.due_at for row in deferred))


#: A row written this many seconds before its delivery starts (right after commit) is
#: sent with the suppression check made as it was written: a request's own row is not
#: checked twice within moments. A transaction that stays open longer is checked again.
FRESH_CHECK_SECONDS = 1.0


def deliver_in_request(receipt: Receipt, row: OutboxEmail | None = None, *,
                       written: float | None = None) -> None:
    """Deliver a freshly committed row now, as its mode says; update ``receipt``.

    ``row``: the row as written, already claimed by this request
    (``outbox.enqueue(claimed=...)``); ``written``: when (``time.monotonic()``).
    Without it the row is claimed first (``outbox.claim(in_request=True)``).

    Runs in the caller's ``on_commit``, after the business transaction (and the row) is
    committed: a database error here (a lock held past the timeout, a restart) would
    reach the caller's view as if its transaction had failed, and skip the
    application's later on_commit hooks. It is logged instead; the row waits for an
    engine (queued, or ``sending`` until its lease when only the record failed) and
    ``receipt`` keeps the last state known.
    """
    try:
        _deliver_in_request(receipt, row, written)
    except DatabaseError:
        logger.exception("In-request delivery of outbox email %s failed on a database "
                         "error; it stays queued for an engine (claimed by this request: "
                         "when its lease ends)", receipt.id)
        engines.wake()  # never raises


def _deliver_in_request(receipt: Receipt, claimed: OutboxEmail | None = None,
                        written: float | None = None) -> None:
    settings = conf.get()
    delays = settings.now_retry_delays if receipt.mode == "now" else ()
    started = time.monotonic()
    deadline = started + settings.now_time_budget
    policy = RetryPolicy.from_settings()
    # Checked against the suppression list as it was written, a moment ago.
    checked = claimed is not None and written is not None and (
        started - written < FRESH_CHECK_SECONDS)
    # Renewed only when a long transaction used up half the lease before its commit,
    # as a claim now would have leased it.
    lease = request_lease(settings)
    if claimed is not None and not outbox.keep_claim(claimed, within=lease / 2, lease=lease):
        receipt.refresh()  # an engine took it after its lease: it is the engine's now
        return
    # The process's warm connections (kipekee.connections): waiting for one when all are
    # in use counts against the time budget (the deadline below).
    with Deliverer() as deliverer:
        for index in range(len(delays) + 1):
            if index == 0 and claimed is not None:
                row: OutboxEmail | None = claimed
            else:
                row = outbox.claim(receipt.id, in_request=True, using=receipt._using)
                checked = False
            if row is None:
                # Not due yet (send_at), or an engine holds it: nothing to do here.
                receipt.refresh()
                return
            # The budget bounds the attempt itself too: a backend that honours deadlines
            # (Kipekee's SMTP backend does) gives up in time and the row is deferred.
            with deadlines.until(deadline):
                outcome = deliverer.deliver(row, checked=checked)
            quick = delays[index] if index < len(delays) else None
            if quick is not None and outcome.retry_after is not None:
                quick = max(quick, outcome.retry_after)
            if (not outcome.ok and outcome.kind == ErrorKind.TRANSIENT and quick is not None
                    and time.monotonic() + quick < deadline
                    and not policy.exhausted(attempt=row.attempts, created_at=row.created_at)):
                # Charged only if a provider was tried (not when every circuit was open).
                (outbox.defer if outcome.attempted else outbox.postpone)(
                    row, outcome, due_at=timezone.now() + timedelta(seconds=quick))
                time.sleep(quick)
                continue
            record(row, outcome, policy)
            receipt._update(row)
            if row.status == Status.DEFERRED:  # so an engine retries it when it is due
                engines.wake([row.pk], due_at=row.due_at)
            return
