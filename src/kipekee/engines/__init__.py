"""Engines decide *where* delivery runs, never *how*: they claim due rows from the outbox,
hand them to :class:`kipekee.delivery.Deliverer` and record the outcomes.

- ``thread``: a background thread in each web process (one deployment, still retries);
- ``worker``: ``manage.py kipekee_worker`` processes (``engines.worker.Worker``), whose
  sender threads share one :class:`~kipekee.engines.feed.Feed` (claims sized to their
  free slots, records for all of them);
- ``celery``: Celery tasks (``kipekee.contrib.celery``);
- ``tasks``: Django's task framework, any backend (``kipekee.engines.tasks``).

The thread engine, Celery tasks and django.tasks tasks run :class:`Sender`, the loop of
one sender thread.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime

from django.db import DEFAULT_DB_ALIAS, DatabaseError, connections
from django.utils import timezone

from .. import conf, outbox
from ..delivery import Deliverer, Outcome
from ..models import EngineHeartbeat, OutboxEmail, Status
from . import leases
from .records import record_batch

logger = logging.getLogger("kipekee.engines")


@dataclass
class Stats:
    """Counters shared by the sender threads of one engine."""

    sent: int = 0
    deferred: int = 0
    failed: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, status: str) -> None:
        with self.lock:
            if status == Status.SENT:
                self.sent += 1
            elif status == Status.DEFERRED:
                self.deferred += 1
            elif status == Status.FAILED:
                self.failed += 1

    def snapshot(self) -> tuple[int, int, int]:
        with self.lock:
            return self.sent, self.deferred, self.failed


class Progress:
    """An engine's progress lines on its logger: every ``every`` seconds what it sent,
    deferred and failed in that interval and the rate (nothing when idle), and a summary
    at exit. Thread-safe: Celery and task workers log from whichever task runs."""

    def __init__(self, name: str, stats: Stats, log: logging.Logger, *,
                 every: float = 10.0) -> None:
        self.name = name
        self.stats = stats
        self.log = log
        self.every = every
        self.started = self._last = time.monotonic()
        self._logged = (0, 0, 0)
        self._lock = threading.Lock()

    def tick(self) -> None:
        """Log the interval's line if ``every`` seconds have passed since the last."""
        with self._lock:
            now = time.monotonic()
            seconds = now - self._last
            if seconds < self.every:
                return
            totals = self.stats.snapshot()
            sent, deferred, failed = (a - b for a, b in zip(totals, self._logged, strict=True))
            self._last, self._logged = now, totals
        if sent or deferred or failed:
            self.log.info("%s: %d sent, %d deferred, %d failed in %.0f s (%.1f sent/s); "
                          "total sent=%d deferred=%d failed=%d", self.name, sent, deferred,
                          failed, seconds, sent / seconds, *totals)

    def summary(self) -> None:
        """The exit line: totals, time, average rate."""
        seconds = time.monotonic() - self.started
        sent, deferred, failed = self.stats.snapshot()
        self.log.info("%s stopped: sent=%d deferred=%d failed=%d in %.1f s (%.1f sent/s)",
                      self.name, sent, deferred, failed, seconds,
                      sent / seconds if seconds > 0 else 0.0)


