"""Engines decide *where* delivery runs, never *how*: they claim due rows from the outbox,
hand them to :class:`kipekee.delivery.Deliverer` and record the outcomes.

- ``thread``: a background thread in each web process (one deployment, still retries);
- ``worker``: ``manage.py kipekee_worker`` processes (``engines.worker.Worker``);
- ``celery``: Celery tasks (``kipekee.contrib.celery``).

All share :class:`Sender`, the loop one sender thread runs.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from django.db import DatabaseError, connections, transaction
from django.utils import timezone

from .. import conf, outbox
from ..delivery import Deliverer, Outcome
from ..models import EngineHeartbeat, OutboxEmail, Status

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
        self._books: ThreadPoolExecutor | None = None

    def run_once(self, ids: list[int] | None = None) -> int:
        """Handle one batch (of ``ids`` only, if given); return how many rows it held
        (0: nothing was due)."""
        rows = self._claim(ids)
        if rows:
            self._record(rows, self.deliverer.deliver_many(rows))
        return len(rows)

    def drain(self, stopping: threading.Event) -> int:
        """Handle batches until none is due or ``stopping`` is set; return how many rows.

        While a batch is being sent, a second thread (the books) records the previous
        batch's outcomes and claims the next batch, so the provider connection does not
        wait on the database between batches. The cost: a process killed mid-way may
        have sent two batches per sender whose outcomes are not committed yet (they are
        sent again after their lease, with the same Message-IDs), not one. A batch
        claimed ahead when ``stopping`` is set is still sent: it is in hand.
        """
        if self._books is None:
            self._books = ThreadPoolExecutor(1, thread_name_prefix="kipekee-books")
        books = self._books
        handled = 0
        recording: Future[None] | None = None
        try:
            rows = self._claim()
            while rows:
                upcoming = None if stopping.is_set() else books.submit(self._claim)
                outcomes = self.deliverer.deliver_many(rows)
                if recording is not None:
                    recording.result()  # in order: batch n is recorded before n + 1
                recording = books.submit(self._record, rows, outcomes)
                handled += len(rows)
                rows = upcoming.result() if upcoming is not None else []
        finally:
            if recording is not None:
                recording.result()  # what was sent is recorded before returning
        return handled

    def _claim(self, ids: list[int] | None = None) -> list[OutboxEmail]:
        return outbox.claim_batch(self.batch_size, engine=self.engine, ids=ids)

    def _record(self, rows: list[OutboxEmail], outcomes: list[Outcome]) -> None:
        from ..dispatch import record_many

        # The batch's outcomes in one transaction: one commit (one flush to disk on
        # PostgreSQL) per batch instead of one per message, the plain successes in one
        # fenced UPDATE. Should the process die before the commit, the batch's rows are
        # taken again after their lease, as rows not yet recorded always were.
        with transaction.atomic(using=rows[0]._state.db):
            recorded = record_many(rows, outcomes)
        for row, done in zip(rows, recorded, strict=True):
            if done:
                self.stats.add(row.status)

    def recover(self) -> None:
        """After a failed batch: drop this sender's database connections that broke (a
        database restart, a reaped idle session), in both its threads; the next query
        opens a new one. Django does this between requests; engines have no requests."""
        _drop_broken_connections()
        if self._books is not None:
            self._books.submit(_drop_broken_connections).result()

    def close(self) -> None:
        self.deliverer.close()
        if self._books is not None:
            # The books thread's own database connections, then the thread.
            self._books.submit(connections.close_all).result()
            self._books.shutdown()
            self._books = None
        connections.close_all()  # this thread's database connections


def _drop_broken_connections() -> None:
    for conn in connections.all(initialized_only=True):
        conn.close_if_unusable_or_obsolete()


def engine_name(kind: str) -> str:
    return f"{kind}@{socket.gethostname()}:{os.getpid()}"


def beat(name: str, kind: str, stats: Stats, *, stopped: bool = False) -> None:
    """Write this engine's heartbeat row (health checks read its age).

    A database error is logged, not raised: the engine goes on sending, and the health
    check sees the beat grow old if the database stays away.
    """
    try:
        _beat(name, kind, stats, stopped=stopped)
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


def wake(ids: list[int] | None = None) -> None:
    """Tell the engine that rows are waiting (called after commit; ``ids`` when known)."""
    kind = conf.get().engine
    if kind == "thread":
        from .thread import engine

        engine().wake()
    elif kind == "celery" and ids:
        from ..contrib.celery import send_ids

        send_ids(ids)
