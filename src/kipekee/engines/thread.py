"""The ``thread`` engine: one background thread per web process.

For a single deployment (the tours seed ran exactly one): no extra service, yet queued
and deferred rows are delivered with retries. The thread starts on the first enqueue or
the first request of the process, wakes when a transaction that enqueued commits (and
only then: a request that queued nothing costs it nothing), and otherwise sleeps until
the next row falls due. Several gunicorn workers each run one;
claims are atomic, so they share the outbox safely. A forked child starts its own.
"""

from __future__ import annotations

import logging
import os
import threading
import time

from django.utils import timezone

from .. import outbox
from . import Sender, Stats, beat, engine_name

logger = logging.getLogger("kipekee.thread")

MAX_SLEEP = 30.0  # re-check at least this often (rows written by other processes)
HEARTBEAT_SECONDS = 10.0


class ThreadEngine:
    def __init__(self, batch_size: int = 10) -> None:
        self.batch_size = batch_size
        self.name = engine_name("thread")
        self.stats = Stats()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def wake(self) -> None:
        """Rows are waiting (a commit queued mail): look now, not at the next due time."""
        self.start()
        self._wake.set()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def start(self) -> None:
        """Start the thread if it is not running; it looks for due rows once, then
        sleeps until the next due time or a :meth:`wake`."""
        if self.alive:
            return
        with self._lock:
            if not self.alive:
                self._stopping.clear()
                self._thread = threading.Thread(target=self._run, name="kipekee-engine",
                                                daemon=True)
                self._thread.start()

    def _run(self) -> None:
        sender = Sender(engine=self.name, batch_size=self.batch_size, stats=self.stats)
        last_beat = 0.0
        try:
            while not self._stopping.is_set():
                try:
                    sender.drain(self._stopping)
                    if time.monotonic() - last_beat >= HEARTBEAT_SECONDS:
                        beat(self.name, "thread", self.stats)
                        last_beat = time.monotonic()
                    delay = self._sleep_for()
                except Exception:  # noqa: BLE001 - keep the engine alive; rows stay in the outbox
                    logger.exception("Kipekee thread engine: a round failed; retrying soon")
                    sender.recover()
                    delay = 1.0
                self._wake.wait(delay)
                self._wake.clear()
        finally:
            sender.close()

    def _sleep_for(self) -> float:
        due = outbox.next_due_at()
        if due is None:
            return MAX_SLEEP
        return min(MAX_SLEEP, max(0.05, (due - timezone.now()).total_seconds()))


_engine: ThreadEngine | None = None
_pid = 0
_guard = threading.Lock()


def engine() -> ThreadEngine:
    """This process's thread engine (a new one after a fork)."""
    global _engine, _pid
    with _guard:
        if _engine is None or _pid != os.getpid():
            _engine, _pid = ThreadEngine(), os.getpid()
        return _engine
