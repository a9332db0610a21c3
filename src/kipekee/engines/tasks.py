"""Kipekee on Django's task framework (``KIPEKEE["ENGINE"] = "tasks"``).

``django.tasks`` on Django 6.0+, the ``django_tasks`` backport on 5.2; any task backend
that can defer (``supports_defer``) runs it. ``pip install django-kipekee[tasks]``
brings the backport and ``django-tasks-db``, whose ``DatabaseBackend`` keeps the tasks
in the same database as the outbox (``manage.py db_worker`` runs them).

When a transaction that enqueued commits, the new rows' ids go to the
``kipekee.engines.tasks.deliver`` task, which claims exactly those rows and delivers
them with the same code as every other engine (:class:`kipekee.engines.Sender`). The
outbox stays the truth, as with Celery; the tasks only say *when to look*:

- a mail written for later (``send_at``) gets its task with ``run_after`` at that time;
- a delivery that was deferred gets a follow-up task at the row's ``due_at``: retries
  follow the outbox's own retry policy (backoff, a provider's ``Retry-After``), never
  the task backend's;
- every batch a task claims gets a *watch* task at the end of its lease: should the
  task's worker die mid-batch (a killed ``db_worker`` leaves its task "running"
  forever), the watch task takes the rows back once their lease has run out;
- :func:`sweep` hands out every due row that has no task coming (a wake that failed
  because the task backend was down at commit): run it now and then, from cron or your
  scheduler (``manage.py shell -c "from kipekee.engines.tasks import sweep; sweep.enqueue()"``),
  as Celery runs ``kipekee.sweep`` from beat.

Tasks go to ``KIPEKEE["TASKS"]["QUEUE"]`` (default ``"default"``) of the backend
``KIPEKEE["TASKS"]["BACKEND"]`` (default ``"default"``) of Django's ``TASKS`` setting.
A second run of a task is harmless: claims are fenced, so a row is delivered by one
run only.
"""

from __future__ import annotations

import atexit
import logging
import time
from datetime import datetime, timedelta
from typing import Any

from django.utils import timezone

from .. import conf

try:  # Django 6.0+
    from django.tasks import task
except ImportError:  # Django 5.2: the backport (pip install django-kipekee[tasks])
    from django_tasks import task  # type: ignore[no-redef]

logger = logging.getLogger("kipekee.engines")

BATCH = 50  # rows per task
SWEEP_LIMIT = 5000  # rows handed out per sweep
#: A follow-up for rows that were due but not claimed (a lane's rate): not sooner than this.
MIN_FOLLOW_UP = timedelta(seconds=0.5)
#: A watch task runs this long after the lease it watches ends (clocks differ a little).
WATCH_MARGIN = timedelta(seconds=1)
HEARTBEAT_SECONDS = 5.0

_last_beat = 0.0
_process_stats: Any = None
_progress: Any = None


def _stats() -> Any:
    """This task worker process's counters (for its heartbeat row and progress lines);
    its summary line at exit."""
    global _process_stats, _progress
    if _process_stats is None:
        from . import Progress, Stats, engine_name

        _process_stats = Stats()
        _progress = Progress(engine_name("tasks"), _process_stats, logger)
        atexit.register(_summary)
    return _process_stats


def _summary() -> None:
    from . import beat

    _progress.summary()
    beat(_progress.name, "tasks", _process_stats, stopped=True)


def send_ids(ids: list[int], *, run_after: datetime | None = None, watch: bool = False) -> None:
    """Enqueue ``deliver`` for these rows, ``BATCH`` per task (called after commit, by
    the sweep and by the tasks themselves); ``run_after``: not before then."""
    settings = conf.get().tasks
    options: dict[str, Any] = {"queue_name": settings.queue, "backend": settings.backend}
    if run_after is not None and run_after > timezone.now():
        options["run_after"] = run_after
    runner = deliver.using(**options)
    for start in range(0, len(ids), BATCH):
        runner.enqueue(ids[start:start + BATCH], watch)


