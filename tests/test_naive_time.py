"""``USE_TZ = False`` (issue 17, item 7): Kipekee works as Django does there — naive
datetimes are wall-clock times in ``TIME_ZONE``, aware ones are converted to it — for
``send_at``, reminders, retries and the engines. Against a real SMTP server."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta

import pytest
from django.utils import timezone

import kipekee
from kipekee import notifications, outbox, recording
from kipekee.delivery import Deliverer
from kipekee.engines.worker import Worker
from kipekee.exceptions import InvalidMessage
from kipekee.models import OutboxEmail, Status
from kipekee.testing import Faults

from .app.models import Booking
from .conftest import smtp_provider

pytestmark = pytest.mark.django_db(transaction=True)

MAIL = {"subject": "Order", "text": "thanks", "to": ["ann@example.com"]}


@pytest.fixture(autouse=True)
def naive_time(settings):
    """Wall-clock time in Nairobi (UTC+3, no summer time), as a project without time
    zone support would run."""
    settings.USE_TZ = False
    settings.TIME_ZONE = "Africa/Nairobi"


def drain() -> None:
    worker = Worker(concurrency=1, poll_interval=0.02, once=True)
    worker.run()


def test_a_naive_send_at_is_the_local_time_and_goes_out_then(sink_provider):
    now = timezone.now()
    assert timezone.is_naive(now)
    later = kipekee.send(**MAIL, send_at=now + timedelta(hours=1))
    soon = kipekee.send(**MAIL, send_at=now + timedelta(seconds=0.5), mode="queue")
    assert (later.status, soon.status) == (Status.QUEUED, Status.QUEUED)
    assert OutboxEmail.objects.get(pk=later.id).due_at == now + timedelta(hours=1)
    drain()
    assert sink_provider.messages == []  # neither is due yet
    time.sleep(0.6)
    drain()
    assert soon.refresh().sent and later.refresh().status == Status.QUEUED
    assert len(sink_provider.wait_for(1)) == 1


def test_an_aware_send_at_is_converted_to_the_local_time(sink_provider):
    at = datetime.now(UTC).replace(microsecond=0) + timedelta(hours=2)
    receipt = kipekee.send(**MAIL, send_at=at)
    row = OutboxEmail.objects.get(pk=receipt.id)
    assert row.status == Status.QUEUED
    assert row.due_at == at.astimezone(timezone.get_default_timezone()).replace(tzinfo=None)
    # In the past, aware: sent at once, in the request.
    assert kipekee.send(**MAIL, send_at=datetime.now(UTC) - timedelta(minutes=1)).sent


def test_with_time_zone_support_a_naive_send_at_is_still_refused(sink_provider, settings):
    settings.USE_TZ = True
    with pytest.raises(InvalidMessage, match="aware"):
        kipekee.send(**MAIL, send_at=datetime.now() + timedelta(hours=1))


def test_a_deferred_row_is_retried_and_sent(smtp_server, kipekee_settings):
    server = smtp_server(faults=Faults(data_replies=["451 4.3.0 busy"]))
    kipekee_settings(primary=smtp_provider(server), _extra={"RETRY": {"BASE_DELAY": 0.2,
                                                                      "JITTER": False}})
    receipt = kipekee.send(**MAIL, mode="hybrid")
    assert receipt.status == Status.DEFERRED
    row = OutboxEmail.objects.get(pk=receipt.id)
    assert timezone.is_naive(row.due_at) and row.due_at > timezone.now()
    time.sleep(0.3)
    drain()
    assert receipt.refresh().sent and len(server.wait_for(1)) == 1


def test_reminders_follow_a_booking_with_naive_times(sink_provider):
    starts_at = timezone.now() + timedelta(days=3)
    booking = Booking.objects.create(number="BK-7", email="sam@example.com", film="Sarafina",
                                     seat="F7", starts_at=starts_at)
    [row] = notifications.rows("booking.reminder", booking)
    assert row.status == Status.QUEUED and row.due_at == starts_at - timedelta(hours=24)
    booking.seat = "F8"
    booking.save()
    assert list(notifications.rows("booking.reminder", booking)) == [row]
    booking.starts_at += timedelta(hours=1)
    booking.save()
    old, new = notifications.rows("booking.reminder", booking).order_by("id")
    assert (old.status, new.status) == (Status.CANCELLED, Status.QUEUED)
    assert new.due_at == booking.starts_at - timedelta(hours=24)
    # Its time comes (moved by hand: a day does not pass in a test); it is sent.
    OutboxEmail.objects.filter(pk=new.pk).update(due_at=timezone.now())
    claimed = outbox.claim(new.pk)
    assert claimed is not None
    with Deliverer() as deliverer:
        recording.record(claimed, deliverer.deliver(claimed))
    assert OutboxEmail.objects.get(pk=new.pk).status == Status.SENT


def test_the_thread_of_a_worker_sends_a_scheduled_row_when_due(sink_provider):
    worker = Worker(concurrency=1, poll_interval=0.02)
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        receipt = kipekee.send(**MAIL, send_at=timezone.now() + timedelta(seconds=0.3),
                               mode="queue")
        deadline = time.monotonic() + 10
        while not receipt.refresh().sent:
            assert time.monotonic() < deadline, receipt
            time.sleep(0.05)
    finally:
        worker.stop()
        thread.join(10)
    sent_at = OutboxEmail.objects.get(pk=receipt.id).sent_at
    assert timezone.is_naive(sent_at) and abs(sent_at - timezone.now()) < timedelta(seconds=10)