class Sender:
    """One sender thread's work: claim a batch, deliver it, record each outcome.

    Its :class:`Deliverer` takes the process's warm provider connections for each batch
    (:mod:`kipekee.connections`).
    :meth:`drain` overlaps the database work with sending; :meth:`run_once` does one
    batch, each step in turn.
    """

    def __init__(self, *, engine: str, batch_size: int, stats: Stats) -> None:
        self.engine = engine
        self.batch_size = batch_size
        self.stats = stats
        self.deliverer = Deliverer()
        self._recorder: ThreadPoolExecutor | None = None
        # Claim tokens whose leases are being renewed (claimed in either thread).
        self._held: set[str] = set()
        self._held_lock = threading.Lock()

    def run_once(self, ids: list[int] | None = None) -> int:
        """Handle one batch (of ``ids`` only, if given); return how many rows it held
        (0: nothing was due)."""
        try:
            rows = self._claim(ids)
            if rows:
                self._record(rows, self.deliverer.deliver_many(rows))
            return len(rows)
        finally:
            self._let_go()

    def drain(self, stopping: threading.Event) -> int:
        """Handle batches until none is due or ``stopping`` is set; return how many rows.

        While a batch is being sent, a second thread (the recorder) records the previous
        batch's outcomes and claims the next batch, so the provider connection does not
        wait on the database between batches. The cost: a process killed mid-way may
        have sent two batches per sender whose outcomes are not committed yet (they are
        sent again after their lease, with the same Message-IDs), not one.

        A batch claimed ahead but not sent yet is given back at once (``outbox.release``:
        due now, its claim not counted) when ``stopping`` is set or when anything failed
        on the way (then the error is raised once every batch that was sent had its
        record attempted); it does not wait for its lease to end. A batch whose sending
        raised stays leased: which of its messages went out is not known.
        """
        if self._recorder is None:
            self._recorder = ThreadPoolExecutor(1, thread_name_prefix="kipekee-recorder")
        recorder = self._recorder
        handled = 0
        recording: list[Future[None]] = []  # records submitted, oldest first
        upcoming: Future[list[OutboxEmail]] | None = None
        try:
            rows = self._claim()
            while rows:
                upcoming = None if stopping.is_set() else recorder.submit(self._claim)
                outcomes = self.deliverer.deliver_many(rows)
                # The recorder runs in order: batch n is recorded before n + 1.
                recording.append(recorder.submit(self._record, rows, outcomes))
                handled += len(rows)
                if len(recording) > 1:
                    recording.pop(0).result()  # raises what recording batch n - 1 raised
                rows = []
                if upcoming is not None:
                    rows, upcoming = upcoming.result(), None
                    if stopping.is_set():
                        self._release(rows)  # claimed ahead, not sent: back to the queue
                        rows = []
        finally:
            try:
                if upcoming is not None:
                    self._release_claimed(upcoming)
                _wait_all(recording)  # what was sent is recorded (or failed to) first
            finally:
                self._let_go()  # a batch whose sending raised: its lease may now end
        return handled

    def _release_claimed(self, claim: Future[list[OutboxEmail]]) -> None:
        try:
            rows = claim.result()
        except Exception:  # noqa: BLE001 - a claim that failed holds nothing; logged
            logger.exception("%s: claiming the next batch failed", self.engine)
            return
        self._release(rows)

    def _release(self, rows: list[OutboxEmail]) -> None:
        if rows:
            tokens = {row.claimed_by for row in rows}
            no_transaction_left_open(rows[0]._state.db or outbox.db_for_write())
            released = sum(outbox.release(row) for row in rows)
            self._drop(tokens)
            logger.info("%s: %d row(s) claimed ahead given back unsent", self.engine, released)

    def _claim(self, ids: list[int] | None = None) -> list[OutboxEmail]:
        no_transaction_left_open(outbox.db_for_write())
        rows = outbox.claim_batch(self.batch_size, engine=self.engine, ids=ids)
        # Their leases renewed until they are recorded or given back (engines.leases).
        tokens = leases.keeper().hold(rows)
        with self._held_lock:
            self._held |= tokens
        return rows

    def _record(self, rows: list[OutboxEmail], outcomes: list[Outcome]) -> None:
        tokens = {row.claimed_by for row in rows}  # (recording clears them on the rows)
        # The batch's outcomes in one transaction: one commit (one flush to disk on
        # PostgreSQL) per batch instead of one per message, the plain successes in one
        # fenced UPDATE. Should the process die before the commit, the batch's rows are
        # taken again after their lease, as rows not yet recorded always were.
        try:
            no_transaction_left_open(rows[0]._state.db)
            recorded = record_batch(rows, outcomes, engine=self.engine)
            # The signal receivers ran on this connection as the record committed.
            no_transaction_left_open(rows[0]._state.db)
        finally:
            self._drop(tokens)  # recorded, or given up on: the lease may end
        for row, done in zip(rows, recorded, strict=True):
            if done:
                self.stats.add(row.status)

    def _drop(self, tokens: set[str]) -> None:
        leases.keeper().drop(tokens)
        with self._held_lock:
            self._held -= tokens

    def _let_go(self) -> None:
        """Stop renewing whatever this sender still holds (nothing, unless a batch's
        sending raised: what went out of it is unknown, so it waits for its lease)."""
        with self._held_lock:
            held = set(self._held)
        if held:
            self._drop(held)

    def recover(self) -> None:
        """After a failed batch: drop this sender's database connections that broke (a
        database restart, a reaped idle session), in both its threads; the next query
        opens a new one. Django does this between requests; engines have no requests."""
        _drop_broken_connections()
        if self._recorder is not None:
            self._recorder.submit(_drop_broken_connections).result()

    def close(self) -> None:
        self.deliverer.close()
        if self._recorder is not None:
            # The recorder thread's own database connections, then the thread.
            self._recorder.submit(connections.close_all).result()
            self._recorder.shutdown()
            self._recorder = None
        connections.close_all()  # this thread's database connections


def _wait_all(futures: list[Future[None]]) -> None:
    """Wait for every future, then raise the first error among them (if any)."""
    errors = []
    for future in futures:
        try:
            future.result()
        except Exception as exc:  # noqa: BLE001 - re-raised below once all have finished
            errors.append(exc)
    if errors:
        raise errors[0]


def _drop_broken_connections() -> None:
    for conn in connections.all(initialized_only=True):
        conn.close_if_unusable_or_obsolete()


