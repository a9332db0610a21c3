"""Health of a running Kipekee: what ``manage.py kipekee_check`` prints.

Each check returns one or more :class:`Result` rows: a name, ``ok``/``warn``/``fail``
and a detail a person reads at a glance. A check that raises is itself a ``fail`` with
the error: a broken database must not hide behind a traceback.

Providers are tested without sending: the backend is built and opened, then closed.
For Kipekee's SMTP backend (and Django's) that is connect, TLS and AUTH. A backend can
offer its own test by defining ``check_connection(self) -> str`` (e.g. an HTTP API that
validates its token); it returns a detail, or raises what sending would raise.

Engines: a row of :class:`~kipekee.models.EngineHeartbeat` with ``stopped_at`` unset is
*alive* if it beat within ``CHECK["HEARTBEAT_MAX_AGE"]`` seconds, *dead* otherwise (the
process was killed). "No engine alive" fails only when rows wait for one — queued in
mode ``queue``, or deferred — since in modes ``now`` and ``hybrid`` a site with nothing
to retry needs no engine.
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Literal

from django.db import connections, router
from django.db.migrations.executor import MigrationExecutor
from django.db.migrations.loader import MigrationLoader
from django.db.models import Count, Min, Q
from django.utils import timezone

from . import conf, deadlines, providers
from .models import WAITING_STATUSES, Attempt, EngineHeartbeat, OutboxEmail, Status

Level = Literal["ok", "warn", "fail"]


@dataclass(frozen=True, kw_only=True)
class Result:
    name: str
    level: Level
    detail: str


def _ago(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def check_database() -> Iterator[Result]:
    alias = router.db_for_write(OutboxEmail)
    started = time.monotonic()
    connection = connections[alias]
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
        cursor.fetchone()
    elapsed = (time.monotonic() - started) * 1000
    yield Result(name="database", level="ok",
                 detail=f"{alias} ({connection.vendor}) answered in {elapsed:.0f} ms")
    # Never migrated, or code deployed without `migrate`: tables, columns or indexes missing.
    executor = MigrationExecutor(connection)
    stopped = stopped_part_way(executor.loader)
    if stopped:
        yield Result(name="migrations", level="fail", detail=stopped)
        return
    targets = [key for key in executor.loader.graph.leaf_nodes() if key[0] == "kipekee"]
    # The plan also holds what Kipekee depends on (contenttypes); `migrate` applies all.
    pending = [m.name for m, _ in executor.migration_plan(targets) if m.app_label == "kipekee"]
    yield Result(name="migrations", level="fail" if pending else "ok",
                 detail=f"not applied: {', '.join(pending)} (run manage.py migrate)"
                 if pending else "kipekee's migrations are applied")


def stopped_part_way(loader: MigrationLoader) -> str | None:
    """What is wrong where the database has applied some, not all, of the migrations a
    squashed Kipekee migration replaces, and their files are gone: Django can then use
    neither, and ``migrate`` does nothing for Kipekee while tables lack their newer
    columns. None where every squash is wholly applied or not at all, or where the files
    still missing are there to apply."""
    for (app, name), squash in loader.replacements.items():
        if app != "kipekee":
            continue
        missing = [key for key in squash.replaces if key not in loader.applied_migrations]
        if 0 < len(missing) < len(squash.replaces) and any(
                key not in loader.disk_migrations for key in missing):
            return (f"stopped part-way through the migrations {name} replaces: "
                    f"{', '.join(old for _, old in missing)} not applied. Install the last "
                    "Kipekee that has them, run manage.py migrate, then this version "
                    "(README: Upgrading)")
    return None


def check_provider(alias: str) -> Result:
    """Open and close provider ``alias``'s connection, sending nothing."""
    name = f"provider {alias}"
    started = time.monotonic()
    backend = None
    try:
        backend = providers.build(alias)
        # A probe must answer quickly even when the provider's own timeout is long.
        limit = conf.get().check.provider_timeout
        if hasattr(backend, "timeout") and (backend.timeout is None or backend.timeout > limit):
            backend.timeout = limit
        hook = getattr(backend, "check_connection", None)
        # The whole probe, not only each wait, for backends that honour deadlines (a
        # server trickling its banner a byte at a time stays within every timeout).
        with deadlines.within(limit):
            if hook is not None:
                detail = hook()
            else:
                backend.open()
                try:
                    detail = _describe_session(backend)
                finally:
                    backend.close()
    except Exception as exc:  # noqa: BLE001 - every failure is the check's result
        failure = providers.classify(exc, backend)
        return Result(name=name, level="fail", detail=f"{failure.kind}: {failure.error}")
    elapsed = (time.monotonic() - started) * 1000
    level: Level = "warn" if detail.startswith("untested") else "ok"
    return Result(name=name, level=level, detail=f"{detail} ({elapsed:.0f} ms)")


def _describe_session(backend: object) -> str:
    connection = getattr(backend, "connection", None)
    if connection is None or not hasattr(connection, "sock"):
        return (f"untested: {type(backend).__name__} has no connection to open "
                "(define check_connection() to test it without sending)")
    host = getattr(backend, "host", "?")
    port = getattr(backend, "port", "?")
    parts = [f"connected to {host}:{port}"]
    sock = connection.sock
    if isinstance(sock, ssl.SSLSocket):
        mode = "implicit TLS" if getattr(backend, "use_ssl", False) else "STARTTLS"
        parts.append(f"{mode} {sock.version()}")
    else:
        parts.append("no TLS")
    username = getattr(backend, "username", "")
    parts.append(f"AUTH as {username}" if username else "no AUTH")
    return ", ".join(parts)


