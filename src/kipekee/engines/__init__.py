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
from dataclasses import dataclass, field

from django.db import connections, transaction
from django.utils import timezone

from .. import conf, outbox
from ..delivery import Deliverer
from ..models import EngineHeartbeat, Status

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

    Keeps its :class:`Deliverer` (one open connection per provider) across batches.
    """

    def __init__(self, *, engine: str, batch_size: int, stats: Stats) -> None:
        self.engine = engine
        self.batch_size = batch_size
        self.stats = stats
        self.deliverer = Deliverer()

    def run_once(self, ids: list[int] | None = None) -> int:
        """Handle one batch (of ``ids`` only, if given); return how many rows it held
        (0: nothing was due)."""
        from ..dispatch import record

        rows = outbox.claim_batch(self.batch_size, engine=self.engine, ids=ids)
        if not rows:
            return 0
        outcomes = self.deliverer.deliver_many(rows)
        # The batch's outcomes in one transaction: one commit (one flush to disk on
        # PostgreSQL) per batch instead of one per message. Each row is still finished by
        # its own fenced UPDATE; should the process die before the commit, the batch's rows
        # are taken again after their lease, as rows not yet recorded always were.
        recorded = []
        with transaction.atomic(using=rows[0]._state.db):
            for row, outcome in zip(rows, outcomes, strict=True):
                if record(row, outcome):
                    recorded.append(row.status)
        for status in recorded:
            self.stats.add(status)
        return len(rows)

    def close(self) -> None:
        self.deliverer.close()
        connections.close_all()  # this thread's database connections


def engine_name(kind: str) -> str:
    return f"{kind}@{socket.gethostname()}:{os.getpid()}"


def beat(name: str, kind: str, stats: Stats, *, stopped: bool = False) -> None:
    """Write this engine's heartbeat row (health checks read its age)."""
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
