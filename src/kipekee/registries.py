"""Objects made on first use, one per process or one per provider, thread-safely.

:class:`PerProcess`: made again after a fork (threads do not survive a fork, so an
object that runs one must not be inherited). :class:`PerProvider`: one per provider
alias (circuit breakers, connection pools), dropped together when the settings change.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class PerProcess(Generic[T]):
    """``get()`` returns this process's ``make()``, thread-safely."""

    def __init__(self, make: Callable[[], T]) -> None:
        self._make = make
        self._made: T | None = None
        self._pid = 0
        self._guard = threading.Lock()

    def get(self) -> T:
        with self._guard:
            if self._made is None or self._pid != os.getpid():
                self._made, self._pid = self._make(), os.getpid()
            return self._made

    def current(self) -> T | None:
        """This process's, if made yet (nothing is made)."""
        with self._guard:
            return self._made if self._pid == os.getpid() else None

    def set(self, value: T | None) -> None:
        """Make ``value`` this process's (None: make a new one on next use); for tests."""
        with self._guard:
            self._made, self._pid = value, os.getpid()


class PerProvider(Generic[T]):
    """``get(alias)`` returns provider ``alias``'s ``make(alias)``, made on first use."""

    def __init__(self, make: Callable[[str], T]) -> None:
        self._make = make
        self._made: dict[str, T] = {}
        self._guard = threading.Lock()

    def get(self, alias: str) -> T:
        with self._guard:
            made = self._made.get(alias)
            if made is None:
                made = self._made[alias] = self._make(alias)
            return made

    def all(self) -> list[T]:
        with self._guard:
            return list(self._made.values())

    def clear(self) -> list[T]:
        """Drop them all (the next ``get`` makes anew); those dropped."""
        with self._guard:
            dropped, self._made = list(self._made.values()), {}
        return dropped

    def clear_after_fork(self) -> list[T]:
        """:meth:`clear` in a forked child, where another thread of the parent may have
        held the lock at the fork: a new lock, not that one."""
        self._guard = threading.Lock()
        dropped, self._made = list(self._made.values()), {}
        return dropped
