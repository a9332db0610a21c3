"""Deadlines: the time by which a delivery attempt must be over, whatever the network does.

A caller that has to be done by a certain time sets a deadline around the work; code that
waits on the network reads it and gives up in time. The in-request path sets one of
``NOW_TIME_BUDGET`` around each attempt, so a slow provider delays the request by the
budget at most and the mail is left to an engine::

    with deadlines.within(0.5):
        outcome = deliverer.deliver(row)

**The hook for email backends.** A backend that waits on the network (connect, TLS,
authentication, each reply) should bound each wait by :func:`remaining` and raise
:class:`DeadlineExceeded` (a ``TimeoutError``, so it is classified as transient) once it
is past. Kipekee's SMTP backend does. A backend that ignores it still works; the deadline
is then only as good as that backend's own timeouts.

The deadline lives in a context variable: it applies to the current thread (or asyncio
task) and everything it calls, with no argument threaded through Django's backend API.
Nested deadlines never extend an outer one: the earliest wins.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

__all__ = ["DeadlineExceeded", "check", "remaining", "until", "within"]

_deadline: ContextVar[float | None] = ContextVar("kipekee_deadline", default=None)


class DeadlineExceeded(TimeoutError):
    """The work was still going when its deadline came."""


@contextmanager
def until(at: float | None) -> Iterator[None]:
    """Within the block, the deadline is ``at`` (a :func:`time.monotonic` time), or the
    one already set if that is earlier. ``None`` adds no deadline."""
    current = _deadline.get()
    if at is None or (current is not None and current <= at):
        yield
        return
    token = _deadline.set(at)
    try:
        yield
    finally:
        _deadline.reset(token)


@contextmanager
def within(seconds: float | None) -> Iterator[None]:
    """Within the block, the deadline is ``seconds`` from now (or an earlier one)."""
    with until(None if seconds is None else time.monotonic() + seconds):
        yield


def remaining() -> float | None:
    """Seconds left before the deadline (zero or less once past); ``None`` if none is set."""
    at = _deadline.get()
    return None if at is None else at - time.monotonic()


def check(doing: str = "") -> None:
    """Raise :class:`DeadlineExceeded` if the deadline has passed."""
    left = remaining()
    if left is not None and left <= 0:
        raise DeadlineExceeded(f"deadline reached{' ' + doing if doing else ''}")
