"""A circuit breaker per provider, per process.

After ``FAILURES`` consecutive transient or configuration failures, or at the first
configuration failure of the whole provider (bad credentials, an untrusted certificate:
the next message would meet it too, and each try is an alarm; not a sender's unverified
domain, which another sender does not meet), a provider's circuit opens:
delivery skips it (and fails over at once instead of waiting for a timeout on every
message). After ``COOLDOWN_SECONDS`` one trial send is let through (half-open): a
success closes the circuit, a failure opens it for another cool-down. A permanent
failure (a refused message) proves the provider is up and counts as a success.

A message passed over because every circuit was open was not sent anywhere:
:meth:`CircuitBreaker.postpone_for` says how long it waits for the next trial, and the
outbox does not count that as an attempt (``recording.record``).
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable

from . import conf
from .registries import PerProvider


class CircuitBreaker:
    CLOSED, OPEN, HALF_OPEN = "closed", "open", "half-open"

    def __init__(self, *, failures: int, cooldown: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.threshold = failures
        self.cooldown = cooldown
        self._clock = clock
        self._lock = threading.Lock()
        self._failures = 0
        self._opened_at = 0.0
        self._state = self.CLOSED
        self._trial_out = False

    @property
    def state(self) -> str:
        with self._lock:
            return self._state

    def allow(self) -> bool:
        """May this send go through the provider now?"""
        with self._lock:
            if self._state == self.CLOSED:
                return True
            if self._state == self.OPEN and self._clock() >= self._opened_at + self.cooldown:
                self._state, self._trial_out = self.HALF_OPEN, False
            if self._state == self.HALF_OPEN and not self._trial_out:
                self._trial_out = True  # exactly one trial at a time
                return True
            return False

    def retry_in(self) -> float:
        """Seconds until the next trial may go through (0 when closed).

        Half-open with its trial out: a whole cool-down, the time of the next trial
        should this one fail (should it succeed, the circuit closes at once). Not 0: a
        message passed over now would be back before the trial has even answered.
        """
        with self._lock:
            if self._state == self.CLOSED:
                return 0.0
            if self._state == self.HALF_OPEN:
                return self.cooldown if self._trial_out else 0.0
            return max(0.0, self._opened_at + self.cooldown - self._clock())

    def postpone_for(self) -> float:
        """Seconds a message passed over by this open circuit waits: until the next
        trial, plus a random part of one cool-down, so the messages waiting for the
        trial come back spread over the cool-down after it, not all at the same moment
        (of which one would be the trial and the rest passed over again)."""
        return self.retry_in() + random.uniform(0.0, self.cooldown)

    def unused(self) -> None:
        """The send :meth:`allow` let through did not happen (a local limit held it):
        a half-open circuit's trial is free for the next one."""
        with self._lock:
            if self._state == self.HALF_OPEN:
                self._trial_out = False

    def success(self) -> None:
        with self._lock:
            self._state, self._failures, self._trial_out = self.CLOSED, 0, False

    def failure(self, *, configuration: bool = False) -> None:
        """The provider failed a send; ``configuration``: in a way that no retry fixes
        and every message meets (it opens the circuit at once)."""
        with self._lock:
            self._failures += 1
            if (configuration or self._state == self.HALF_OPEN
                    or self._failures >= self.threshold):
                self._state, self._opened_at, self._trial_out = self.OPEN, self._clock(), False


def _new_breaker(alias: str) -> CircuitBreaker:
    settings = conf.get().circuit
    return CircuitBreaker(failures=settings.failures, cooldown=settings.cooldown)


_breakers = PerProvider(_new_breaker)


def for_provider(alias: str) -> CircuitBreaker:
    return _breakers.get(alias)


def reset() -> None:
    _breakers.clear()


conf.reset_on_change(reset)
