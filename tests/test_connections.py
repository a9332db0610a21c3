"""Warm provider connections (kipekee.connections): reuse across requests, health checks,
replacement of what the server closed, the concurrency bound, fork and exit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import warnings
from collections import Counter

import pytest
from django.core.mail import EmailMessage
from django.core.management import call_command

import kipekee
from kipekee import circuit, connections, deadlines, outbox
from kipekee.conf import ConnectionsConfig
from kipekee.connections import ProviderBusy, ProviderPool
from kipekee.delivery import Deliverer
from kipekee.models import Attempt, ErrorKind, OutboxEmail, Status
from kipekee.testing import Faults

from .conftest import smtp_provider
from .mailtrap_fixtures import mailtrap_provider

pytestmark = pytest.mark.django_db(transaction=True)

MAIL = {"subject": "Your ticket", "text": "see you", "to": ["ann@example.com"]}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def attempts(receipt) -> list[tuple[int, str]]:
    return list(Attempt.objects.filter(email_id=receipt.id).values_list("number", "outcome"))


def wait_until(predicate, timeout: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def breaker_failures(alias: str) -> int:
    breaker = circuit.for_provider(alias)
    return breaker._failures


# --- warm across requests ---------------------------------------------------------------


def test_in_request_sends_reuse_one_warm_connection(sink_provider):
    receipts = [kipekee.send(**MAIL) for _ in range(3)]
    assert all(r.sent for r in receipts), receipts
    assert len(sink_provider.wait_for(3)) == 3
    assert sink_provider.connections == 1
    assert sink_provider.open_connections == 1  # still open, for the next request


def test_a_starttls_and_auth_session_is_reused(smtp_server, smtp_ca_file, kipekee_settings):
    server = smtp_server(tls="starttls", require_starttls=True, auth={"shop": "s3cret"})
    kipekee_settings(primary=smtp_provider(server, use_tls=True, username="shop",
                                           password="s3cret", ca_file=str(smtp_ca_file)))
    assert all(kipekee.send(**MAIL).sent for _ in range(3))
    received = server.wait_for(3)
    assert all(m.tls and m.auth_user == "shop" for m in received)
    assert server.connections == 1


@pytest.mark.parametrize("reply", ["421 4.4.2 Idle timeout, closing", None],
                         ids=["421-then-close", "silent-close"])
def test_a_connection_the_server_closed_while_idle_is_replaced(sink_provider, reply):
    assert kipekee.send(**MAIL).sent
    assert sink_provider.drop_connections(reply) == 1
    wait_until(lambda: sink_provider.open_connections == 0, what="the server to close")
    receipt = kipekee.send(**MAIL)
    assert receipt.sent, receipt
    assert attempts(receipt) == [(1, "sent")] and receipt.error == ""
    assert breaker_failures("primary") == 0
    assert sink_provider.connections == 2


def test_421_to_mail_on_a_warm_connection_is_sent_on_a_new_one_and_is_no_failure(sink_provider):
    # The server closed the session between the pool's check and the send: a 421 to MAIL.
    assert kipekee.send(**MAIL).sent
    sink_provider.faults.mail_replies = ["421 4.3.2 Service shutting down"]
    receipt = kipekee.send(**MAIL)
    assert receipt.sent, receipt
    assert attempts(receipt) == [(1, "sent")] and receipt.error == ""
    assert breaker_failures("primary") == 0
    assert sink_provider.connections == 2
    assert len(sink_provider.wait_for(2)) == 2


def test_421_on_a_new_connection_stays_a_transient_failure(sink_provider):
    sink_provider.faults.mail_replies = ["421 4.3.2 Service shutting down"]
    receipt = kipekee.send(**MAIL)
    assert receipt.status == Status.DEFERRED and receipt.error_kind == ErrorKind.TRANSIENT
    assert "421" in receipt.error
    assert breaker_failures("primary") == 1
    assert sink_provider.messages == []


def test_an_idle_connection_is_probed_with_noop_before_reuse(sink_provider, kipekee_settings):
    assert kipekee.send(**MAIL).sent and kipekee.send(**MAIL).sent
    assert sink_provider.commands.get("NOOP", 0) == 0  # used moments ago: no round trip
    kipekee_settings(primary=smtp_provider(sink_provider), _extra={
        "CONNECTIONS": {"IDLE_SECONDS": 0.01}})
    sink_provider.clear()
    assert kipekee.send(**MAIL).sent
    time.sleep(0.05)  # idle past IDLE_SECONDS
    assert kipekee.send(**MAIL).sent
    assert sink_provider.commands.get("NOOP", 0) == 1
    assert sink_provider.connections == 1


def test_a_connection_past_its_max_age_is_closed_and_replaced(sink_provider, kipekee_settings):
    kipekee_settings(primary=smtp_provider(sink_provider), _extra={
        "CONNECTIONS": {"MAX_AGE_SECONDS": 0.01}})
    assert kipekee.send(**MAIL).sent
    time.sleep(0.05)
    assert kipekee.send(**MAIL).sent
    assert sink_provider.connections == 2
    assert sink_provider.commands.get("QUIT", 0) >= 1  # the old one, closed politely


def test_pool_size_zero_keeps_nothing_warm(sink_provider, kipekee_settings):
    kipekee_settings(primary=smtp_provider(sink_provider), _extra={"CONNECTIONS": {"POOL_SIZE": 0}})
    assert kipekee.send(**MAIL).sent and kipekee.send(**MAIL).sent
    assert sink_provider.connections == 2
    wait_until(lambda: sink_provider.open_connections == 0, what="both closed")


def test_settings_change_closes_the_warm_connections(sink_provider, kipekee_settings):
    assert kipekee.send(**MAIL).sent
    kipekee_settings(primary=smtp_provider(sink_provider, timeout=3))
    wait_until(lambda: sink_provider.open_connections == 0, what="the old connection to close")
    assert sink_provider.commands.get("QUIT", 0) == 1


def test_connections_settings_are_checked():
    from kipekee import conf
    from kipekee.exceptions import ConfigurationError

    parsed = conf.parse({"CONNECTIONS": {"POOL_SIZE": 2, "IDLE_SECONDS": 5,
                                         "MAX_AGE_SECONDS": 60}}).connections
    assert (parsed.pool_size, parsed.idle_seconds, parsed.max_age) == (2, 5.0, 60.0)
    for bad in ({"POOL_SIZE": -1}, {"POOL_SIZE": 1.5}, {"IDLE_SECONDS": 0}, {"SIZE": 3}, []):
        with pytest.raises(ConfigurationError, match="CONNECTIONS"):
            conf.parse({"CONNECTIONS": bad})


# --- HTTP keep-alive ----------------------------------------------------------------------


def test_http_provider_keeps_its_session_across_requests(mailtrap, kipekee_settings):
    kipekee_settings(mailtrap=mailtrap_provider(mailtrap))
    assert all(kipekee.send(**MAIL).sent for _ in range(3))
    assert len(mailtrap.wait_for(3)) == 3
    assert mailtrap.connections == 1  # one TCP connection: keep-alive across requests


# --- the bound: LIMITS["CONCURRENCY"] ----------------------------------------------------


def test_concurrency_bounds_open_connections_across_worker_threads(smtp_server, kipekee_settings):
    # Sends that take a while, so that the four threads overlap.
    server = smtp_server(faults=Faults(stall_before_data_reply=0.02))
    kipekee_settings(primary={**smtp_provider(server), "LIMITS": {"CONCURRENCY": 1}})
    for i in range(16):
        kipekee.send(**{**MAIL, "subject": f"Order {i}"}, mode="queue")
    call_command("kipekee_worker", once=True, concurrency=4, batch_size=2, poll_interval=0.05)
    assert OutboxEmail.objects.filter(status=Status.SENT).count() == 16
    received = Counter(m.message_id for m in server.wait_for(16))
    assert len(received) == 16 and set(received.values()) == {1}
    assert server.peak_connections == 1


def test_pool_bound_holds_under_threads_and_a_wait_ends_in_provider_busy():
    opened = []

    class Backend:
        def open(self):
            opened.append(self)

        def close(self):
            pass

    pool = ProviderPool("p", Backend, max_open=2,
                        config=ConnectionsConfig(pool_size=2, idle_seconds=10, max_age=60))
    inside, peak, lock, go = 0, 0, threading.Lock(), threading.Event()

    def work():
        nonlocal inside, peak
        conn = pool.checkout(timeout=5)
        pool.ready(conn)
        with lock:
            inside += 1
            peak = max(peak, inside)
        go.wait(0.05)
        with lock:
            inside -= 1
        pool.checkin(conn)

    threads = [threading.Thread(target=work) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert peak == 2 and len(opened) == 2 and pool.open_count == 2

    held = [pool.checkout(), pool.checkout()]
    with pytest.raises(ProviderBusy, match="all 2 connection"):
        pool.checkout(timeout=0.01)
    pool.checkin(held[0], reusable=False)  # closed: room for a new one
    assert pool.checkout(timeout=0).backend is None


def test_in_request_send_waits_half_its_budget_for_a_busy_provider_then_fails_over(
        smtp_server, kipekee_settings):
    primary, backup = smtp_server(), smtp_server()
    kipekee_settings(primary={**smtp_provider(primary), "LIMITS": {"CONCURRENCY": 1}},
                     backup=smtp_provider(backup), _extra={"NOW_TIME_BUDGET": 1.0})
    # (1 s, not 0.2: the backup's connect and send get the half left, which a loaded
    # machine can take longer than 0.1 s for.)
    pool = connections.pool_for("primary")
    held = pool.checkout()  # another thread's send, in progress
    try:
        receipt = kipekee.send(**MAIL)
    finally:
        pool.checkin(held)
    assert receipt.sent and receipt.provider == "backup", receipt
    assert breaker_failures("primary") == 0  # a local limit, not the provider's failure
    assert primary.connections == 0 and len(backup.wait_for(1)) == 1


def test_a_busy_provider_costs_no_attempt(sink_provider, kipekee_settings):
    kipekee_settings(primary={**smtp_provider(sink_provider), "LIMITS": {"CONCURRENCY": 1}},
                     _extra={"NOW_TIME_BUDGET": 0.2})
    pool = connections.pool_for("primary")
    held = pool.checkout()  # another thread's send, in progress
    try:
        receipt = kipekee.send(**MAIL)
    finally:
        pool.checkin(held)
    assert receipt.status == Status.DEFERRED and "in use" in receipt.error, receipt
    row = OutboxEmail.objects.get(pk=receipt.id)
    assert row.attempts == 0 and attempts(receipt) == []  # a local limit: postponed
    assert breaker_failures("primary") == 0 and sink_provider.connections == 0


def test_a_deliverer_never_waits_holding_another_providers_connection(smtp_server,
                                                                       kipekee_settings):
    # Thread B holds provider b's only connection and wants a's; the Deliverer holds a's
    # (it just sent on it) and wants b's. Were both to wait holding what the other wants,
    # neither would move until a timeout.
    deliverer_holds_a, b_held = threading.Event(), threading.Event()
    server_a = smtp_server(on_message=lambda m: deliverer_holds_a.set())
    server_b = smtp_server()
    kipekee_settings(a={**smtp_provider(server_a), "LIMITS": {"CONCURRENCY": 1}},
                     b={**smtp_provider(server_b), "LIMITS": {"CONCURRENCY": 1}})
    ids = [kipekee.send(**MAIL, mode="queue", provider=alias).id for alias in ("a", "b")]
    got_a: list[bool] = []

    def other_thread() -> None:
        pool_a, pool_b = connections.pool_for("a"), connections.pool_for("b")
        held_b = pool_b.checkout()
        b_held.set()
        deliverer_holds_a.wait(5)
        try:
            held_a = pool_a.checkout(timeout=5)
        except ProviderBusy:
            got_a.append(False)
        else:
            got_a.append(True)
            pool_a.checkin(held_a)
        pool_b.checkin(held_b)

    thread = threading.Thread(target=other_thread)
    thread.start()
    b_held.wait(5)
    rows = outbox.claim_batch(10, ids=ids)
    with deadlines.until(time.monotonic() + 20):
        outcomes = Deliverer().deliver_many(rows)
    thread.join(10)
    assert got_a == [True]  # the Deliverer gave a's connection back before waiting for b's
    assert [o.provider for o in outcomes] == ["a", "b"] and all(o.ok for o in outcomes)


# --- fork and exit --------------------------------------------------------------------


def test_a_forked_child_never_uses_its_parents_connection(sink_provider):
    assert kipekee.send(**MAIL).sent  # the parent's warm connection
    assert sink_provider.connections == 1
    with warnings.catch_warnings():
        # Python 3.12 warns about fork() in a process with threads (the test server's).
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # the child: the pool, as a gunicorn --preload worker would use it
        code = 1
        try:
            pool = connections.pool_for("primary")
            conn = pool.checkout(timeout=1)
            sent = pool.ready(conn).send_messages(
                [EmailMessage("from the child", "x", "shop@example.com", ["ann@example.com"])])
            pool.checkin(conn)
            connections.close_all()
            code = 0 if sent == 1 else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert sink_provider.connections == 2  # the child opened its own
    assert sink_provider.commands.get("QUIT", 0) == 1  # … and closed it; nothing on ours
    assert kipekee.send(**MAIL).sent
    assert sink_provider.connections == 2  # the parent's connection was left intact
    assert len(sink_provider.wait_for(3)) == 3


def test_warm_connections_are_closed_at_exit(sink_provider):
    script = (
        "import django; django.setup()\n"
        "from django.core.mail import EmailMessage\n"
        "from kipekee import connections\n"
        "pool = connections.pool_for('primary')\n"
        "conn = pool.checkout()\n"
        "pool.ready(conn).send_messages([EmailMessage('s', 'b', 'a@example.com', ['b@example.com'])])\n"
        "pool.checkin(conn)\n"  # idle in the pool when the interpreter exits
    )
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings",
           "KIPEKEE_TEST_SETTINGS": json.dumps(
               {"ENGINE": None, "PROVIDERS": {"primary": smtp_provider(sink_provider)}})}
    subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, check=True, timeout=60)
    assert len(sink_provider.wait_for(1)) == 1
    wait_until(lambda: sink_provider.commands.get("QUIT", 0) == 1, what="QUIT at exit")
