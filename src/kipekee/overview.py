"""What an operator looks at: the figures of the admin's overview page (and the gauges of
:mod:`kipekee.metrics`), read from the database only — no extra service.

Every function here reads; none writes. The hourly figures come from the attempt log
(``kipekee_attempt_finished`` index) and, for mail suppressed before any attempt, from
the rows (``kipekee_status_created``): a fixed number of queries whatever the size of
the outbox, each over the chosen window only.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from django.db.models import Count, F, Min, Q
from django.db.models.functions import TruncHour
from django.utils import timezone

from . import conf
from .models import WAITING_STATUSES, Attempt, EngineHeartbeat, OutboxEmail, Status

#: The series of the hourly chart, in stacking order.
SERIES = ("sent", "deferred", "failed", "suppressed")


@dataclass(frozen=True, kw_only=True)
class Hour:
    start: datetime
    sent: int = 0
    deferred: int = 0
    failed: int = 0
    suppressed: int = 0

    @property
    def total(self) -> int:
        return self.sent + self.deferred + self.failed + self.suppressed


@dataclass(frozen=True, kw_only=True)
class Queue:
    depth: int  # waiting rows (queued and deferred)
    queued: int
    deferred: int
    oldest_due_age: float | None  # seconds the oldest due row has waited; None: none due


@dataclass(frozen=True, kw_only=True)
class ProviderHealth:
    name: str
    attempts: int  # in the window
    failures: int  # attempts that did not send (transient, permanent, configuration)
    breaker: str  # closed | open | half-open, as the attempt log shows it
    last_error: str

    @property
    def failure_rate(self) -> float:
        return self.failures / self.attempts if self.attempts else 0.0


@dataclass(frozen=True, kw_only=True)
class Engine:
    name: str
    kind: str
    host: str
    state: str  # alive | dead | stopped
    beat_age: float
    sent: int
    deferred: int
    failed: int


def _hour(moment: datetime) -> datetime:
    return moment.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


def hourly(days: float = 2) -> list[Hour]:
    """Sent, deferred, failed and suppressed per hour over the last ``days``, oldest first,
    every hour present (zero when nothing happened).

    Per attempt: *sent*; *failed*, the attempt after which a row failed (refused, or out
    of attempts); *deferred*, any other attempt that did not send; *suppressed*,
    attempts refused by the suppression list and rows written already suppressed.
    """
    now = timezone.now()
    first = _hour(now - timedelta(days=days)) + timedelta(hours=1)
    counts: dict[datetime, dict[str, int]] = {}

    def add(hour: datetime | None, series: str, n: int) -> None:
        if hour is not None:
            bucket = counts.setdefault(_hour(hour), {})
            bucket[series] = bucket.get(series, 0) + n

    attempts = (Attempt.objects.filter(finished_at__gte=first)
                .annotate(hour=TruncHour("finished_at", tzinfo=UTC)))
    last_of_failed = Q(email__status=Status.FAILED, number=F("email__attempts"))
    for hour, outcome, final, n in (
            attempts.annotate(final=last_of_failed).values_list("hour", "outcome", "final")
            .annotate(n=Count("id")).order_by()):
        if outcome == "sent":
            add(hour, "sent", n)
        elif outcome == "suppressed":
            add(hour, "suppressed", n)
        else:
            add(hour, "failed" if final else "deferred", n)
    # Suppressed as they were written: no attempt was made.
    for hour, n in (OutboxEmail.objects.filter(status=Status.SUPPRESSED, created_at__gte=first,
                                               attempts=0)
                    .annotate(hour=TruncHour("created_at", tzinfo=UTC))
                    .values_list("hour").annotate(n=Count("id")).order_by()):
        add(hour, "suppressed", n)
    hours = []
    start = first
    while start <= now:
        hours.append(Hour(start=start, **counts.get(start, {})))
        start += timedelta(hours=1)
    return hours


def queue() -> Queue:
    """The waiting rows and how long the oldest due one has waited (two queries)."""
    now = timezone.now()
    waiting = OutboxEmail.objects.filter(status__in=WAITING_STATUSES)
    counts = dict(waiting.values_list("status").annotate(n=Count("id")).order_by())
    oldest = waiting.filter(due_at__lte=now).aggregate(m=Min("due_at"))["m"]
    return Queue(depth=sum(counts.values()), queued=counts.get(Status.QUEUED, 0),
                 deferred=counts.get(Status.DEFERRED, 0),
                 oldest_due_age=None if oldest is None else (now - oldest).total_seconds())


def providers(hours: float = 1) -> list[ProviderHealth]:
    """Each provider that was tried in the last ``hours`` or is configured: its attempts,
    failures, and its breaker as the attempt log shows it.

    Breakers live in each process (:mod:`kipekee.circuit`); what the database shows is
    the same rule applied to the attempts of every process: the last ``FAILURES``
    attempts all failed for a reason that counts (transient, configuration) — *open*
    within a cool-down of the last one, *half-open* after (the next send is a trial) —
    else *closed*.
    """
    settings = conf.get()
    since = timezone.now() - timedelta(hours=hours)
    rows = {name: (total, failed) for name, total, failed in (
        Attempt.objects.filter(finished_at__gte=since).exclude(provider="")
        .values_list("provider")
        .annotate(total=Count("id"), failed=Count("id", filter=~Q(outcome__in=("sent",
                                                                              "suppressed"))))
        .order_by())}
    configured = [p.alias for p in settings.providers]
    names = configured + sorted(set(rows) - set(configured))
    result = []
    threshold, cooldown = settings.circuit.failures, settings.circuit.cooldown
    for name in names:
        recent = list(Attempt.objects.filter(provider=name).order_by("-finished_at", "-id")
                      .values_list("outcome", "finished_at", "error")[:threshold])
        counting = [r for r in recent if r[0] in ("transient", "configuration")]
        breaker = "closed"
        if recent and len(counting) == threshold:
            age = (timezone.now() - recent[0][1]).total_seconds()
            breaker = "open" if age < cooldown else "half-open"
        last_error = next((r[2] for r in recent if r[0] not in ("sent", "suppressed")), "")
        total, failed = rows.get(name, (0, 0))
        result.append(ProviderHealth(name=name, attempts=total, failures=failed,
                                     breaker=breaker, last_error=last_error[:200]))
    return result


def engines(limit: int = 50) -> list[Engine]:
    """The engines' heartbeats, newest first: alive (beat within the check's
    ``HEARTBEAT_MAX_AGE``), dead (stopped beating without stopping), stopped."""
    now = timezone.now()
    max_age = conf.get().check.heartbeat_max_age
    result = []
    for beat in EngineHeartbeat.objects.order_by("-beat_at")[:limit]:
        age = (now - beat.beat_at).total_seconds()
        state = "stopped" if beat.stopped_at else ("alive" if age <= max_age else "dead")
        result.append(Engine(name=beat.name, kind=beat.kind, host=beat.host, state=state,
                             beat_age=age, sent=beat.sent, deferred=beat.deferred,
                             failed=beat.failed))
    return result