def check_providers() -> Iterator[Result]:
    aliases = providers.aliases()
    if not aliases:
        yield Result(name="providers", level="fail",
                     detail='none configured (KIPEKEE["PROVIDERS"]): nothing can be delivered')
    for alias in aliases:
        yield check_provider(alias)


def _waiting_for_engine() -> int:
    return OutboxEmail.objects.filter(
        Q(status=Status.QUEUED, mode="queue") | Q(status=Status.DEFERRED)
    ).count()


def _how_to_start() -> str:
    """What runs the engine ``KIPEKEE["ENGINE"]`` names (the worker command without one)."""
    settings = conf.get()
    if settings.engine == "thread":
        return 'a web process (ENGINE "thread" runs in it)'
    if settings.engine == "celery":
        return f"a Celery worker consuming queue {settings.celery.queue}, with beat"
    if settings.engine == "tasks":
        queue = settings.tasks.queue
        return (f"a worker of task backend {settings.tasks.backend} for queue {queue} "
                f"(e.g. manage.py db_worker --queue-name {queue})")
    return "manage.py kipekee_worker"


def check_engines() -> Iterator[Result]:
    now = timezone.now()
    max_age = timedelta(seconds=conf.get().check.heartbeat_max_age)
    running = list(EngineHeartbeat.objects.filter(stopped_at__isnull=True)
                   .order_by("-beat_at")[:100])
    alive = [e for e in running if now - e.beat_at <= max_age]
    dead = [e for e in running if now - e.beat_at > max_age]
    if alive:
        newest = alive[0]
        names = ", ".join(e.name for e in alive[:3]) + (" …" if len(alive) > 3 else "")
        yield Result(name="engines", level="ok",
                     detail=f"{len(alive)} alive ({names}), newest beat "
                            f"{_ago((now - newest.beat_at).total_seconds())} ago")
    else:
        waiting = _waiting_for_engine()
        if waiting:
            yield Result(name="engines", level="fail",
                         detail=f"none alive, and {waiting} message(s) wait for one "
                                f"(start: {_how_to_start()})")
        else:
            yield Result(name="engines", level="ok",
                         detail="none running; none needed now (nothing waits for one)")
    if dead:
        oldest = dead[-1]
        yield Result(name="dead engines", level="warn",
                     detail=f"{len(dead)} stopped beating without stopping cleanly "
                            f"(e.g. {oldest.name}, last beat "
                            f"{_ago((now - oldest.beat_at).total_seconds())} ago); their "
                            "rows are taken over when their leases expire")


def check_queue() -> Iterator[Result]:
    settings = conf.get().check
    now = timezone.now()
    waiting = OutboxEmail.objects.filter(status__in=WAITING_STATUSES)
    counts = dict(waiting.values_list("status").annotate(n=Count("id")).order_by())
    depth = sum(counts.values())
    detail = (f"{depth} waiting ({counts.get(Status.QUEUED, 0)} queued, "
              f"{counts.get(Status.DEFERRED, 0)} deferred); limit {settings.queue_depth_max}")
    yield Result(name="queue depth", level="fail" if depth > settings.queue_depth_max else "ok",
                 detail=detail)
    oldest = waiting.filter(due_at__lte=now).aggregate(m=Min("due_at"))["m"]
    if oldest is None:
        yield Result(name="oldest due", level="ok", detail="nothing due")
    else:
        age = (now - oldest).total_seconds()
        yield Result(name="oldest due",
                     level="fail" if age > settings.oldest_due_max_age else "ok",
                     detail=f"due {_ago(age)} ago; limit {_ago(settings.oldest_due_max_age)}")


def check_failure_rate() -> Iterator[Result]:
    settings = conf.get().check
    limit = settings.failure_rate_max
    since = timezone.now() - timedelta(hours=1)
    totals = Attempt.objects.filter(finished_at__gte=since).aggregate(
        total=Count("id"), failed=Count("id", filter=~Q(outcome="sent")))
    total, failed = totals["total"], totals["failed"]
    if not total:
        yield Result(name="failure rate 1h", level="ok", detail="no attempts in the last hour")
        return
    rate = failed / total
    detail = f"{rate:.0%} of {total} attempts failed ({failed}); limit {limit:.0%}"
    if total < settings.failure_rate_min_attempts:
        # One mistyped address among three emails is not an outage.
        yield Result(name="failure rate 1h", level="warn" if rate > limit else "ok",
                     detail=f"{detail}, judged from {settings.failure_rate_min_attempts} "
                            "attempts")
        return
    yield Result(name="failure rate 1h", level="fail" if rate > limit else "ok", detail=detail)


#: The checks, in the order of the table; ``--only`` takes these names.
CHECKS: dict[str, Callable[[], Iterator[Result]]] = {
    "database": check_database,
    "providers": check_providers,
    "engines": check_engines,
    "queue": check_queue,
    "failures": check_failure_rate,
}


def run(*, only: Iterable[str] | None = None, with_providers: bool = True) -> list[Result]:
    """The checks named in ``only`` (default: all), in table order; a check that raises
    is a ``fail``."""
    wanted = set(only) if only is not None else set(CHECKS)
    unknown = wanted - set(CHECKS)
    if unknown:
        raise ValueError(f"unknown checks {sorted(unknown)}; known: {', '.join(CHECKS)}")
    if not with_providers:
        wanted.discard("providers")
    checks = [(name, check) for name, check in CHECKS.items() if name in wanted]
    results: list[Result] = []
    for name, check in checks:
        try:
            results.extend(check())
        except Exception as exc:  # noqa: BLE001 - reported as this check's failure
            detail = f"{type(exc).__name__}: {exc}"
            if name == "database":
                detail += " (is the database up, and has `manage.py migrate` run?)"
            results.append(Result(name=name, level="fail", detail=detail))
    return results
