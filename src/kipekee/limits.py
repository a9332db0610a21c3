"""Per-provider limits: requests per time window, and concurrent sends.

Configured next to the backend::

    "mailtrap": {"BACKEND": "...", "OPTIONS": {...},
                 "LIMITS": {"RATE": "150/10s", "CONCURRENCY": 10}}

``RATE`` counts calls into the provider (one ``send_messages`` call, or one batch
request), in a sliding window, per process. A lane's ``RATE`` (``KIPEKEE["LANES"]``)
counts the rows claimed from it, the same way (:func:`for_lane`). ``CONCURRENCY`` bounds
how many connections this process has open to the provider at once (Mailtrap allows 10
SMTP connections); the connection pool enforces it (:mod:`kipekee.connections`): a thread
sends only on a connection it checked out.
"""

from __future__ import annotations

import bisect
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from django.core.signals import setting_changed
from django.dispatch import receiver

from .exceptions import ConfigurationError

_RATE = re.compile(r"^\s*(\d+)\s*/\s*(\d*\.?\d*)\s*(s|m|h|d)\s*$")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400}


@dataclass(frozen=True, kw_only=True)
class Rate:
    count: int
    per: float  # seconds

    @classmethod
    def parse(cls, text: str) -> Rate:
        """``"150/10s"``, ``"15/s"``, ``"500/d"`` → a Rate."""
        match = _RATE.match(text) if isinstance(text, str) else None
        if not match or int(match[1]) <= 0:
            raise ConfigurationError(f"RATE must look like '150/10s' or '500/d', not {text!r}.")
        per = float(match[2] or 1) * _UNIT[match[3]]
        return cls(count=int(match[1]), per=per)


class SlidingWindow:
    """At most ``rate.count`` acquisitions in any ``rate.per`` seconds (thread-safe).

    A call counts from when it starts until ``rate.per`` after it *finished*
    (:meth:`finished`): the provider counts a request when it receives it, which is some
    time after the client started it, so counting from the start alone would let the
    next window's first request reach the provider too early after a slow one.
    """

    def __init__(self, rate: Rate) -> None:
        self.rate = rate
        self._times: list[float] = []  # sorted
        self._lock = threading.Lock()

    def reserve(self) -> float:
        """Take a slot; return how many seconds the caller must wait before using it."""
        return self._take()[1]

    def _take(self) -> tuple[float, float]:
        with self._lock:
            now = time.monotonic()
            cutoff = bisect.bisect_right(self._times, now - self.rate.per)
            del self._times[:cutoff]
            if len(self._times) < self.rate.count:
                start = now
            else:
                # The slot frees when the oldest of the last `count` uses leaves the window.
                start = self._times[-self.rate.count] + self.rate.per
            bisect.insort(self._times, start)
            return start, max(0.0, start - now)

    def acquire(self) -> float:
        """Take a slot, waiting for it; return its start (for :meth:`finished`)."""
        start, wait = self._take()
        if wait:
            time.sleep(wait)
        return start

    def take(self, count: int) -> int:
        """Take up to ``count`` slots that are free now, without waiting; how many."""
        with self._lock:
            now = time.monotonic()
            del self._times[:bisect.bisect_right(self._times, now - self.rate.per)]
            granted = max(0, min(count, self.rate.count - len(self._times)))
            self._times.extend([now] * granted)  # now is the newest time: still sorted
            return granted

    def give_back(self, count: int) -> None:
        """Return ``count`` of the slots :meth:`take` just took (they were not used)."""
        with self._lock:
            del self._times[len(self._times) - min(count, len(self._times)):]

    def free_in(self) -> float:
        """Seconds until a slot is free (0: one is free now)."""
        with self._lock:
            now = time.monotonic()
            del self._times[:bisect.bisect_right(self._times, now - self.rate.per)]
            if len(self._times) < self.rate.count:
                return 0.0
            return self._times[-self.rate.count] + self.rate.per - now

    def finished(self, start: float) -> None:
        """The call that took the slot at ``start`` ended now: count it from now on."""
        with self._lock:
            index = bisect.bisect_left(self._times, start)
            if index < len(self._times) and self._times[index] == start:
                del self._times[index]
                bisect.insort(self._times, max(start, time.monotonic()))


class ProviderLimits:
    """The rate window of one provider, shared by the process."""

    def __init__(self, rate: Rate | None) -> None:
        self.window = SlidingWindow(rate) if rate else None

    @contextmanager
    def slot(self) -> Iterator[None]:
        start = None
        try:
            if self.window is not None:
                start = self.window.acquire()
            yield
        finally:
            if start is not None:
                assert self.window is not None
                self.window.finished(start)


_lock = threading.Lock()
_limits: dict[tuple[str, str | None], ProviderLimits] = {}


def for_provider(alias: str, rate: str | None) -> ProviderLimits:
    key = (alias, rate)
    with _lock:
        limits = _limits.get(key)
        if limits is None:
            limits = _limits[key] = ProviderLimits(Rate.parse(rate) if rate else None)
        return limits


_lanes: dict[tuple[str, str], SlidingWindow] = {}


def for_lane(name: str, rate: str) -> SlidingWindow:
    """The window of rows claimed from lane ``name`` (``KIPEKEE["LANES"][name]["LIMITS"]``),
    shared by the process: a row counts when it is claimed."""
    key = (name, rate)
    with _lock:
        window = _lanes.get(key)
        if window is None:
            window = _lanes[key] = SlidingWindow(Rate.parse(rate))
        return window


def reset() -> None:
    with _lock:
        _limits.clear()
        _lanes.clear()


@receiver(setting_changed)
def _settings_changed(*, setting: str, **kwargs: object) -> None:
    # (Not conf.SETTINGS: conf imports this module.) Limits come from KIPEKEE alone.
    if setting == "KIPEKEE":
        reset()
