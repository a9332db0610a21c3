"""Prometheus metrics (optional: ``pip install django-kipekee[metrics]``, ``"METRICS": True``).

- ``kipekee_emails_total{status, provider}``: a counter fed by the signals (``queued``,
  ``sent``, ``deferred``, ``failed``, ``cancelled``, ``suppressed``); ``provider`` is the alias that
  sent or last failed (empty for queued/cancelled).
- ``kipekee_send_duration_seconds{provider}``: a histogram of the duration of each
  delivery attempt (sent, deferred or failed).
- ``kipekee_queue_to_sent_seconds``: a histogram from the row's creation to sent.
- ``kipekee_queue_depth{status}`` and ``kipekee_oldest_due_age_seconds``: gauges read
  from the database when Prometheus scrapes (one indexed query each), so they are right
  whichever process or engine moved the rows.

The metrics live in prometheus-client's default registry, so an existing exporter
(django-prometheus, ``start_http_server``) shows them. Or mount the view::

    path("metrics/kipekee", kipekee.metrics.view)

and protect it as you protect other internal endpoints (it shows counts, no content).

Several processes (gunicorn workers, ``kipekee_worker --processes``, Celery prefork,
``db_worker`` processes): each process counts in its own memory, and a scrape reaches one
of them. Set ``PROMETHEUS_MULTIPROC_DIR`` to an empty directory shared by every process
of the host (before they start; empty it at each deployment): prometheus-client then
keeps the counters and histograms in files there, and :func:`view` answers the sum of
every process's (prometheus-client's multiprocess mode). The queue gauges are read from
the database once per scrape, not per process, either way.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

from django.db.models import Count, Min
from django.http import Http404, HttpRequest, HttpResponse
from django.utils import timezone
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from . import conf, signals
from .models import WAITING_STATUSES, OutboxEmail, Status

EMAILS = Counter("kipekee_emails", "Outbox emails that reached a status.", ["status", "provider"])
SEND_DURATION = Histogram(
    "kipekee_send_duration_seconds", "Duration of one delivery attempt.", ["provider"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60),
)
QUEUE_TO_SENT = Histogram(
    "kipekee_queue_to_sent_seconds", "From the row's creation to sent.",
    buckets=(0.1, 0.5, 1, 2, 5, 15, 60, 300, 900, 3600, 4 * 3600, 24 * 3600),
)


class QueueCollector(Collector):
    """Queue depth and oldest due message, read from the outbox on each scrape."""

    def describe(self) -> Iterator[GaugeMetricFamily]:
        # Registering must not touch the database (it happens in AppConfig.ready()).
        yield GaugeMetricFamily("kipekee_queue_depth", "Outbox rows waiting or being sent.",
                                labels=["status"])
        yield GaugeMetricFamily("kipekee_oldest_due_age_seconds",
                                "Age of the oldest due message still waiting.")

    def collect(self) -> Iterator[GaugeMetricFamily]:
        if not conf.get().metrics:
            return
        now = timezone.now()
        depth = GaugeMetricFamily("kipekee_queue_depth", "Outbox rows waiting or being sent.",
                                  labels=["status"])
        counts = dict(
            OutboxEmail.objects.filter(status__in=[*WAITING_STATUSES, Status.SENDING])
            .values_list("status").annotate(n=Count("id")).order_by()
        )
        for status in (*WAITING_STATUSES, Status.SENDING):
            depth.add_metric([str(status)], counts.get(status, 0))
        yield depth
        oldest = OutboxEmail.objects.waiting().filter(due_at__lte=now).aggregate(
            m=Min("due_at"))["m"]
        yield GaugeMetricFamily("kipekee_oldest_due_age_seconds",
                                "Age of the oldest due message still waiting.",
                                value=(now - oldest).total_seconds() if oldest else 0.0)


def _count(status: str) -> Any:
    def receive(sender: type, *, email: OutboxEmail, outcome: Any = None, **kwargs: Any) -> None:
        if not conf.get().metrics:
            return
        provider = outcome.provider if outcome is not None else ""
        EMAILS.labels(status=status, provider=provider).inc()
        if outcome is not None:
            SEND_DURATION.labels(provider=provider).observe(
                (outcome.finished_at - outcome.started_at).total_seconds())
            if status == "sent":
                QUEUE_TO_SENT.observe((outcome.finished_at - email.created_at).total_seconds())

    receive.__name__ = f"count_{status}"
    return receive


_receivers = {name: _count(name)
              for name in ("queued", "sent", "deferred", "failed", "cancelled", "suppressed")}
_collector = QueueCollector()
_installed = False


def install() -> None:
    """Connect the counters to the signals and register the queue collector (once)."""
    global _installed
    if _installed:
        return
    for name, receive in _receivers.items():
        signal = getattr(signals, name, None)  # "suppressed" comes with the suppression list
        if signal is not None:
            signal.connect(receive, dispatch_uid=f"kipekee.metrics.{name}")
    REGISTRY.register(_collector)
    _installed = True


def view(request: HttpRequest) -> HttpResponse:
    """The metrics in Prometheus' text format (404 while ``METRICS`` is off)."""
    if not conf.get().metrics:
        raise Http404("Kipekee metrics are off (KIPEKEE['METRICS']).")
    return HttpResponse(generate_latest(registry()), content_type=CONTENT_TYPE_LATEST)


def registry() -> CollectorRegistry:
    """What a scrape reads: this process's registry; in multiprocess mode
    (``PROMETHEUS_MULTIPROC_DIR``), every process's counters and histograms summed from
    their files, and the queue gauges read from the database."""
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return REGISTRY
    from prometheus_client.multiprocess import MultiProcessCollector  # noqa: PLC0415 - multiprocess mode only

    scrape = CollectorRegistry()
    MultiProcessCollector(scrape)  # type: ignore[no-untyped-call]
    scrape.register(_collector)
    return scrape
