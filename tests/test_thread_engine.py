"""The thread engine in a web process: woken only by a commit that queued mail (issue
17, item 6), and at a normal exit it finishes or gives back what it holds (item 5).
Requests through Django's test client; the exit in a real subprocess."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
from django.db.backends.signals import connection_created
from django.test import Client

from kipekee.engines import thread
from kipekee.models import OutboxEmail, Status

from .conftest import smtp_provider

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
