"""Deliver one claimed outbox row through the providers, in failover order.

Delivery knows nothing of modes or engines: it is handed a row in ``sending``, tries the
providers, and returns an :class:`Outcome`. Recording the outcome is the outbox's job.

A :class:`Deliverer` takes its provider connections from the process's pool
(:mod:`kipekee.connections`) and gives them back, open, when a call is done: the next
request, or the next batch of an engine, sends on a warm session.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime
from functools import partial
from types import TracebackType
from typing import Any, Protocol, TypeVar, cast, runtime_checkable

from django.core.mail import EmailMessage
from django.core.mail.backends.base import BaseEmailBackend
from django.db.models import prefetch_related_objects
from django.utils import timezone

from . import circuit, conf, connections, deadlines, limits, lists, providers, suppression
from .connections import Connection, ProviderBusy, is_server_closed
from .limits import RateLimited
from .message import from_row
from .models import ErrorKind, OutboxEmail
from .providers import Failure, classify

logger = logging.getLogger("kipekee.delivery")

T = TypeVar("T")

_state = threading.local()


def in_delivery() -> bool:
    """True while this thread is inside a provider's ``send_messages``.

    Kipekee's drop-in backend checks it: a provider whose backend routes back into
    Kipekee (directly, or through ``django.core.mail``'s default) would loop forever.
    """
    return getattr(_state, "depth", 0) > 0


@contextmanager
def _delivering() -> Iterator[None]:
    _state.depth = getattr(_state, "depth", 0) + 1
    try:
        yield
    finally:
        _state.depth -= 1


@dataclass(frozen=True, kw_only=True)
class Outcome:
    """The result of one attempt at one row (possibly through several providers)."""

    ok: bool
    provider: str
    started_at: datetime
    finished_at: datetime
    kind: str = ""  # an ErrorKind value when not ok
    error: str = ""
    code: int | None = None
    refused: dict[str, str] = field(default_factory=dict)
    retry_after: float | None = None
    # Every recipient is on the suppression list: nothing was sent (status suppressed).
    suppressed: bool = False
    # False when no provider was tried: every one's circuit was open. Not an attempt:
    # the row waits ``retry_after`` seconds (the next trial) without being charged one.
    attempted: bool = True
    # Recipient -> the id the provider gave the message (HTTP APIs), for its webhooks.
    provider_message_ids: dict[str, str] = field(default_factory=dict)


@runtime_checkable
class BatchBackend(Protocol):
    """What a provider's backend offers to send many messages in one request.

    ``send_batch_item(message)`` builds one message (raising what sending it would
    raise) into an item with a ``size`` in bytes; ``send_batch(items)`` sends at most
    ``batch_max_messages`` items of at most ``batch_max_bytes`` together in one request
    and returns, per item, ``None`` (sent: the message carries ``provider_message_ids``
    and ``refused_recipients`` as after ``send_messages``) or the error that refused it.
    It raises when the request as a whole fails. See ``kipekee.backends.mailtrap``.
    """

    batch_max_messages: int
    batch_max_bytes: int

    def send_batch_item(self, message: EmailMessage) -> Any: ...

    def send_batch(self, items: Sequence[Any]) -> list[BaseException | None]: ...


@dataclass(frozen=True, kw_only=True)
class _PassedOver(Failure):
    """A provider not tried: its circuit is open (``retry_after``: until the circuit lets
    the message through, see ``CircuitBreaker.postpone_for``), every connection that may
    be open to it is in use (``LIMITS["CONCURRENCY"]``), or its rate window is full until
    ``retry_after`` (``LIMITS["RATE"]``). Not an attempt: the row is not charged one."""

    @classmethod
    def by(cls, breaker: circuit.CircuitBreaker) -> _PassedOver:
        return cls(kind=ErrorKind.TRANSIENT, retry_after=breaker.postpone_for(),
                   error="circuit open after repeated failures "
                         f"(next trial in {breaker.retry_in():.0f} s)")

    @classmethod
    def busy(cls, exc: ProviderBusy) -> _PassedOver:
        # Connections come back after a send; spread the rows that waited in vain.
        return cls(kind=ErrorKind.TRANSIENT, retry_after=random.uniform(1.0, 5.0),
                   error=str(exc))

    @classmethod
    def limited(cls, exc: RateLimited) -> _PassedOver:
        # Back when the slot frees, spread over a second so the deferred rows do not all
        # come back at the same moment (of which the window takes only some).
        return cls(kind=ErrorKind.TRANSIENT, retry_after=exc.wait + random.uniform(0.0, 1.0),
                   error=str(exc))


@dataclass
class _Pending:
    """A row waiting in a batch: its message, and what deliver() would know about it."""

    index: int
    row: OutboxEmail
    message: EmailMessage
    started: datetime
    aliases: list[str]
    refused: dict[str, str]


_NO_KEY = object()


def _by_list(rows: Sequence[OutboxEmail]) -> dict[str, set[str]]:
    """The recipients of the list mail among ``rows``, by list key."""
    wanted: dict[str, set[str]] = {}
    for row in rows:
        if row.mailing_list:
            wanted.setdefault(row.mailing_list, set()).update(row.recipients)
    return wanted


def _key(item: Any) -> Any:
    """An item's ``key``: only items with equal keys may share a request (``None``: it
    shares with none). Items without one (Mailtrap's) may share with any."""
    return getattr(item, "key", _NO_KEY)


def _chunks(items: list[tuple[_Pending, Any]], max_count: int,
            max_bytes: int) -> Iterator[list[tuple[_Pending, Any]]]:
    """Runs of at most ``max_count`` items and ``max_bytes`` bytes, of one key each, with
    distinct recipients when keyed (a merged request addresses each recipient once)."""
    groups: dict[Any, list[tuple[_Pending, Any]]] = {}
    for entry in items:
        key = _key(entry[1])
        if key is None:
            yield [entry]
            continue
        groups.setdefault(key, []).append(entry)
    for key, group in groups.items():
        yield from _runs(group, max_count, max_bytes, keyed=key is not _NO_KEY)


def _runs(items: list[tuple[_Pending, Any]], max_count: int, max_bytes: int, *,
          keyed: bool) -> Iterator[list[tuple[_Pending, Any]]]:
    chunk: list[tuple[_Pending, Any]] = []
    size = 0
    seen: set[str] = set()
    for entry in items:
        item_size = entry[1].size
        address = str(getattr(entry[1], "address", "")).lower() if keyed else ""
        if chunk and (len(chunk) >= max_count or size + item_size > max_bytes
                      or address in seen):
            yield chunk
            chunk, size, seen = [], 0, set()
        chunk.append(entry)
        size += item_size
        if address:
            seen.add(address)
    if chunk:
        yield chunk


_batch_kinds: dict[type, bool] = {}


def _is_batch_backend(backend: BaseEmailBackend) -> bool:
    """``isinstance(backend, BatchBackend)``, asked once per backend class: a runtime
    protocol check looks up each of its members every time (0.2 ms of profiled CPU for
    every row a worker sends through SMTP, whose backend has none of them)."""
    kind = type(backend)
    if kind not in _batch_kinds:
        _batch_kinds[kind] = isinstance(backend, BatchBackend)
    return _batch_kinds[kind]


def _send_batch(backend: BaseEmailBackend, items: list[Any]) -> list[BaseException | None]:
    """Send ``items`` in one request on ``backend`` (a pooled connection's, maybe opened
    again since the items were built: seen as a batch backend again)."""
    batch = backend if _is_batch_backend(backend) else providers.merge_batch(backend)
    return cast(BatchBackend, batch).send_batch(items)


class Deliverer:
    """Sends rows through the configured providers, on the process's warm connections.

    A connection is checked out of the provider's pool when a call first needs it and
    checked in (open) when the call returns, so nothing is held between calls and
    ``LIMITS["CONCURRENCY"]`` bounds the connections of every thread together.
    The caller's deadline (:mod:`kipekee.deadlines`, e.g. the in-request time budget)
    bounds the wait for a connection when all are in use; without one an engine waits up
    to ``connections.DEFAULT_WAIT``. Use as a context manager, or call :meth:`close` when
    done.
    """

    def __init__(self) -> None:
        # Connections checked out during the current call, by provider.
        self._held: dict[str, Connection] = {}

    def __enter__(self) -> Deliverer:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def deliver(self, row: OutboxEmail, *, checked: bool = False) -> Outcome:
        """Deliver one claimed row through the providers, in failover order.

        ``checked``: the row's recipients were checked against the suppression list (and
        its mailing list's unsubscribes) a moment ago, as it was written: not asked again.
        """
        return self.deliver_many([row], checked=checked)[0]

    def _prepare(self, row: OutboxEmail, started: datetime,
                 suppressed: dict[str, str] | None = None,
                 ) -> tuple[EmailMessage, dict[str, str]] | Outcome:
        """The message to send and the recipients taken off it, or the final outcome.

        Recipients suppressed since the row was queued are taken off here; with none
        left, the outcome says so (``suppressed=True``). ``suppressed`` is the answer of
        one suppression query for a whole batch.
        """
        try:
            message = from_row(row)
        except Exception as exc:  # noqa: BLE001 - an unbuildable row fails alone, recorded
            logger.exception("Outbox email %s cannot be built", row.pk)
            return Outcome(ok=False, provider="", started_at=started, finished_at=timezone.now(),
                           kind=ErrorKind.PERMANENT, error=f"cannot build message: {exc!r}")
        # What HTTP-API backends may pass on to the provider (category, custom
        # variables, which come back in delivery webhooks).
        message.kipekee_id = row.pk  # type: ignore[attr-defined]
        message.kipekee_metadata = dict(row.metadata or {})  # type: ignore[attr-defined]
        message.kipekee_template = row.template  # type: ignore[attr-defined]
        # Suppressions found when the row was written stay on the record.
        refused = {a: why for a, why in row.refused.items() if why.startswith("suppressed:")}
        if suppressed is None:
            suppressed = suppression.check(row.recipients, using=row._state.db,
                                           mailing_list=row.mailing_list)
        now_suppressed = {a: why for a, why in suppressed.items() if a in row.recipients}
        if now_suppressed:
            message.to = [a for a in message.to if a not in now_suppressed]
            message.cc = [a for a in message.cc if a not in now_suppressed]
            message.bcc = [a for a in message.bcc if a not in now_suppressed]
            refused.update(now_suppressed)
        if not message.recipients():
            # Nothing to send. Never handed to a provider: an empty envelope is no
            # message, and its refusal would count against the provider's breaker.
            if refused:
                return Outcome(
                    ok=False, provider="", started_at=started, finished_at=timezone.now(),
                    kind=ErrorKind.PERMANENT, suppressed=True, refused=refused,
                    error="not sent, every recipient is on the suppression list: "
                          + "; ".join(f"{a} ({why})" for a, why in refused.items()))
            return Outcome(ok=False, provider="", started_at=started, finished_at=timezone.now(),
                           kind=ErrorKind.PERMANENT,
                           error="not sent: the message has no recipients (to, cc and bcc "
                                 "are empty)")
        return message, refused

    def _try_providers(self, p: _Pending, aliases: Sequence[str],
                       failures: Sequence[tuple[str, Failure]] = ()) -> Outcome:
        """Send one message through ``aliases`` in order; ``failures`` so far come first."""
        row, message, started, refused = p.row, p.message, p.started, p.refused
        failures = list(failures)
        for alias in aliases:
            try:
                # A connection (or room for one) first, so that a wait for one never
                # holds the breaker's half-open trial; nothing is sent yet.
                self._checkout(alias)
            except ProviderBusy as busy:
                failures.append((alias, _PassedOver.busy(busy)))
                continue
            except Exception as exc:  # noqa: BLE001 - settings changed under the row: recorded
                failures.append((alias, classify(exc)))
                continue
            breaker = circuit.for_provider(alias)
            if not breaker.allow():
                self._release(alias)
                failures.append((alias, _PassedOver.by(breaker)))
                continue
            backend = None
            try:
                backend = self._open(alias)
                count = self._send(alias, lambda b: b.send_messages([message]))
                if count != 1:
                    raise RuntimeError(f"backend reported {count} messages sent, not 1")
            except RateLimited as limited:
                # Nothing was sent: the connection is as good as before, the breaker's
                # trial (if this was it) goes to the next send.
                breaker.unused()
                self._release(alias)
                failures.append((alias, _PassedOver.limited(limited)))
                continue
            except Exception as exc:  # noqa: BLE001 - classified and recorded on the row
                failure = self._failed(alias, breaker, exc, backend)
                _log_failure(failure, "Provider %r: %s (%s) for outbox email %s",
                             alias, failure.error, failure.kind, row.pk)
                if failure.kind == ErrorKind.PERMANENT and not failure.provider_level:
                    # The message (or its recipients) is the problem: another provider
                    # would refuse it too, or worse, accept what the first one rejected.
                    return self._outcome(started, alias, failure, refused)
                failures.append((alias, failure))
                continue
            breaker.success()
            return self._sent(started, alias, message, failures, refused, backend)
        return self._none_took_it(started, failures, refused)

    def _none_took_it(self, started: datetime, failures: Sequence[tuple[str, Failure]],
                      refused: dict[str, str]) -> Outcome:
        """The outcome when no provider took the message: ``failures``, one a provider."""
        if not failures:
            return self._outcome(started, "", Failure(
                kind=ErrorKind.CONFIGURATION, error='no providers: KIPEKEE["PROVIDERS"] is empty'),
                refused)
        # Later when any provider may take it later (transient) or once one is fixed
        # (configuration); failed only when every provider refused it for good.
        kinds = {f.kind for _, f in failures}
        kind = next((k for k in (ErrorKind.TRANSIENT, ErrorKind.CONFIGURATION) if k in kinds),
                    ErrorKind.PERMANENT)
        tried = [f for _, f in failures if not isinstance(f, _PassedOver)]
        # A provider's own hint (4xx text, Retry-After) counts; an open circuit's next
        # trial does not shorten the retry policy's wait after a real attempt. Without
        # any real attempt the row waits for the earliest trial, uncharged.
        hints = [f.retry_after for f in (tried or [f for _, f in failures])
                 if f.retry_after is not None]
        last_alias, last = failures[-1]
        outcome = self._outcome(started, last_alias, Failure(
            kind=kind,
            error="; ".join(f"{alias}: {f.error}" for alias, f in failures),
            code=last.code,
            refused={k: v for _, f in failures for k, v in f.refused.items()},
            retry_after=min(hints) if hints else None,
        ), refused)
        return outcome if tried else replace(outcome, attempted=False)

    @staticmethod
    def _sent(started: datetime, alias: str, message: EmailMessage,
              failures: list[tuple[str, Failure]], refused: dict[str, str],
              backend: Any = None) -> Outcome:
        ids, refused_now = providers.sent_details(message, backend)
        return Outcome(ok=True, provider=alias, started_at=started, finished_at=timezone.now(),
                       # Kept on the attempt: why the earlier providers were passed over.
                       error="; ".join(f"{a}: {f.error}" for a, f in failures),
                       refused={**refused, **refused_now}, provider_message_ids=ids)

    def deliver_many(self, rows: Sequence[OutboxEmail], *,
                     checked: bool = False) -> list[Outcome]:
        """Deliver several claimed rows; one outcome per row, in order.

        Engines hand whole claimed batches here. Rows whose first provider can take many
        messages per request (its backend has ``send_batch``, as Kipekee's Mailtrap
        backend does) go out in as few requests as its limits allow
        (``batch_max_messages``, ``batch_max_bytes``); each request takes one slot of the
        provider's rate window. The others are sent one by one over the reused
        connections, trying the providers in failover order.

        Per row, the outcome means what :meth:`deliver`'s would: an item the provider
        refuses is permanent for that row alone; a request that fails as a whole for a
        transient or configuration reason moves its rows on to the next provider; a
        request refused as a whole (400, 413, 422) does not say which message is at
        fault, so its rows are then sent one by one, each getting its own verdict.
        """
        try:
            return self._deliver_many(rows, checked)
        finally:
            self._release_all()  # warm, for the next call (of any thread)

    def _deliver_many(self, rows: Sequence[OutboxEmail], checked: bool) -> list[Outcome]:
        outcomes: list[Outcome | None] = [None] * len(rows)
        prefetch_related_objects(list(rows), "attachments")
        using = rows[0]._state.db if rows else None
        suppressed: dict[str, str] = {}
        left: dict[str, dict[str, str]] = {}
        if not checked:
            suppressed = suppression.check({a for row in rows for a in row.recipients},
                                           using=using)
            # List mail: who left its list since it was written (one query per list).
            left = lists.unsubscribed_many(_by_list(rows), using=using)
        groups: dict[str, list[_Pending]] = {}
        for index, row in enumerate(rows):
            started = timezone.now()
            prepared = self._prepare(row, started, {**left[row.mailing_list], **suppressed}
                                     if row.mailing_list in left else suppressed)
            if isinstance(prepared, Outcome):
                outcomes[index] = prepared
                continue
            message, refused = prepared
            try:
                aliases = providers.aliases(row.provider)
            except Exception as exc:  # noqa: BLE001 - settings changed under a queued row
                outcomes[index] = self._outcome(started, "", classify(exc), refused)
                continue
            p = _Pending(index, row, message, started, aliases, refused)
            # Batches only while the first provider's circuit is closed; otherwise the
            # single path asks the breaker (and takes the half-open trial).
            if (aliases and circuit.for_provider(aliases[0]).state == circuit.CircuitBreaker.CLOSED
                    and self._batch_backend(aliases[0]) is not None):
                groups.setdefault(aliases[0], []).append(p)
            else:
                outcomes[index] = self._try_providers(p, aliases)
        for alias, group in groups.items():
            if len(group) == 1:  # one message: the single-message endpoint
                outcomes[group[0].index] = self._try_providers(group[0], group[0].aliases)
            else:
                self._deliver_batches(alias, group, outcomes)
        assert all(o is not None for o in outcomes)
        return outcomes  # type: ignore[return-value]

    def _batch_backend(self, alias: str) -> BatchBackend | None:
        try:
            backend = self._open(alias)
        except Exception:  # noqa: BLE001 - the single path records why it cannot open
            self._discard(alias)
            return None
        if _is_batch_backend(backend):
            return cast(BatchBackend, backend)
        # Any anymail backend whose ESP takes batch sends: identical messages to one
        # recipient each share a request (kipekee.backends.merge_batch).
        return cast("BatchBackend | None", providers.merge_batch(backend))

    def _deliver_batches(self, alias: str, group: list[_Pending],
                         outcomes: list[Outcome | None]) -> None:
        backend = self._batch_backend(alias)
        assert backend is not None
        items: list[tuple[_Pending, Any]] = []
        # Built first, sent after the batches: sending them may take other connections
        # (and give this one back to the pool), so the batch backend is not used then.
        unbuilt: list[tuple[_Pending, Failure]] = []
        too_big: list[_Pending] = []
        for p in group:
            try:
                item = backend.send_batch_item(p.message)
            except Exception as exc:  # noqa: BLE001 - this message alone cannot be built
                unbuilt.append((p, classify(exc, backend)))
                continue
            if item.size > backend.batch_max_bytes:
                # Too big to share a request: alone, through the single-message endpoint.
                too_big.append(p)
                continue
            items.append((p, item))
        self._send_batches(alias, backend, items, outcomes)
        for p, failure in unbuilt:
            outcomes[p.index] = self._fail_over(p, alias, failure)
        for p in too_big:
            outcomes[p.index] = self._try_providers(p, p.aliases)

    def _send_batches(self, alias: str, backend: BatchBackend,
                      items: list[tuple[_Pending, Any]], outcomes: list[Outcome | None]) -> None:
        broken: Failure | None = None
        breaker = circuit.for_provider(alias)
        for chunk in _chunks(items, backend.batch_max_messages, backend.batch_max_bytes):
            if len(chunk) == 1 and _key(chunk[0][1]) is not _NO_KEY:
                # Nothing to share a request with: the single-message path.
                outcomes[chunk[0][0].index] = self._try_providers(chunk[0][0], chunk[0][0].aliases)
                continue
            if broken is None:
                try:
                    self._checkout(alias)  # before the breaker's trial, as in _try_providers
                except ProviderBusy as busy:
                    broken = _PassedOver.busy(busy)
            if broken is None and not breaker.allow():
                self._release(alias)
                broken = _PassedOver.by(breaker)
            if broken is not None:
                # The provider failed a request of this call for a reason that is not
                # the messages': do not send it more now, go on to the next provider.
                for p, _ in chunk:
                    outcomes[p.index] = self._fail_over(p, alias, broken)
                continue
            try:
                # Opened again if an earlier request of this call failed (and closed it).
                backend = cast(BatchBackend, self._batch_backend(alias))
                results = self._send(alias, partial(_send_batch, items=[i for _, i in chunk]))
                if len(results) != len(chunk):
                    raise RuntimeError(f"batch answered {len(results)} results for "
                                       f"{len(chunk)} messages")
            except RateLimited as limited:
                breaker.unused()
                self._release(alias)
                broken = _PassedOver.limited(limited)
                for p, _ in chunk:
                    outcomes[p.index] = self._fail_over(p, alias, broken)
                continue
            except Exception as exc:  # noqa: BLE001 - classified, recorded on every row
                failure = self._failed(alias, breaker, exc, backend)
                _log_failure(failure, "Provider %r: batch of %s failed: %s (%s)",
                             alias, len(chunk), failure.error, failure.kind)
                if failure.kind == ErrorKind.PERMANENT:
                    for p, _ in chunk:
                        outcomes[p.index] = self._try_providers(p, p.aliases)
                else:
                    broken = failure
                    for p, _ in chunk:
                        outcomes[p.index] = self._fail_over(p, alias, failure)
                continue
            breaker.success()
            for (p, _), result in zip(chunk, results, strict=True):
                if result is None:
                    outcomes[p.index] = self._sent(p.started, alias, p.message, [], p.refused,
                                                   backend)
                else:
                    outcomes[p.index] = self._fail_over(p, alias, classify(result, backend))

    def _failed(self, alias: str, breaker: circuit.CircuitBreaker, exc: Exception,
                backend: Any) -> Failure:
        """A send through ``alias`` raised ``exc``: its failure, the connection dropped
        (the session's state is unknown after an error) and the breaker told."""
        failure = classify(exc, backend)
        self._discard(alias)
        if failure.kind == ErrorKind.PERMANENT:
            breaker.success()  # the provider answered: it is up
        else:
            breaker.failure(configuration=failure.whole_provider)
        return failure

    def _fail_over(self, p: _Pending, alias: str, failure: Failure) -> Outcome:
        """The outcome of a row whose send through ``alias`` failed, as deliver() would."""
        if failure.kind == ErrorKind.PERMANENT and not failure.provider_level:
            return self._outcome(p.started, alias, failure, p.refused)
        return self._try_providers(p, p.aliases[p.aliases.index(alias) + 1:], [(alias, failure)])

    @staticmethod
    def _outcome(started: datetime, alias: str, failure: Failure,
                 refused: dict[str, str] | None = None) -> Outcome:
        return Outcome(ok=False, provider=alias, started_at=started, finished_at=timezone.now(),
                       kind=failure.kind, error=failure.error, code=failure.code,
                       refused={**(refused or {}), **failure.refused},
                       retry_after=failure.retry_after)

    # -- connections: checked out of the process's pool, given back after each call ----

    def _checkout(self, alias: str) -> Connection:
        """This call's connection to ``alias``: the one it holds, or one from the pool
        (no network yet). Raises :class:`ProviderBusy` when none came back in time."""
        held = self._held.get(alias)
        if held is not None:
            return held
        pool = connections.pool_for(alias)
        try:
            conn = pool.checkout(timeout=0)
        except ProviderBusy:
            # Never wait while holding another provider's connection: two threads each
            # holding what the other waits for would wait forever.
            self._release_all()
            # Within a deadline (the in-request budget), at most half of what is left:
            # the other half is for the next provider should none come back.
            left = deadlines.remaining()
            wait = connections.DEFAULT_WAIT if left is None else max(0.0, left) / 2
            conn = pool.checkout(timeout=wait)
        self._held[alias] = conn
        return conn

    def _open(self, alias: str) -> BaseEmailBackend:
        """``alias``'s backend, open and checked (see ``ProviderPool.ready``)."""
        conn = self._checkout(alias)
        return conn.pool.ready(conn)

    def _send(self, alias: str, send: Callable[[BaseEmailBackend], T]) -> T:
        """``send(backend)`` on this call's open connection to ``alias``.

        When a connection that has sent before fails because the server had closed it
        meanwhile (idle timeout, ``421``, a restart: between the check and the send), a
        new one is opened and ``send`` runs once more: the provider never refused
        anything, so no failure is recorded and no breaker counts it. (Were the
        connection to close after the server took the message but before its reply,
        this sends it again at once, as a retry by an engine would, with the same
        Message-ID.)
        """
        conn = self._checkout(alias)
        backend = conn.pool.ready(conn)
        booking = self._rate_slot(alias)
        try:
            with _delivering():
                result = send(backend)
        except Exception as exc:
            if not (conn.uses and is_server_closed(exc)):
                raise
            logger.info("Provider %r closed a warm connection (%s); sending on a new one",
                        alias, exc)
            backend = conn.pool.renew(conn)
            limits.limiter().finished(booking)
            booking = self._rate_slot(alias)
            with _delivering():
                result = send(backend)
        finally:
            limits.limiter().finished(booking)
        conn.uses += 1
        return result

    @staticmethod
    def _rate_slot(alias: str) -> limits.Booking | None:
        """Take a slot of ``alias``'s ``LIMITS["RATE"]`` (shared, :mod:`kipekee.limits`),
        waiting for one while it frees soon: an engine up to ``LIMITER["MAX_WAIT_SECONDS"]``,
        a request up to half of what is left of its time budget (the rest is for the
        next provider). Raises :class:`RateLimited` when none frees in time."""
        rates = conf.get().provider(alias).rate
        if not rates:
            return None
        left = deadlines.remaining()
        max_wait = conf.get().limiter.max_wait if left is None else max(0.0, left) / 2
        return limits.limiter().acquire(alias, rates, max_wait)

    def _release(self, alias: str) -> None:
        """Give ``alias``'s connection back to the pool, open and warm."""
        conn = self._held.pop(alias, None)
        if conn is not None:
            conn.pool.checkin(conn)

    def _discard(self, alias: str) -> None:
        """Give ``alias``'s connection back closed: its session's state is unknown."""
        conn = self._held.pop(alias, None)
        if conn is not None:
            conn.pool.checkin(conn, reusable=False)

    def _release_all(self) -> None:
        for alias in list(self._held):
            self._release(alias)

    def close(self) -> None:
        """Give every connection back (they stay open in the pool for the next call)."""
        self._release_all()


def _log_failure(failure: Failure, message: str, *args: Any) -> None:
    # A misconfigured provider (bad key, unverified sender) is an alarm.
    logger.log(logging.ERROR if failure.kind == ErrorKind.CONFIGURATION else logging.INFO,
               message, *args)