@task()
def deliver(ids: list[int], watch: bool = False) -> int:
    """Claim and deliver these rows (those another engine took, or that were sent, are
    passed over), then see that each one still waiting has a task coming. ``watch``: a
    watch task, which only takes back rows whose lease ran out. Returns how many rows
    this run delivered or recorded."""
    global _last_beat
    from ..models import OutboxEmail, Status
    from . import Sender, beat, engine_name

    # Rows recorded since (by an earlier task's claim, another engine) need nothing: one
    # read, and a burst's later tasks end here. A watch task looks only at rows still in
    # a claim: taken back if its lease ran out (claim_batch does), watched again if it
    # was renewed.
    open_states = [Status.SENDING] if watch else [Status.QUEUED, Status.DEFERRED, Status.SENDING]
    ids = list(OutboxEmail.objects.filter(pk__in=ids, status__in=open_states)
               .values_list("pk", flat=True))
    if not ids:
        return 0
    sender = Sender(engine=engine_name("tasks"), batch_size=BATCH, stats=_stats())
    handled = 0
    followed = set(ids)  # and the rows this run claims besides: it follows them up too
    try:
        rows = sender._claim(ids)
        if not watch and len(rows) < BATCH:
            # Room left: other due rows too (lane by lane, as every claim). A burst of
            # small commits leaves one task each; the first tasks send for all of them,
            # the rest find their rows sent and end at once.
            sender.batch_size = BATCH - len(rows)
            rows += sender._claim()
        if rows:
            # Enqueued before sending: should this process die mid-batch, the watch task
            # takes the rows back when their lease ends.
            lease_until = max(row.lease_until for row in rows if row.lease_until is not None)
            send_ids([row.pk for row in rows], run_after=lease_until + WATCH_MARGIN, watch=True)
            sender._record(rows, sender.deliverer.deliver_many(rows))
            handled = len(rows)
            followed.update(row.pk for row in rows)
    finally:
        sender._let_go()
        # The provider connections go back to the process's pool; the database
        # connection is the task worker's (db_worker closes it when it is old or broken).
        sender.deliverer.close()
    _follow_up(sorted(followed), watch=watch)
    if time.monotonic() - _last_beat > HEARTBEAT_SECONDS:
        beat(sender.engine, "tasks", _stats())
        _last_beat = time.monotonic()
    _progress.tick()
    return handled


def _follow_up(ids: list[int], *, watch: bool) -> None:
    """One task for the rows of ``ids`` that still wait, at the earliest time one of them
    falls due (it follows up the rest in turn); one watch task for rows still in a claim
    whose lease was renewed. Rows another claim holds are that claim's to follow."""
    from ..models import OutboxEmail, Status

    now = timezone.now()
    waiting: list[tuple[int, datetime]] = []
    held: list[tuple[int, datetime]] = []
    for pk, status, due_at, lease_until in OutboxEmail.objects.filter(pk__in=ids).values_list(
            "pk", "status", "due_at", "lease_until"):
        if status in (Status.QUEUED, Status.DEFERRED):
            waiting.append((pk, max(due_at or now, now + MIN_FOLLOW_UP)))
        elif watch and status == Status.SENDING and lease_until is not None:
            held.append((pk, lease_until + WATCH_MARGIN))
    if waiting:
        send_ids([pk for pk, _ in waiting], run_after=min(at for _, at in waiting))
    if held:
        send_ids([pk for pk, _ in held], run_after=min(at for _, at in held), watch=True)


@task()
def sweep() -> int:
    """Hand out every row that is due now and may have no task coming: new rows whose
    task was never enqueued, deferred rows, rows whose worker died (lease expired)."""
    from .. import outbox

    grace = timedelta(seconds=conf.get().tasks.sweep_grace)
    ids = outbox.due_ids(SWEEP_LIMIT, queued_grace=grace)
    send_ids(ids)
    return len(ids)
