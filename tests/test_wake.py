"""Waking an engine after a commit never fails the caller (issue 17, item 10): with the
Celery engine and its broker down, the commit stands, the application's later on_commit
hooks run, and the rows wait in the outbox for the sweep."""

from __future__ import annotations

import logging
import time

import pytest
from celery import Celery, current_app
from django.db import transaction

import kipekee
from kipekee.models import OutboxEmail, Status

from .conftest import smtp_provider, unused_port

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def broker_down():
    """The current Celery app's broker is a port where nothing listens."""
    app = Celery("kipekee-broker-down", broker=f"redis://127.0.0.1:{unused_port()}/0",
                 set_as_current=False)
    app.conf.broker_connection_timeout = 1
    before = current_app._get_current_object()
    app.set_current()
    try:
        yield app
    finally:
        before.set_current()
        app.close()


def test_a_broker_that_is_down_does_not_fail_the_commit(smtp_sink, settings, broker_down,
                                                        caplog):
    """Before: the task's publish raised into the caller after the commit, and the
    application's own on_commit hooks registered after Kipekee's did not run."""
    settings.KIPEKEE = {"ENGINE": "celery", "PROVIDERS": {"primary": smtp_provider(smtp_sink)}}
    ran: list[str] = []
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="kipekee.engines"), transaction.atomic():
        receipt = kipekee.send(subject="Order", text="thanks", to=["ann@example.com"],
                               mode="queue")
        transaction.on_commit(lambda: ran.append("the application's hook"))
    assert ran == ["the application's hook"]
    assert OutboxEmail.objects.get(pk=receipt.id).status == Status.QUEUED  # for the sweep
    assert any("sweep" in r.getMessage() and r.exc_info for r in caplog.records
               if r.name == "kipekee.engines"), [r.getMessage() for r in caplog.records]
    print(f"broker down: send() returned in {time.monotonic() - started:.1f} s")
