"""Kipekee on Celery (``pip install django-kipekee[celery]``, ``KIPEKEE["ENGINE"] = "celery"``).

When a transaction that enqueued commits, the new rows' ids go to the ``kipekee.deliver``
task, which claims exactly those rows and delivers them with the same code as every other
engine. The outbox stays the truth: ``kipekee.sweep`` (add :func:`beat_schedule` to your
beat schedule) finds due rows — scheduled ones whose time came, deferred and
lease-expired ones, queued ones whose task is late — and hands them out again, so a task
lost in Redis is never a lost email, and a broker that is down at commit only delays.
Retries are scheduled by the outbox (``due_at``), never with long ETA tasks, which Redis'
visibility timeout would redeliver in a loop.

Setup, in the project's Celery app module::

    from kipekee.contrib.celery import beat_schedule, task_routes
    app.conf.beat_schedule = {**app.conf.beat_schedule, **beat_schedule()}
    app.conf.task_routes = task_routes()

Task settings, applied here: ``acks_late`` with ``reject_on_worker_lost`` (a task whose
worker died is redelivered; the claim makes a second run harmless), ``ignore_result``, no
Celery-level retries. Tasks go to their own queue (``KIPEKEE["CELERY"]["QUEUE"]``, default
``"kipekee"``): start a worker for it, ``celery -A proj worker -Q kipekee``.
Provider rate limits are Kipekee's ``LIMITS`` (shared by every process through
``KIPEKEE["LIMITER"]``), not Celery's ``rate_limit``, which knows nothing of providers.
"""

from __future__ import annotations

import logging
import time
from datetime import timedelta
from typing import Any

from celery import shared_task
from celery.signals import worker_process_shutdown, worker_shutdown

# Only settings at import time: a Celery app module imports this before Django's app
# registry is ready. Models are imported inside the tasks.
from .. import conf

BATCH = 50  # rows per task
SWEEP_LIMIT = 5000  # rows handed out per sweep

_last_beat = 0.0


logger = logging.getLogger("kipekee.celery")


def _stats() -> Any:
    """This worker process's counters (for its heartbeat row and progress lines)."""
    global _process_stats, _progress
    if _process_stats is None:
        from ..engines import Progress, Stats, engine_name

        _process_stats = Stats()
        _progress = Progress(engine_name("celery"), _process_stats, logger)
    return _process_stats


_process_stats: Any = None
_progress: Any = None


@worker_process_shutdown.connect  # a prefork pool's child
@worker_shutdown.connect  # the worker itself (threads and solo pools run tasks there)
def _summary(**kwargs: Any) -> None:
    """At exit, in a process that ran Kipekee's tasks: its summary line, and its
    heartbeat marked stopped (the health check does not take it for a dead engine)."""
    if _progress is None:
        return
    from ..engines import beat

    _progress.summary()
    beat(_progress.name, "celery", _process_stats, stopped=True)


def beat_schedule(every: float = 10.0) -> dict[str, dict[str, Any]]:
    """The sweep's beat entry, on Kipekee's queue: ``app.conf.beat_schedule = beat_schedule()``."""
    return {"kipekee-sweep": {"task": "kipekee.sweep", "schedule": every,
                              "options": {"queue": conf.get().celery.queue}}}


def task_routes() -> dict[str, dict[str, str]]:
    """``app.conf.task_routes = task_routes()``: Kipekee's tasks on their own queue."""
    return {"kipekee.*": {"queue": conf.get().celery.queue}}


def send_ids(ids: list[int]) -> None:
    """Hand rows to the workers, ``BATCH`` per task (called after commit and by the sweep)."""
    for start in range(0, len(ids), BATCH):
        deliver.apply_async(args=[ids[start:start + BATCH]], queue=conf.get().celery.queue)


@shared_task(name="kipekee.deliver", acks_late=True, reject_on_worker_lost=True,
             ignore_result=True)
def deliver(ids: list[int]) -> int:
    """Claim and deliver these rows (those another engine took, or that were sent, are
    passed over). Returns how many this run delivered or recorded."""
    global _last_beat
    from ..engines import Sender, beat, engine_name

    sender = Sender(engine=engine_name("celery"), batch_size=len(ids) or 1, stats=_stats())
    try:
        handled = sender.run_once(ids=ids)
    finally:
        sender.close()
    if time.monotonic() - _last_beat > 5:
        beat(sender.engine, "celery", _stats())
        _last_beat = time.monotonic()
    _progress.tick()
    return handled


@shared_task(name="kipekee.sweep", ignore_result=True)
def sweep() -> int:
    """Hand out every row that is due now: new rows whose task was lost, deferred rows
    whose retry time came, rows whose worker died (lease expired)."""
    from .. import outbox

    grace = timedelta(seconds=conf.get().celery.sweep_grace)
    ids = outbox.due_ids(SWEEP_LIMIT, queued_grace=grace)
    send_ids(ids)
    return len(ids)
