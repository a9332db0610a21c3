"""The ``thread`` engine: one background thread per web process.

For a single deployment (the tours seed ran exactly one): no extra service, yet queued
and deferred rows are delivered with retries. The thread starts on the first enqueue or
the first request of the process, wakes when a transaction that enqueued commits (and
only then: a request that queued nothing costs it nothing), and otherwise sleeps until
the next row falls due. Several gunicorn workers each run one;
claims are atomic, so they share the outbox safely. A forked child starts its own.

At a normal exit of the process (``sys.exit``, the end of the main module: what a
gunicorn or uWSGI worker does when it stops) the engine finishes the batch it is sending
and records it, and gives back what it claimed ahead, waiting at most ``EXIT_WAIT``
seconds; only what is still in flight then is left to its lease (a process killed with
SIGKILL leaves everything it held to the lease).
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
from collections.abc import Callable

from django.utils import timezone

from .. import outbox
from ..registries import PerProcess
from . import Sender, Stats, beat, engine_name, leases

logger = logging.getLogger("kipekee.thread")

MAX_SLEEP = 30.0  # re-check at least this often (rows written by other processes)
HEARTBEAT_SECONDS = 10.0
#: Seconds a normal exit waits for the engine to record what it is sending (a worker
#: of gunicorn is killed after its graceful timeout, 30 s by default).
EXIT_WAIT = 10.0


class ThreadEngine:
    def __init__(self, batch_size: int = 10) -> None:
        self.batch_size = batch_size
        self.name = engine_name("thread")
        self.stats = Stats()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._exit_hook = False

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def wake(self) -> None:
        """Rows are waiting (a commit queued mail): look now, not at the next due time."""
        self.start()
        self._wake.set()

    def stop(self, timeout: float = 10.0) -> None:
        """Finish the batch in hand, give back the rest, and wait for the engine's thread
        and then the lease keeper's (``timeout`` seconds for both)."""
        self._stopping.set()
        self._wake.set()
        deadline = time.monotonic() + timeout
        if self._thread is not None:
            self._thread.join(timeout)
        if not self.alive:
            # What it held is recorded or given back: the renewals end, and the lease
            # thread with them, before a normal exit goes on to shut the interpreter down.
            leases.keeper().join(max(0.0, deadline - time.monotonic()))

    def start(self) -> None:
        """Start the thread if it is not running; it looks for due rows once, then
        sleeps until the next due time or a :meth:`wake`."""
        if self.alive:
            return
        with self._lock:
            if not self.alive:
                self._stopping.clear()
                # A daemon thread, so that a stop that overruns EXIT_WAIT cannot hold the
                # process; the exit hook below is what stops it in order.
                self._thread = threading.Thread(target=self._run, name="kipekee-engine",
                                                daemon=True)
                self._thread.start()
                if not self._exit_hook:
                    _at_interpreter_exit(self._at_exit)
                    self._exit_hook = True

    def _at_exit(self) -> None:
        """At interpreter exit, before daemon threads are stopped: finish the batch in
        hand, give back the rest, within ``EXIT_WAIT`` seconds."""
        if self._pid != os.getpid() or not self.alive:
            return  # a forked child inherits the hook, not the thread
        self.stop(EXIT_WAIT)
        if self.alive:
            logger.warning("Kipekee thread engine: still sending after %.0f s at exit; the "
                           "rows it holds go out again when their lease ends", EXIT_WAIT)

    def _run(self) -> None:
        sender = Sender(engine=self.name, batch_size=self.batch_size, stats=self.stats)
        last_beat = 0.0
        try:
            while not self._stopping.is_set():
                try:
                    if not last_beat:  # the engine's first beat: rows of removed lanes first
                        beat(self.name, "thread", self.stats, starting=True)
                        last_beat = time.monotonic()
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


def _at_interpreter_exit(hook: Callable[[], None]) -> None:
    """Call ``hook`` when the interpreter exits normally, early enough for the engine to
    record what it sent.

    ``atexit`` is too late: its hooks run after ``threading``'s own exit hooks, where
    ``concurrent.futures`` shuts its executors down, and the engine's recorder thread (an
    executor) would then refuse the last batch's record. ``threading._register_atexit``
    (private, CPython 3.9+) is the hook ``concurrent.futures`` uses itself; hooks run
    last-registered first, so this one runs before the executors are shut.
    """
    register = getattr(threading, "_register_atexit", None)
    if register is None:
        atexit.register(hook)
    else:
        register(hook)


_engine = PerProcess(ThreadEngine)


def engine() -> ThreadEngine:
    """This process's thread engine (a new one after a fork)."""
    return _engine.get()
