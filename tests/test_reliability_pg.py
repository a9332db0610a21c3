"""Reliability suite with real worker processes on PostgreSQL: 8 workers claiming at once,
``kill -9`` between claim and send, and ``kill -9`` after the provider accepted a message
but before the worker recorded it. Run by the PostgreSQL pass of ``make test``."""

from __future__ import annotations

import threading
import time
from collections import Counter

import pytest
from django.db.models import Max
from django.utils import timezone

from kipekee.models import Attempt, EngineHeartbeat, OutboxEmail, Status
from kipekee.testing import Faults

from .conftest import smtp_provider
from .test_engines_pg import bulk_enqueue, stop_all, wait_for_rows, worker_process
from .test_reliability import drain, figures

pytestmark = [pytest.mark.reliability, pytest.mark.postgres,
              pytest.mark.django_db(transaction=True)]


def wait_for_leases_to_expire() -> None:
    latest = OutboxEmail.objects.aggregate(latest=Max("lease_until"))["latest"]
    while latest is not None and timezone.now() <= latest:
        time.sleep(0.05)


def test_eight_workers_claim_concurrently_and_deliver_once(smtp_sink, kipekee_settings, settings,
                                                           scenario):
    kipekee_settings(primary=smtp_provider(smtp_sink))
    procs = [worker_process(settings.KIPEKEE, "--concurrency", "1", "--batch-size", "5",
                            "--poll-interval", "0.1") for _ in range(8)]
    try:
        # All eight are polling before the rows appear, so they race for the same rows.
        wait_for_rows(lambda: EngineHeartbeat.objects.count() == 8, timeout=90,
                      what="8 workers up", procs=procs)
        expected = bulk_enqueue(400)
        wait_for_rows(lambda: OutboxEmail.objects.filter(status=Status.SENT).count() == 400,
                      timeout=120, what="400 sent", procs=procs)
    finally:
        outputs = stop_all(procs)
    assert all(p.returncode == 0 for p in procs), outputs
    delivered, lost, duplicated = figures(smtp_sink, expected)
    assert (delivered, lost, duplicated) == (400, 0, 0)
    # No row was ever claimed twice: one attempt each, by exactly one worker.
    assert set(OutboxEmail.objects.values_list("attempts", flat=True)) == {1}
    assert Attempt.objects.count() == 400
    beats = list(EngineHeartbeat.objects.values_list("sent", flat=True))
    assert sum(beats) == 400
    took_part = sum(1 for sent in beats if sent)
    assert took_part >= 2  # the claims really were concurrent
    scenario.record("concurrent claims, 8 worker processes",
                    load=f"400 messages, {took_part}/8 workers sent some",
                    faults="8 processes polling the same rows", delivered=delivered, lost=lost,
                    duplicated=duplicated)


def test_kill_9_between_claim_and_send(smtp_server, kipekee_settings, settings, scenario):
    """The worker holds a claimed batch and is connecting (the server stalls its banner)
    when it is killed: after the lease, another engine sends each message once."""
    server = smtp_server(faults=Faults(stall_greeting=30))
    kipekee_settings(primary=smtp_provider(server, timeout=60), _extra={"LEASE_SECONDS": 2})
    expected = bulk_enqueue(5)
    proc = worker_process(settings.KIPEKEE, "--concurrency", "1", "--batch-size", "5",
                          "--poll-interval", "0.1")
    wait_for_rows(lambda: OutboxEmail.objects.filter(status=Status.SENDING).count() == 5
                  and server.connections >= 1, timeout=60, what="a claimed batch", procs=[proc])
    proc.kill()  # SIGKILL: no release, no result
    proc.wait()
    assert server.messages == []
    server.faults.stall_greeting = 0
    wait_for_leases_to_expire()
    drain("recovery")
    rows = OutboxEmail.objects.all()
    assert {(r.status, r.attempts) for r in rows} == {(Status.SENT, 2)}
    assert set(Attempt.objects.values_list("number", flat=True)) == {2}  # attempt 1 left no row
    delivered, lost, duplicated = figures(server, expected)
    assert (delivered, lost, duplicated) == (5, 0, 0)
    scenario.record("kill -9 between claim and send", load="5 messages in 1 claimed batch",
                    faults="SIGKILL while connecting, lease 2 s", delivered=delivered, lost=lost,
                    duplicated=duplicated)


def test_kill_9_after_the_provider_accepted(smtp_server, kipekee_settings, settings, scenario):
    """The server has taken the message and holds its 250 when the worker is killed: the
    message is sent again after the lease (one extra copy at most, same Message-ID)."""
    accepted = threading.Event()
    server = smtp_server(faults=Faults(stall_before_data_reply=30),
                         on_message=lambda message: accepted.set())
    kipekee_settings(primary=smtp_provider(server, timeout=60), _extra={"LEASE_SECONDS": 2})
    expected = bulk_enqueue(3)
    proc = worker_process(settings.KIPEKEE, "--concurrency", "1", "--batch-size", "3",
                          "--poll-interval", "0.1")
    try:
        assert accepted.wait(60), "the worker never reached the server"
    finally:
        proc.kill()  # while the server still holds the reply
        proc.wait()
    [first] = [m.message_id for m in server.messages]
    assert OutboxEmail.objects.get(message_id=first).status == Status.SENDING  # not recorded
    server.faults.stall_before_data_reply = 0
    wait_for_leases_to_expire()
    drain("recovery")
    assert set(OutboxEmail.objects.values_list("status", flat=True)) == {Status.SENT}
    received = Counter(m.message_id for m in server.messages)
    assert received[first] == 2 and set(received) == expected
    assert all(count == 1 for mid, count in received.items() if mid != first)
    copies = [m.message for m in server.messages if m.message_id == first]
    assert copies[0]["Message-ID"] == copies[1]["Message-ID"] == first
    assert OutboxEmail.objects.get(message_id=first).attempts == 2
    delivered, lost, duplicated = figures(server, expected)
    assert (delivered, lost, duplicated) == (3, 0, 1)
    scenario.record("kill -9 after provider accepted", load="3 messages in 1 claimed batch",
                    faults="SIGKILL while the server holds its 250", delivered=delivered,
                    lost=lost, duplicated=duplicated)
