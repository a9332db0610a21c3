"""Deliver one claimed outbox row through the providers, in failover order.

Delivery knows nothing of modes or engines: it is handed a row in ``sending``, tries the
providers, and returns an :class:`Outcome`. Recording the outcome is the outbox's job.

A :class:`Deliverer` keeps one open connection per provider for as long as it lives, so
an engine sending a batch (or a sender thread) reuses its SMTP session.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from types import TracebackType

from django.core.mail.backends.base import BaseEmailBackend
from django.utils import timezone

from . import circuit, providers
from .message import from_row
from .models import ErrorKind, OutboxEmail
from .providers import Failure, classify

logger = logging.getLogger("kipekee.delivery")

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


class Deliverer:
    """Sends rows through the configured providers, reusing open connections.

    Use as a context manager, or call :meth:`close` when done.
    """

    def __init__(self) -> None:
        self._backends: dict[str, BaseEmailBackend] = {}

    def __enter__(self) -> Deliverer:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def deliver(self, row: OutboxEmail) -> Outcome:
        started = timezone.now()
        try:
            message = from_row(row)
        except Exception as exc:  # noqa: BLE001 - an unbuildable row fails alone, recorded
            logger.exception("Outbox email %s cannot be built", row.pk)
            return Outcome(ok=False, provider="", started_at=started, finished_at=timezone.now(),
                           kind=ErrorKind.PERMANENT, error=f"cannot build message: {exc!r}")
        failures: list[tuple[str, Failure]] = []
        try:
            aliases = providers.aliases(row.provider)
        except Exception as exc:  # noqa: BLE001 - settings changed under a queued row
            failure = classify(exc)
            return self._outcome(started, "", failure)
        for alias in aliases:
            breaker = circuit.for_provider(alias)
            if not breaker.allow():
                failures.append((alias, Failure(
                    kind=ErrorKind.TRANSIENT, retry_after=breaker.retry_in(),
                    error=f"circuit open after repeated failures (next trial in {breaker.retry_in():.0f} s)")))
                continue
            backend = None
            try:
                backend = self._open(alias)
                with providers.limits_for(alias).slot(), _delivering():
                    count = backend.send_messages([message])
                if count != 1:
                    raise RuntimeError(f"backend reported {count} messages sent, not 1")
            except Exception as exc:  # noqa: BLE001 - classified and recorded on the row
                failure = classify(exc, backend)
                self._discard(alias)  # the session's state is unknown after an error
                if failure.kind == ErrorKind.PERMANENT:
                    breaker.success()  # the provider answered: it is up
                else:
                    breaker.failure()
                logger.info("Provider %r: %s (%s) for outbox email %s",
                            alias, failure.error, failure.kind, row.pk)
                if failure.kind == ErrorKind.PERMANENT:
                    # The message (or its recipients) is the problem: another provider
                    # would refuse it too, or worse, accept what the first one rejected.
                    return self._outcome(started, alias, failure)
                failures.append((alias, failure))
                continue
            breaker.success()
            return Outcome(ok=True, provider=alias, started_at=started,
                           finished_at=timezone.now(),
                           # Kept on the attempt: why the earlier providers were passed over.
                           error="; ".join(f"{a}: {f.error}" for a, f in failures),
                           refused=dict(getattr(message, "refused_recipients", {}) or {}))
        if not failures:
            return self._outcome(started, "", Failure(
                kind=ErrorKind.CONFIGURATION, error='no providers: KIPEKEE["PROVIDERS"] is empty'))
        kind = (ErrorKind.CONFIGURATION
                if all(f.kind == ErrorKind.CONFIGURATION for _, f in failures)
                else ErrorKind.TRANSIENT)
        hints = [f.retry_after for _, f in failures if f.retry_after is not None]
        last_alias, last = failures[-1]
        return self._outcome(started, last_alias, Failure(
            kind=kind,
            error="; ".join(f"{alias}: {f.error}" for alias, f in failures),
            code=last.code,
            refused={k: v for _, f in failures for k, v in f.refused.items()},
            retry_after=min(hints) if hints else None,
        ))

    def deliver_many(self, rows: Sequence[OutboxEmail]) -> list[Outcome]:
        """Deliver several claimed rows; one outcome per row, in order.

        The extension point for providers that take many messages per request (an HTTP
        API's batch endpoint): engines hand whole claimed batches here. This default
        sends them one by one over the reused connections.
        """
        return [self.deliver(row) for row in rows]

    @staticmethod
    def _outcome(started: datetime, alias: str, failure: Failure) -> Outcome:
        return Outcome(ok=False, provider=alias, started_at=started, finished_at=timezone.now(),
                       kind=failure.kind, error=failure.error, code=failure.code,
                       refused=failure.refused, retry_after=failure.retry_after)

    def _open(self, alias: str) -> BaseEmailBackend:
        backend = self._backends.get(alias)
        if backend is None:
            backend = providers.build(alias)
            backend.open()
            self._backends[alias] = backend
        return backend

    def _discard(self, alias: str) -> None:
        backend = self._backends.pop(alias, None)
        if backend is not None:
            self._close(alias, backend)

    def close(self) -> None:
        for alias, backend in list(self._backends.items()):
            self._close(alias, backend)
        self._backends.clear()

    @staticmethod
    def _close(alias: str, backend: BaseEmailBackend) -> None:
        try:
            backend.close()
        except Exception as exc:  # noqa: BLE001 - closing a broken session must not mask the send result
            logger.warning("Closing provider %r failed: %r", alias, exc)
