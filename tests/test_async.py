"""``await kipekee.asend(...)`` in async views: the same receipt, and the event loop keeps
serving while the provider answers."""

from __future__ import annotations

import asyncio
import threading

import pytest
from asgiref.sync import sync_to_async
from django.db import connections as db_connections
from django.test import AsyncClient

import kipekee
from kipekee.dispatch import Receipt
from kipekee.models import OutboxEmail, Status

from .conftest import smtp_provider

pytestmark = pytest.mark.django_db(transaction=True)


def run(coroutine):
    """``asyncio.run`` in a thread of its own: the browser tests' Playwright leaves an event
    loop running in the main thread of the test process."""
    result = []
    thread = threading.Thread(target=lambda: result.append(asyncio.run(coroutine)))
    thread.start()
    thread.join(30)
    assert result, "the coroutine raised or did not finish (see the thread's traceback)"
    return result[0]


def test_asend_in_an_asgi_view_never_blocks_the_event_loop(smtp_server, kipekee_settings):
    # The provider holds its reply to the message until another coroutine of the view's
    # event loop has run: if the send blocked the loop, that coroutine could not run, the
    # server would give up waiting and refuse the message.
    provider_waiting, loop_ran = threading.Event(), threading.Event()

    def hold_the_reply(message) -> None:  # in the server's thread, before its 250
        provider_waiting.set()
        if not loop_ran.wait(5):
            raise RuntimeError("the client's event loop stayed blocked")

    server = smtp_server(on_message=hold_the_reply)
    kipekee_settings(primary=smtp_provider(server, timeout=10))

    async def scenario():
        async def other_request():  # any other work the loop serves meanwhile
            while not provider_waiting.is_set():
                await asyncio.sleep(0.005)
            loop_ran.set()

        other = asyncio.create_task(other_request())
        response = await AsyncClient().post("/async-signup/", {"to": "ann@example.com"})
        await other
        return response

    response = run(scenario())
    assert response.status_code == 200
    answer = response.json()
    assert answer["status"] == Status.SENT and answer["provider"] == "primary", answer
    row = OutboxEmail.objects.get(pk=answer["id"])
    assert (row.status, row.message_id) == (Status.SENT, answer["message_id"])
    [received] = server.wait_for(1)
    assert received.message_id == row.message_id


@pytest.fixture
def close_sync_thread_connections():
    """Outside an ASGI request, ``sync_to_async`` runs in asgiref's one shared thread, whose
    database connection Django closes only at the end of a request: closed here, so that
    the test database can be dropped (PostgreSQL refuses while a session is open)."""
    yield
    run(sync_to_async(db_connections.close_all)())


def test_asend_gives_the_receipt_send_gives(sink_provider, close_sync_thread_connections):
    receipt = run(kipekee.asend(subject="Hi", text="x", to="ann@example.com",
                                        idempotency_key="k1"))
    assert isinstance(receipt, Receipt) and receipt.sent and receipt.created
    again = kipekee.send(subject="Hi", text="x", to="ann@example.com", idempotency_key="k1")
    assert (again.id, again.created) == (receipt.id, False)

    email = kipekee.Email(subject="Queued", text="x", to="bob@example.com", mode="queue")
    queued = run(email.asend())
    assert queued.status == Status.QUEUED
    OutboxEmail.objects.filter(pk=queued.id).update(status=Status.CANCELLED)
    assert run(queued.arefresh()).status == Status.CANCELLED
