"""``Worker``: the dedicated engine behind ``manage.py kipekee_worker``.

``concurrency`` sender threads deliver over their own provider connections what the
worker's :class:`~kipekee.engines.feed.Feed` claims for all of them (sized to the free
sending slots, handed out a share at a time) and records for all of them. A claim that
finds nothing found nothing due (claims never lose a race), so a sender goes idle only
then, and sleeps until the next row falls due (a retry, a scheduled send), a wake, or
``poll_interval`` seconds for rows other processes write. Wakes: on PostgreSQL the
``NOTIFY`` that enqueue sends (delivered when the enqueuing transaction commits);
everywhere, a claim that brings rows (there is work for the idle senders). With
``once`` the worker ends when every sender is idle and nothing is due, at once.
``stop()`` (the first SIGTERM) lets every thread finish the rows it holds, gives back
what was claimed and not sent, and exits; the command exits at once on a second.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

from django.db import connection, connections, router
from django.utils import timezone

from .. import lanes, outbox
from ..connections import close_all as close_provider_connections
from ..delivery import Deliverer
from ..models import OutboxEmail
from ..outbox import NOTIFY_CHANNEL
from . import Progress, Stats, _drop_broken_connections, beat, engine_name, leases
from .feed import Feed

logger = logging.getLogger("kipekee.worker")

HEARTBEAT_SECONDS = 5.0
#: The shortest sleep of an idle sender (a row due "now" in another process's clock).
MIN_SLEEP = 0.01
LOG_SECONDS = 10.0
LISTEN_RETRY_SECONDS = 5.0


class Worker:
    def __init__(self, *, concurrency: int = 1, batch_size: int = 10,
                 poll_interval: float = 1.0, once: bool = False, name: str | None = None,
                 kind: str = "worker") -> None:
        if concurrency < 1 or batch_size < 1 or poll_interval <= 0:
            raise ValueError("concurrency and batch_size must be >= 1, poll_interval > 0")
        self.concurrency = concurrency
        self.batch_size = batch_size
        self.poll_interval = poll_interval
        self.once = once
        self.kind = kind
        self.name = name or engine_name(kind)
        self.stats = Stats()
        self._stopping = threading.Event()
        self._wake = threading.Event()
        self._done = threading.Event()  # with once: everything due was sent
        self._idle: list[bool] = [False] * concurrency
        self._idle_lock = threading.Lock()
        # Claims for every sender at once, sized to the free sending slots, and records
        # what they send (engines.feed); a claim that brings rows wakes the idle ones.
        self._feed = Feed(engine=self.name, senders=concurrency, batch_size=batch_size,
                          stats=self.stats, on_rows=self._wake.set)

    def stop(self) -> None:
        """Finish the batches in hand, then return from :meth:`run`."""
        self._stopping.set()
        self._wake.set()

    def run(self) -> None:
        beat(self.name, self.kind, self.stats, starting=True)
        logger.info("%s started: %d sender thread(s), batches of %d", self.name,
                    self.concurrency, self.batch_size)
        threads = [threading.Thread(target=self._send_loop, args=(i,), name=f"kipekee-sender-{i}",
                                    daemon=True) for i in range(self.concurrency)]
        for thread in threads:
            thread.start()
        listener = None if self.once else _Listener.start(self._wake, self.poll_interval)
        last_beat = time.monotonic()
        progress = Progress(self.name, self.stats, logger, every=LOG_SECONDS)
        try:
            while any(t.is_alive() for t in threads):
                for t in threads:
                    t.join(timeout=0.2)
                now = time.monotonic()
                if now - last_beat >= HEARTBEAT_SECONDS:
                    beat(self.name, self.kind, self.stats)
                    last_beat = now
                progress.tick()
        finally:
            if listener is not None:
                listener.stop()
            try:
                self._feed.close()  # what was claimed and not sent goes back; records finish
            except Exception:  # noqa: BLE001 - what it held is left to the leases; logged
                logger.exception("%s: giving back unsent rows failed", self.name)
            # Nothing is held now: the lease thread ends before the process goes on
            # to exit (a daemon thread in a database call is cut off at shutdown).
            leases.keeper().join(HEARTBEAT_SECONDS)
            beat(self.name, self.kind, self.stats, stopped=True)
            progress.summary()
            connection.close()
            # QUIT the warm provider connections now: a --processes child leaves by
            # os._exit, which runs no atexit hook.
            close_provider_connections()

    def _send_loop(self, index: int) -> None:
        deliverer = Deliverer()
        try:
            while not self._stopping.is_set() and not self._done.is_set():
                self._set_idle(index, False)
                try:
                    rows = self._feed.take(self._stopping)
                    if rows:
                        try:
                            outcomes = deliverer.deliver_many(rows)
                        except Exception:
                            self._feed.abandon(rows)
                            raise
                        self._feed.done(rows, outcomes)
                        continue
                    # Nothing was due (claims never lose a race): sleep until a row falls
                    # due, a wake (NOTIFY, a claim that found rows) or the next poll.
                    if self._set_idle(index, True) and self._nothing_due():
                        self._done.set()  # --once: everyone is idle and nothing is due
                        self._wake.set()
                        return
                    sleep_for = self._sleep_for()
                except Exception:  # noqa: BLE001 - a database blip must not kill the thread
                    logger.exception("%s sender %d: sending failed; its rows are retried after "
                                     "their lease", self.name, index)
                    _drop_broken_connections()
                    self._feed.recover()
                    self._stopping.wait(self.poll_interval)
                    continue
                self._wake.wait(sleep_for)
                if not self._done.is_set():  # once done, the wake stays set for every sender
                    self._wake.clear()
        finally:
            deliverer.close()
            connections.close_all()  # this thread's database connections

    def _set_idle(self, index: int, idle: bool) -> bool:
        """Mark sender ``index`` (not) idle; True when, with ``once``, all now are."""
        with self._idle_lock:
            self._idle[index] = idle
            return self.once and all(self._idle)

    @staticmethod
    def _nothing_due() -> bool:
        due = outbox.next_due_at()
        return due is None or due > timezone.now()

    def _sleep_for(self) -> float:
        """Seconds an idle sender sleeps: until the next row falls due (or a lease
        expires, or a lane's rate lets rows through again), at most ``poll_interval``."""
        wait = self.poll_interval
        due = outbox.next_due_at()
        if due is not None:
            wait = min(wait, (due - timezone.now()).total_seconds())
        rate = lanes.planner().rate_wait()
        if rate > 0:
            wait = min(wait, rate)
        return max(MIN_SLEEP, wait)


class Prefork:
    """Run ``target`` (one worker) in ``processes`` forked processes and keep them running.

    One Python process sends on one core: its sender threads share the interpreter lock,
    and with four or more of them each message's reply waits for the lock as much as for
    the provider (``bench/README.md``). Forked processes do not share it. A process that
    dies is replaced (at most once a second per slot); with ``once``, a process that has
    drained what was due and exited 0 is not. :meth:`stop` sends SIGTERM to every
    process: they handle it as a single worker does (the first finishes the batches in
    hand, a second exits at once). The processes ignore SIGINT: a Ctrl-C in a terminal
    reaches the whole process group, and only this process's forwarding should count.

    Should this process die without stopping them (SIGKILL, an OOM kill), each process
    stops as on a first SIGTERM: it watches a pipe whose only write end this process
    holds, and the kernel closes that end when this process ends, however it ends. A
    pipe rather than Linux's ``prctl(PR_SET_PDEATHSIG)``: it works on every POSIX
    system, needs no ctypes, and does not fire when the thread that forked exits (which
    PDEATHSIG does) nor miss a parent that died before the child armed it.
    """

    def __init__(self, processes: int, target: Callable[[], None], *, once: bool = False) -> None:
        if processes < 1:
            raise ValueError("processes must be >= 1")
        self.processes = processes
        self.target = target
        self.once = once
        self._stopping = threading.Event()
        # fork, on purpose (the default becomes forkserver in Python 3.14): the children
        # get this process's settings as they are, as threads of one worker do.
        self._context = multiprocessing.get_context("fork")
        self._children: list[Any] = []
        self._lifeline = (-1, -1)  # (read end, write end), made by run()

    def stop(self) -> None:
        """Ask every process to stop (again: to exit at once)."""
        self._stopping.set()
        for child in self._children:
            if child.pid is not None and child.exitcode is None:
                os.kill(child.pid, signal.SIGTERM)

    def run(self) -> int:
        """Start the processes, supervise them until :meth:`stop` (or, with ``once``, until
        each has drained), wait for them; return how many exited with an error."""
        connections.close_all()  # each child opens its own; a shared socket would be corrupted
        self._lifeline = os.pipe()  # this process holds the write end while it lives
        self._children = [self._start(i) for i in range(self.processes)]
        started = [time.monotonic()] * self.processes
        finished: set[int] = set()  # with once: slots whose process is done, for good
        failed = 0
        while not self._stopping.is_set():
            for i, child in enumerate(self._children):
                if child.is_alive() or i in finished:
                    continue
                if child.exitcode:
                    failed += 1
                if self.once:
                    finished.add(i)  # drained, or failed: not restarted; a cron run reports it
                    continue
                logger.error("kipekee worker process %s exited with %s; starting another",
                             child.pid, child.exitcode)
                time.sleep(max(0.0, 1.0 - (time.monotonic() - started[i])))
                self._children[i], started[i] = self._start(i), time.monotonic()
            if len(finished) == self.processes:
                break
            self._stopping.wait(0.2)
        for child in self._children:
            child.join()
            if self._stopping.is_set() and child.exitcode:
                failed += 1
        for end in self._lifeline:
            os.close(end)
        return failed

    def _start(self, index: int) -> Any:
        child = self._context.Process(target=_child, args=(self.target, *self._lifeline),
                                      name=f"kipekee-worker-{index}")
        child.start()
        return child


def _child(target: Callable[[], None], lifeline: int, parent_end: int) -> None:
    # Not the supervisor's handlers (a copy of them would signal the siblings): SIGTERM
    # as by default until the target installs its own; SIGINT ignored (see Prefork).
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.close(parent_end)  # only the supervisor may hold it, or its death goes unseen
    threading.Thread(target=_stop_with_parent, args=(lifeline,), name="kipekee-lifeline",
                     daemon=True).start()
    target()


def _stop_with_parent(lifeline: int) -> None:
    """Wait for the supervisor to end (nothing is ever written: the read returns at the
    end of the pipe, when the supervisor's write end is closed), then stop this worker
    as the supervisor's SIGTERM would have."""
    while os.read(lifeline, 1):
        pass
    # A supervisor that stops in order waits for its processes before it lets go.
    logger.error("kipekee worker process %s: its supervisor is gone; stopping", os.getpid())
    os.kill(os.getpid(), signal.SIGTERM)


class _Listener:
    """LISTEN for enqueue notifications on PostgreSQL, setting ``wake`` for each."""

    def __init__(self, wake: threading.Event, poll_interval: float, db: str) -> None:
        self.wake = wake
        self._db = db
        self.poll_interval = poll_interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kipekee-listen", daemon=True)

    @classmethod
    def start(cls, wake: threading.Event, poll_interval: float) -> _Listener | None:
        db = router.db_for_write(OutboxEmail)
        if connections[db].vendor != "postgresql":
            return None  # polling only
        listener = cls(wake, poll_interval, db)
        listener._thread.start()
        return listener

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.poll_interval + 1)

    def _run(self) -> None:
        import psycopg  # noqa: PLC0415 - the optional postgres extra, PostgreSQL only

        params = connections[self._db].get_connection_params()
        params.pop("cursor_factory", None)
        params.pop("context", None)
        while not self._stop.is_set():
            try:
                with psycopg.connect(**params, autocommit=True) as conn:
                    conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
                    self.wake.set()  # a NOTIFY may have been missed while not listening
                    while not self._stop.is_set():
                        for _ in conn.notifies(timeout=self.poll_interval, stop_after=1):
                            self.wake.set()
            except psycopg.Error as exc:
                # Meanwhile the senders poll every poll_interval: slower, not lost.
                logger.warning("LISTEN %s failed (%s); polling, and listening again in %.0f s",
                               NOTIFY_CHANNEL, exc, LISTEN_RETRY_SECONDS)
                self._stop.wait(LISTEN_RETRY_SECONDS)


def notify_if_listening(using: str) -> None:
    """Inside the enqueuing transaction: wake LISTENing workers when it commits."""
    if connections[using].vendor == "postgresql":
        with connections[using].cursor() as cursor:
            cursor.execute(f"NOTIFY {NOTIFY_CHANNEL}")


__all__ = ["Prefork", "Worker", "notify_if_listening"]
