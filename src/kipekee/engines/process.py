"""One object per process, made on first use and made again after a fork (threads do not
survive a fork, so an object that runs one must not be inherited)."""

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
