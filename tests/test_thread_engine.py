"""The thread engine in a web process: woken only by a commit that queued mail (issue
17, item 6), and at a normal exit it finishes or gives back what it holds (item 5).
Requests through Django's test client; the exit in a real subprocess."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from django.db.backends.signals import connection_created
from django.test import Client

from kipekee.engines import thread
from kipekee.engines.worker import Worker
from kipekee.models import OutboxEmail, Status
from kipekee.testing import Faults

from .conftest import smtp_provider, subprocess_env

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def outbox_statements() -> Iterator[list[str]]:
    """The SQL statements on the outbox table run by connections opened from now on (the
    engine's threads open their own), as Django's execute wrappers see them."""
    statements: list[str] = []
    main = threading.current_thread()

    def count(execute, sql, params, many, context):
        if threading.current_thread() is not main and "kipekee_outboxemail" in sql:
            statements.append(sql)
        return execute(sql, params, many, context)

    def install(sender, connection, **kwargs):
        connection.execute_wrappers.append(count)

    connection_created.connect(install)
    try:
        yield statements
    finally:
        connection_created.disconnect(install)


def test_requests_that_queue_nothing_do_not_wake_the_engine(smtp_sink, settings,
                                                            outbox_statements):
    """Before: every request woke the engine, which then looked for due rows: 50
    requests, 50 rounds, about 200 statements on the outbox."""
    settings.KIPEKEE = {"ENGINE": "thread", "PROVIDERS": {"primary": smtp_provider(smtp_sink)}}
    client = Client()
    for _ in range(50):
        assert client.get("/page/").status_code == 200
        time.sleep(0.01)
    time.sleep(0.5)
    engine = thread.engine()
    assert engine.alive  # started by the first request: rows left from before go out
    # One round at start-up (claim and next due time: a few statements), none per request.
    assert 0 < len(outbox_statements) <= 8, len(outbox_statements)
    print(f"50 requests: {len(outbox_statements)} outbox statements by the engine")
    # A request that queues mail does wake it: sent now, not after its 30 s sleep.
    started = time.monotonic()
    pk = int(client.get("/order/").content)
    while OutboxEmail.objects.get(pk=pk).status != Status.SENT:
        assert time.monotonic() - started < 10, "the commit did not wake the engine"
        time.sleep(0.02)
    assert len(smtp_sink.wait_for(1)) == 1


ROOT = Path(__file__).resolve().parent.parent

# A web process in miniature: it queues three mails for its thread engine, waits until
# the engine holds them, and exits normally (as gunicorn's worker does, with sys.exit).
EXITING_PROCESS = """
import sys, time
import django
django.setup()
import kipekee
from kipekee.models import OutboxEmail
ids = [kipekee.send(subject=f"Order {i}", text="thanks", to=["ann@example.com"],
                    mode="queue").id for i in range(3)]
deadline = time.monotonic() + 20
while not OutboxEmail.objects.filter(pk__in=ids, status="sending").exists():
    assert time.monotonic() < deadline, "the engine never claimed the rows"
    time.sleep(0.005)
print("claimed; exiting", flush=True)
sys.exit(0)
"""


def run_child(script: str, kipekee_settings: dict, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run ``script`` in a new Python process on the test's database and settings."""
    return subprocess.run([sys.executable, "-c", script], cwd=ROOT, timeout=timeout, check=False,
                          env=subprocess_env(kipekee_settings), capture_output=True, text=True)


def test_a_normal_exit_finishes_what_the_engine_holds(smtp_server, kipekee_settings, settings):
    """Before: the daemon thread died with the interpreter; the three rows it held stayed
    ``sending`` until their lease ended, and the one being sent went out twice. Now what
    it was sending is recorded and what it had claimed ahead is given back: the next
    engine sends each message once, without waiting for a lease."""
    slow = smtp_server(faults=Faults(stall_before_data_reply=0.3))
    kipekee_settings(primary=smtp_provider(slow))  # the test's, after the child's
    started = time.monotonic()
    child = run_child(EXITING_PROCESS, {**settings.KIPEKEE, "ENGINE": "thread"})
    assert child.returncode == 0, child.stdout + child.stderr
    assert "claimed; exiting" in child.stdout
    assert time.monotonic() - started < 30  # the wait at exit is bounded
    rows = OutboxEmail.objects.all()
    status = Counter(rows.values_list("status", flat=True))
    assert sum(status.values()) == 3 and Status.SENDING not in status, status
    assert status[Status.SENT] >= 1  # the batch in hand was finished and recorded
    sent = set(rows.filter(status=Status.SENT).values_list("message_id", flat=True))
    assert {m.message_id for m in slow.messages} == sent and len(slow.messages) == len(sent)
    given_back = rows.filter(status=Status.QUEUED)
    assert set(given_back.values_list("attempts", flat=True)) <= {0}
    # The next engine (here: a worker) finds them due now, and sends each message once.
    Worker(concurrency=1, poll_interval=0.02, once=True).run()
    assert Counter(rows.values_list("status", flat=True)) == {Status.SENT: 3}
    received = Counter(m.message_id for m in slow.wait_for(3))
    assert set(received.values()) == {1}


def lease_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "kipekee-leases" and t.is_alive()]


def test_stopping_the_engine_ends_its_lease_thread_before_returning(smtp_server,
                                                                   kipekee_settings):
    """Before: stop() (and so the exit hook) joined the engine's thread only; the lease
    keeper's thread, busy renewing, was still running as stop() returned, and at a
    normal exit the interpreter shut down under it (a daemon thread in a database call
    is cut off there). Now stopping waits for it. Each renewal is made slow (0.4 s, a
    delay in front of the real statement: a busy database) so that one is under way
    when the engine stops."""
    import kipekee

    slow = smtp_server(faults=Faults(stall_before_data_reply=0.3))
    kipekee_settings(primary=smtp_provider(slow), _extra={"LEASE_SECONDS": 0.6})

    def slow_renewals(execute, sql, params, many, context):
        if threading.current_thread().name == "kipekee-leases":
            time.sleep(0.4)
        return execute(sql, params, many, context)

    def install(sender, connection, **kwargs):
        connection.execute_wrappers.append(slow_renewals)

    connection_created.connect(install)
    try:
        ids = [kipekee.send(subject=f"Order {i}", text="thanks", to=["ann@example.com"],
                            mode="queue").id for i in range(3)]
        engine = thread.ThreadEngine(batch_size=1)
        engine.start()
        deadline = time.monotonic() + 10
        while not lease_threads():  # the engine holds a claim: its lease is kept
            assert time.monotonic() < deadline, "no lease thread"
            time.sleep(0.005)
        time.sleep(0.3)  # a renewal is under way
        engine.stop()
        assert not engine.alive
        assert lease_threads() == []
    finally:
        connection_created.disconnect(install)
    assert not OutboxEmail.objects.filter(pk__in=ids, status=Status.SENDING).exists()
