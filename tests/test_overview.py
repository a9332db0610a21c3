"""The admin's overview page (kipekee.overview, admin.overview_view): the hourly chart,
queue depth and oldest-due age, providers' failure rates and breakers, engine heartbeats
— read from the database, checked in the figures and in headless Chromium."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
from django.utils import timezone
from playwright.sync_api import Page, expect

from kipekee import overview
from kipekee.models import Attempt, EngineHeartbeat, OutboxEmail, Status

from .test_admin_browser import ARTIFACTS, _row, page  # noqa: F401 - the logged-in page

pytestmark = pytest.mark.django_db(transaction=True)

PROVIDERS = {"primary": {"BACKEND": "django.core.mail.backends.locmem.EmailBackend"},
             "backup": {"BACKEND": "django.core.mail.backends.locmem.EmailBackend"}}


def _attempt(row: OutboxEmail, number: int, outcome: str, ago: timedelta, provider: str = "primary",
             error: str = "") -> None:
    finished = timezone.now() - ago
    Attempt.objects.create(email=row, number=number, provider=provider, outcome=outcome,
                           started_at=finished - timedelta(seconds=1), finished_at=finished,
                           error=error)


@pytest.fixture
def history(settings):
    """Three hours of mail: what each series should count is said beside it."""
    settings.KIPEKEE = {"PROVIDERS": PROVIDERS, "ENGINE": None,
                        "CIRCUIT_BREAKER": {"FAILURES": 2, "COOLDOWN_SECONDS": 60}}
    hour = timedelta(hours=1)
    for i in range(3):  # 3 sent, 3 h ago
        _attempt(_row(status=Status.SENT, attempts=1, message_id=f"<s{i}@x>"), 1, "sent",
                 3 * hour)
    # Deferred 2 h ago, then failed (refused) 50 min ago: one deferred, one failed.
    failed = _row(status=Status.FAILED, attempts=2, message_id="<f@x>")
    _attempt(failed, 1, "transient", 2 * hour, error="451 try later")
    _attempt(failed, 2, "permanent", timedelta(minutes=50), error="550 no such user")
    # Deferred twice on the backup just now (its breaker, 2 failures: open), still waiting.
    waiting = _row(status=Status.DEFERRED, attempts=2, message_id="<d@x>",
                   due_at=timezone.now() - timedelta(seconds=90))
    _attempt(waiting, 1, "transient", timedelta(seconds=20), provider="backup",
             error="421 busy")
    _attempt(waiting, 2, "transient", timedelta(seconds=10), provider="backup",
             error="421 busy")
    # Suppressed as written, 1 h ago; and one queued for tomorrow (waiting, not due).
    _row(status=Status.SUPPRESSED, message_id="<x@x>", created_at=timezone.now() - hour)
    _row(status=Status.QUEUED, message_id="<q@x>", due_at=timezone.now() + timedelta(days=1))
    now = timezone.now()
    EngineHeartbeat.objects.create(name="worker@a:1", kind="worker", host="a", pid=1,
                                   beat_at=now, sent=3)
    EngineHeartbeat.objects.create(name="worker@b:2", kind="worker", host="b", pid=2,
                                   beat_at=now - timedelta(minutes=10))
    EngineHeartbeat.objects.create(name="tasks@c:3", kind="tasks", host="c", pid=3,
                                   beat_at=now - timedelta(minutes=5), stopped_at=now)


def test_the_figures_come_from_the_attempt_log_and_the_rows(history):
    hours = overview.hourly(days=1)
    assert len(hours) == 24 and hours[-1].start <= timezone.now() < hours[-1].start + timedelta(hours=1)
    totals = {series: sum(getattr(h, series) for h in hours) for series in overview.SERIES}
    assert totals == {"sent": 3, "deferred": 3, "failed": 1, "suppressed": 1}
    by_hour = {h.start: h for h in hours}
    three_ago = overview._hour(timezone.now() - timedelta(hours=3))
    assert by_hour[three_ago].sent == 3

    queue = overview.queue()
    assert (queue.depth, queue.queued, queue.deferred) == (2, 1, 1)
    assert 90 <= queue.oldest_due_age < 120

    providers = {p.name: p for p in overview.providers()}
    assert (providers["backup"].attempts, providers["backup"].failures,
            providers["backup"].breaker) == (2, 2, "open")
    assert providers["primary"].breaker == "closed"
    assert providers["primary"].attempts == 1 and providers["primary"].failure_rate == 1.0

    states = {e.name: e.state for e in overview.engines()}
    assert states == {"worker@a:1": "alive", "worker@b:2": "dead", "tasks@c:3": "stopped"}


def test_the_overview_page_in_the_browser(history, page: Page, live_server):  # noqa: F811
    page.goto(f"{live_server.url}/admin/kipekee/outboxemail/")
    page.click("#kipekee-overview-link")
    expect(page.locator("#kipekee-chart")).to_be_visible()
    assert page.inner_text("#kipekee-queue-depth") == "2"
    assert page.inner_text("#kipekee-oldest-due").endswith(" s")
    for series, n in {"sent": 3, "deferred": 3, "failed": 1, "suppressed": 1}.items():
        assert page.inner_text(f"#kipekee-total-{series}") == str(n)
    # The chart: stacked bars, one per hour and series with mail; a tooltip on each.
    assert page.locator("#kipekee-chart rect.bar-sent").count() == 1
    assert page.locator("#kipekee-chart rect.bar-deferred").count() == 2  # 2 h ago, and now
    assert "3 sent" in page.locator("#kipekee-chart rect.bar-sent title").text_content()
    box = page.locator("#kipekee-chart rect.bar-sent").bounding_box()
    assert box is not None and box["height"] > 50  # the peak hour fills the chart
    backup = page.locator("#kipekee-providers tr[data-provider=backup]")
    expect(backup.locator(".breaker")).to_have_text("open")
    expect(backup.locator(".rate")).to_have_text("100%")
    expect(page.locator("#kipekee-engines tr[data-engine='worker@b:2'] .state")).to_have_text("dead")
    expect(page.locator("#kipekee-engines tr[data-engine='worker@a:1'] .state")).to_have_text("alive")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "admin-overview.png"), full_page=True)
    # Another window: 7 days, the same figures.
    page.click("text=7 d")
    expect(page).to_have_url(re.compile(r"days=7"))
    assert page.inner_text("#kipekee-total-sent") == "3"
