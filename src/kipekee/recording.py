"""Recording an attempt's outcome: what it does to the row, written through the outbox.

The retry policy decides between ``sent``, ``deferred``, ``failed``, ``suppressed`` and a
postponement (no provider was tried), and the outbox writes it (one fenced UPDATE per
claim): only :mod:`kipekee.outbox` writes status. Each decision is logged once it is
committed. Called by the in-request delivery (:mod:`kipekee.dispatch`) and by the
engines, which sit above this module; it sits just above the outbox.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from functools import partial
from typing import TYPE_CHECKING, Any

from django.db import transaction

from . import outbox
from .models import ErrorKind, OutboxEmail
from .retry import RetryPolicy, smtp_retry_hint, transient_refusals

if TYPE_CHECKING:
    from .delivery import Outcome

logger = logging.getLogger("kipekee.dispatch")  # the name the log lines always had


def record_many(rows: Sequence[OutboxEmail], outcomes: Sequence[Outcome]) -> list[bool]:
    """Record a claimed batch's outcomes, as :func:`record` would one by one, in one
    UPDATE per claim whatever each outcome was (:func:`kipekee.outbox.finish_many`);
    only a success with recipients refused for now, which may need a follow-up row,
    goes on its own. Call it inside one transaction to make it one commit."""
    policy = RetryPolicy.from_settings()
    results: dict[int, tuple[outbox.Finish, _Note]] = {}
    alone: list[int] = []
    for index, (row, outcome) in enumerate(zip(rows, outcomes, strict=True)):
        result = _result(row, outcome, policy)
        if result is None:
            alone.append(index)
        else:
            results[index] = result
    done = outbox.finish_many([finish for finish, _ in results.values()])
    recorded = dict(zip(results, done, strict=True))
    for (finish, note), written in zip(results.values(), done, strict=True):
        if written:
            _log_on_commit(finish.row, note)
    for index in alone:
        recorded[index] = record(rows[index], outcomes[index], policy)
    return [recorded[index] for index in range(len(rows))]


def record(row: OutboxEmail, outcome: Outcome, policy: RetryPolicy | None = None) -> bool:
    """Record an outcome, deciding with the retry policy between deferred and failed."""
    policy = policy or RetryPolicy.from_settings()
    result = _result(row, outcome, policy)
    if result is not None:
        finish, note = result
        written = outbox.finish(finish)
        if written:
            _log_on_commit(row, note)
        return written
    # Some recipients were refused for now (4xx): they get it again in a follow-up row
    # when the policy allows another attempt; otherwise their reply stays in
    # ``refused`` of this sent row, as a 5xx one does.
    refused_for_now = transient_refusals(outcome.refused)
    hints = [hint for why in refused_for_now.values() if (hint := smtp_retry_hint(why)) is not None]
    retry_at = policy.next_due(
        kind=ErrorKind.TRANSIENT, attempt=row.attempts, created_at=row.created_at,
        hint=max(hints, default=None), now=outcome.finished_at,
    )
    given_up = "" if retry_at is not None else policy.why_not(attempt=row.attempts,
                                                              created_at=row.created_at)
    note = (logging.INFO, "Outbox email %s sent via %s; refused for now: %s; %s",
            (row.pk, outcome.provider, ", ".join(sorted(refused_for_now)),
             f"again at {retry_at.isoformat()}" if retry_at else given_up))
    written = outbox.mark_sent(row, outcome, refused_for_now=list(refused_for_now),
                               retry_at=retry_at, given_up=given_up)
    if written:
        _log_on_commit(row, note)
    return written


#: A log line that says what a result did to its row: level, message, arguments.
_Note = tuple[int, str, tuple[Any, ...]]


def _log_on_commit(row: OutboxEmail, note: _Note) -> None:
    """Log what was recorded on ``row`` once the record is committed (at once outside a
    transaction): a record that rolls back (a database error before its commit) said
    nothing, so the log never reports a row sent, deferred or failed that is not."""
    level, message, args = note
    transaction.on_commit(partial(logger.log, level, message, *args),
                          using=row._state.db or outbox.db_for_write())


def _result(row: OutboxEmail, outcome: Outcome,
            policy: RetryPolicy) -> tuple[outbox.Finish, _Note] | None:
    """What ``outcome`` does to ``row`` and the line that logs it once recorded, or None
    for a success with recipients refused for now (:func:`record` writes their
    follow-up row)."""
    if outcome.ok:
        if transient_refusals(outcome.refused):
            return None
        # Per message at DEBUG: the worker's INFO lines are counts and rates.
        return outbox.sent(row, outcome), (
            logging.DEBUG, "Sent outbox email %s via %s", (row.pk, outcome.provider))
    if not outcome.attempted:
        # Every provider's circuit was open: nothing was sent, so no attempt is spent;
        # the row waits for the next trial. Only its lifetime can end it here.
        due = policy.postponed_due(wait=outcome.retry_after or 0.0, created_at=row.created_at,
                                   now=outcome.finished_at)
        if due is not None:
            return outbox.postponed(row, outcome, due_at=due), (
                logging.INFO, "Outbox email %s waits until %s: %s",
                (row.pk, due.isoformat(), outcome.error))
    if outcome.suppressed:
        return outbox.suppressed(row, outcome), (
            logging.INFO, "Outbox email %s not sent: %s", (row.pk, outcome.error))
    # Counted from the end of the attempt, not from now: an engine's recorder thread may
    # write the outcome a moment after the provider answered.
    due = policy.next_due(
        kind=outcome.kind, attempt=row.attempts, created_at=row.created_at,
        hint=outcome.retry_after, now=outcome.finished_at,
    )
    if due is None and outcome.kind != ErrorKind.PERMANENT:
        # The error alone would read as a retry to come: say why there is none.
        why = policy.why_not(attempt=row.attempts, created_at=row.created_at)
        outcome = replace(outcome, error=f"{outcome.error}; {why}")
    if outcome.kind == ErrorKind.CONFIGURATION:
        # An alarm (a provider misconfigured), whatever becomes of the row.
        return (outbox.failed(row, outcome) if due is None
                else outbox.deferred(row, outcome, due_at=due)), (
            logging.ERROR, "Outbox email %s not sent, provider misconfigured: %s%s",
            (row.pk, outcome.error, "" if due is None else f"; deferred until {due.isoformat()}"))
    if due is None:
        return outbox.failed(row, outcome), (
            logging.WARNING, "Outbox email %s failed: %s", (row.pk, outcome.error))
    return outbox.deferred(row, outcome, due_at=due), (
        logging.INFO, "Outbox email %s deferred until %s: %s",
        (row.pk, due.isoformat(), outcome.error))
