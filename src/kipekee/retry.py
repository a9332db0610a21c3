"""When to try a message again: one policy object, one question.

:meth:`RetryPolicy.next_due` answers "after this failure, when (if ever) do we try
again?" Exponential backoff with equal jitter (AWS architecture blog, "Exponential
Backoff And Jitter"), capped, bounded by a number of attempts and a lifetime; a provider's
own hint (SMTP 4xx text, HTTP 429 Retry-After) wins over the computed delay.
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.utils import timezone

from . import conf
from .models import ErrorKind


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    base_delay: float
    max_delay: float
    max_attempts: int
    lifetime: timedelta
    jitter: bool = True

    @classmethod
    def from_settings(cls) -> RetryPolicy:
        r = conf.get().retry
        return cls(base_delay=r.base_delay, max_delay=r.max_delay,
                   max_attempts=r.max_attempts, lifetime=r.lifetime, jitter=r.jitter)

    def delay(self, attempt: int, hint: float | None = None) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based).

        Equal jitter: half the exponential ceiling ``min(max_delay, base_delay * 2 **
        (attempt - 1))`` plus ``uniform(0, half)``. Of the AWS article's shapes it keeps a
        floor: a retry never comes at once after a failure (a server that just timed out
        or said 451 is not asked again within the second, which full jitter's
        ``uniform(0, ceiling)`` does now and then, spending an attempt for nothing),
        while messages that failed together (an outage) still spread over half the
        ceiling instead of returning as one wave.

        A provider's hint (``Retry-After``, "try again in 10 minutes") is the delay, even
        past ``max_delay``: trying earlier would only spend an attempt on a certain
        refusal. ``max_delay`` caps Kipekee's own backoff; the message's lifetime bounds
        both (:meth:`next_due`)."""
        if hint is not None and hint >= 0:
            return hint
        ceiling: float = min(self.max_delay, self.base_delay * 2 ** max(attempt - 1, 0))
        return ceiling / 2 + random.uniform(0.0, ceiling / 2) if self.jitter else ceiling

    def next_due(
        self,
        *,
        kind: str,
        attempt: int,
        created_at: datetime,
        hint: float | None = None,
        now: datetime | None = None,
    ) -> datetime | None:
        """When to try again after a failure of ``kind``; ``None`` means give up (failed)."""
        if kind == ErrorKind.PERMANENT:
            return None
        due = (now or timezone.now()) + timedelta(seconds=self.delay(attempt, hint))
        return None if self.exhausted(attempt=attempt, created_at=created_at, at=due) else due

    def postponed_due(self, *, wait: float, created_at: datetime,
                      now: datetime | None = None) -> datetime | None:
        """When to take again a message that no provider was tried for (every circuit
        open): after ``wait`` seconds, the circuits' next trial. Not an attempt, so the
        attempts left stay as they were; only the lifetime ends it (``None``: give up).
        """
        due = (now or timezone.now()) + timedelta(seconds=max(wait, 0.0))
        return None if due > created_at + self.lifetime else due

    def why_not(self, *, attempt: int, created_at: datetime) -> str:
        """Why a transient failure after attempt number ``attempt`` is final (when
        :meth:`next_due` gave ``None``), for the row's reason."""
        if attempt >= self.max_attempts:
            return f"no attempts left: {attempt} of {self.max_attempts} (RETRY MAX_ATTEMPTS) made"
        ends = (created_at + self.lifetime).isoformat(timespec="seconds")
        return (f"the next try would come after the message's lifetime ends at {ends} "
                "(RETRY LIFETIME_SECONDS)")

    def exhausted(self, *, attempt: int, created_at: datetime, at: datetime | None = None) -> bool:
        """True when no attempt after number ``attempt`` may be made (at time ``at``)."""
        return attempt >= self.max_attempts or (at or timezone.now()) > created_at + self.lifetime


# -- what a server's reply asks ------------------------------------------------------

_HINT = re.compile(r"(?:try|retry)[^0-9]{0,20}?(\d+)\s*(s|sec|second|m|min|minute|h|hour)s?\b",
                   re.I)
_HINT_UNIT = {"s": 1, "sec": 1, "second": 1, "m": 60, "min": 60, "minute": 60,
              "h": 3600, "hour": 3600}


def smtp_retry_hint(reply: str) -> float | None:
    """Seconds a 4xx reply asks us to wait ("451 4.7.1 Try again in 5 minutes"), if any."""
    match = _HINT.search(reply)
    if not match:
        return None
    return float(match[1]) * _HINT_UNIT[match[2].lower()]


_TRANSIENT_REPLY = re.compile(r"4\d\d(?:\s|$)")


def transient_refusals(refused: Mapping[str, str]) -> dict[str, str]:
    """The recipients a server refused for now (a 4xx reply to their ``RCPT TO``), from an
    outcome's ``refused`` (address → reply; suppressions and 5xx replies are left out)."""
    return {a: why for a, why in refused.items() if _TRANSIENT_REPLY.match(why)}