def no_transaction_left_open(db: str | None) -> None:
    """Before an engine's own transaction (a claim, a record, a give-back) on ``db``: make
    sure this thread's connection is not inside a transaction already.

    Code that is not Kipekee's runs on an engine's threads: signal receivers, after each
    record's commit. One that turns autocommit off (or opens a transaction by hand) and
    does not end it would make the engine's next ``atomic`` block a mere savepoint in its
    transaction: a claim or a record that looks written and is counted, yet is never
    committed, while the connection keeps the database's write lock. Such a transaction
    is rolled back (nothing in it was committed, so nothing Kipekee recorded is lost)
    and autocommit turned back on. Rolled back, not only closed: Django ignores
    ``close()`` on an in-memory SQLite database (Django's test database).
    """
    connection = connections[db or DEFAULT_DB_ALIAS]
    if connection.connection is None or connection.in_atomic_block:
        return  # nothing open; or the caller's own atomic block (not an engine thread)
    if connection.get_autocommit() and not _in_transaction(connection.connection):
        return
    logger.error("The database connection %r of Kipekee's %s thread was left in a "
                 "transaction by code outside Kipekee (a signal receiver?); rolling it back",
                 db, threading.current_thread().name)
    try:
        connection.rollback()
        connection.set_autocommit(True)
    except DatabaseError:
        connection.close()  # broken as well: the next query opens a new connection


def _in_transaction(raw: object) -> bool:
    """Is the DB-API connection ``raw`` inside a transaction (one Django may not know)?"""
    in_transaction = getattr(raw, "in_transaction", None)  # sqlite3
    if in_transaction is not None:
        return bool(in_transaction)
    status = getattr(getattr(raw, "info", None), "transaction_status", None)  # psycopg 3
    return status is not None and int(status) != 0  # 0: IDLE


def engine_name(kind: str) -> str:
    return f"{kind}@{socket.gethostname()}:{os.getpid()}"


#: Seconds between two looks for rows in lanes that are not configured.
STRAY_LANES_SECONDS = 60.0
_strays_looked_at: float | None = None


def beat(name: str, kind: str, stats: Stats, *, stopped: bool = False,
         starting: bool = False) -> None:
    """Write this engine's heartbeat row (health checks read its age); as an engine
    starts (``starting``) and then every minute, move rows waiting in lanes that are not
    configured to the default lane (:func:`kipekee.outbox.adopt_stray_lanes`).

    A database error is logged, not raised: the engine goes on sending, and the health
    check sees the beat grow old if the database stays away.
    """
    global _strays_looked_at
    try:
        _beat(name, kind, stats, stopped=stopped)
        now = time.monotonic()
        if starting or (not stopped and (_strays_looked_at is None
                                         or now - _strays_looked_at >= STRAY_LANES_SECONDS)):
            _strays_looked_at = now
            adopted = outbox.adopt_stray_lanes()
            if adopted:
                logger.warning(
                    "%s: outbox rows waiting in lanes that are not in KIPEKEE[\"LANES\"] "
                    "(%s) moved to the %r lane, to be delivered", name,
                    ", ".join(f"{lane!r}: {count}" for lane, count in sorted(adopted.items())),
                    conf.TRANSACTIONAL)
    except DatabaseError as exc:
        logger.warning("%s: heartbeat not written (%s); retrying at the next beat", name, exc)
        _drop_broken_connections()


def _beat(name: str, kind: str, stats: Stats, *, stopped: bool) -> None:
    sent, deferred, failed = stats.snapshot()
    now = timezone.now()
    EngineHeartbeat.objects.update_or_create(
        name=name,
        defaults={"kind": kind, "host": socket.gethostname(), "pid": os.getpid(), "beat_at": now,
                  "sent": sent, "deferred": deferred, "failed": failed,
                  "stopped_at": now if stopped else None},
        create_defaults={"kind": kind, "host": socket.gethostname(), "pid": os.getpid(),
                         "started_at": now, "beat_at": now},
    )


def start() -> None:
    """Start the engine that runs in this process, if any (the thread engine), without
    waking it: it looks for due rows once as it starts (a web process's first request)."""
    if conf.get().engine == "thread":
        # (thread.py builds on Sender, defined here: imported once this module is.)
        from .thread import engine  # noqa: PLC0415

        engine().start()


def wake(ids: list[int] | None = None, *, due_at: datetime | None = None) -> None:
    """Tell the engine that rows are waiting (called after commit; ``ids`` when known,
    ``due_at`` when they fall due later: a scheduled send, a deferred retry).

    Never raises: it runs in the caller's ``on_commit``, after the rows are safe in the
    outbox, where an exception would reach the caller and skip the application's later
    on_commit hooks. A wake that fails (a Celery broker that is down) is logged; the
    rows wait for the next sweep or poll.
    """
    kind = conf.get().engine
    later = due_at is not None and due_at > timezone.now()
    try:
        if kind == "thread":
            from .thread import engine  # noqa: PLC0415

            engine().wake()
        elif kind == "celery" and ids and not later:
            # (a task for rows not due yet would find them not due: the sweep hands
            # them out when they are)
            from ..contrib.celery import send_ids  # noqa: PLC0415 - the optional celery extra

            send_ids(ids)
        elif kind == "tasks" and ids:
            # Optional: django.tasks (Django 6.0) or the django-tasks package.
            from .tasks import send_ids as enqueue_tasks  # noqa: PLC0415

            enqueue_tasks(ids, run_after=due_at if later else None)
    except Exception:  # noqa: BLE001 - the rows are committed; logged, left to the sweep
        logger.warning("Could not wake the %s engine for outbox email(s) %s; they stay "
                       "queued for its next sweep or poll", kind, ids, exc_info=True)
