"""Reliability and security suite, in-process: outbox atomicity, a worker slower than its
lease, network faults between Kipekee and the SMTP server, hostile input and secrets.

Everything runs against real parts: a real SMTP server on loopback (kipekee.testing), the
real database of the pass (SQLite or PostgreSQL), Kipekee's own sender loop. Each test
records its figures for the table printed at the end of the run (tests/reliability_report.py;
``python bench/reliability.py`` prints it for both databases).
"""

from __future__ import annotations

import base64
import logging
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.smtp import AuthResult, LoginPassword
from django.core.mail.backends.base import BaseEmailBackend
from django.db import transaction
from django.utils import timezone

import kipekee
from kipekee import conf
from kipekee.engines import Sender, Stats
from kipekee.exceptions import ConfigurationError, InvalidMessage
from kipekee.models import Attempt, ErrorKind, OutboxEmail, Status
from kipekee.providers import build
from kipekee.testing import Faults, LocalSMTPServer

from .conftest import smtp_provider, subprocess_env

pytestmark = [pytest.mark.reliability, pytest.mark.django_db(transaction=True)]

# Nothing in these depends on the database: the PostgreSQL pass of make test skips them
# (tests/reliability_report.py), bench/reliability.py runs them there too.
db_agnostic = pytest.mark.reliability(db_agnostic=True)

MAIL = {"text": "thanks", "to": ["ann@example.com"]}
# Many deliberate transient failures in a row must not open the circuit breaker and
# turn the next attempts into "circuit open" deferrals without touching the server.
NO_BREAKER = {"CIRCUIT_BREAKER": {"FAILURES": 1000}}


def figures(server: LocalSMTPServer, expected: Iterable[str]) -> tuple[int, int, int]:
    """(delivered, lost, duplicated) of the expected Message-IDs at ``server``."""
    received = Counter(m.message_id for m in server.messages)
    expected = set(expected)
    delivered = sum(1 for mid in expected if received[mid])
    duplicated = sum(c - 1 for mid, c in received.items() if mid in expected and c > 1)
    return delivered, len(expected) - delivered, duplicated


def drain(engine: str = "test") -> None:
    """Run one sender until nothing is due."""
    sender = Sender(engine=engine, batch_size=50, stats=Stats())
    try:
        while sender.run_once():
            pass
    finally:
        sender.deliverer.close()


@contextmanager
def one_row_worker(name: str, kipekee_settings: dict[str, Any]
                   ) -> Iterator[tuple[subprocess.Popen[str], list[str]]]:
    """A ``kipekee_worker --once`` process taking one row at a time; killed if still
    running at the end of the block, its output then in the list."""
    output: list[str] = []
    with tempfile.TemporaryFile(mode="w+") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "django", "kipekee_worker", "--once", "--concurrency", "1",
             "--batch-size", "1", "--name", name],
            cwd=Path(__file__).resolve().parent.parent, env=subprocess_env(kipekee_settings),
            stdout=log, stderr=subprocess.STDOUT, text=True)
        try:
            yield proc, output
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.seek(0)
            output.append(log.read())


def make_due() -> None:
    """Advance the clock for waiting rows: what is deferred is due now."""
    OutboxEmail.objects.filter(status=Status.DEFERRED).update(
        due_at=timezone.now() - timedelta(seconds=1))


def queue(n: int, **kwargs: Any) -> list[str]:
    return [kipekee.send(**{**MAIL, "subject": f"Order {i}", **kwargs}, mode="queue").message_id
            for i in range(n)]


# --- outbox atomicity ------------------------------------------------------------------


class _Rollback(Exception):
    pass


def test_random_rollbacks_deliver_exactly_the_committed(smtp_sink, kipekee_settings, scenario):
    """Transactions that enqueue (in every mode) and then commit, roll back, or roll back
    only a savepoint: exactly the committed emails go out, each once."""
    kipekee_settings(primary=smtp_provider(smtp_sink))
    rng = random.Random(20261123)
    committed: set[str] = set()
    rolled_back: set[str] = set()
    n = 40
    for i in range(n):
        mode = rng.choice(["now", "hybrid", "queue"])
        fate = rng.choice(["commit", "rollback", "savepoint"])
        try:
            with transaction.atomic():
                kept = kipekee.send(**MAIL, subject=f"Kept {i}", mode=mode)
                try:
                    with transaction.atomic():
                        inner = kipekee.send(**MAIL, subject=f"Inner {i}", mode=mode)
                        if fate == "savepoint":
                            raise _Rollback
                except _Rollback:
                    rolled_back.add(inner.message_id)
                else:
                    committed.add(inner.message_id)
                if fate == "rollback":
                    raise _Rollback
        except _Rollback:
            rolled_back.add(kept.message_id)
            if fate == "rollback":
                rolled_back.add(inner.message_id)
                committed.discard(inner.message_id)
        else:
            committed.add(kept.message_id)
    drain()
    received = Counter(m.message_id for m in smtp_sink.messages)
    assert not set(received) & rolled_back  # a rollback never delivers
    assert set(received) == committed and max(received.values()) == 1
    assert set(OutboxEmail.objects.values_list("message_id", flat=True)) == committed
    assert not OutboxEmail.objects.exclude(status=Status.SENT).exists()
    delivered, lost, duplicated = figures(smtp_sink, committed)
    scenario.record("outbox atomicity, random rollbacks", load=f"{2 * n} enqueued in {n} txns",
                    faults=f"{len(rolled_back)} rolled back (txn or savepoint)",
                    delivered=delivered, lost=lost, duplicated=duplicated)


# --- a worker slower than its lease ----------------------------------------------------


def test_worker_slower_than_its_lease_is_fenced(smtp_server, kipekee_settings, settings,
                                                scenario):
    """Engine A's send outlasts its lease without renewing it (its process is frozen:
    SIGSTOP stands in for a VM paused, a swap storm, a database it cannot reach); engine
    B reclaims and sends; A's late result is not recorded (fenced by the attempt
    number). A live engine renews its leases while it sends (tests/test_engines_pg.py)."""
    accepted = threading.Event()
    slow = smtp_server(faults=Faults(stall_before_data_reply=2.5),
                       on_message=lambda m: accepted.set())
    kipekee_settings(primary=smtp_provider(slow, timeout=10), _extra={"LEASE_SECONDS": 1})
    [message_id] = queue(1)
    with one_row_worker("slow-a", settings.KIPEKEE) as (engine_a, log):
        assert accepted.wait(20)  # the server has A's copy and holds its reply
        engine_a.send_signal(signal.SIGSTOP)
        row = OutboxEmail.objects.get()
        while timezone.now() <= row.lease_until:  # A's lease runs out while it is frozen
            time.sleep(0.05)
            row.refresh_from_db()
        slow.faults.stall_before_data_reply = 0  # the server is already stalling A
        drain("fast-b")
        engine_a.send_signal(signal.SIGCONT)
        assert engine_a.wait(20) == 0
    [output] = log
    row.refresh_from_db()
    assert row.status == Status.SENT and row.attempts == 2, output
    # One attempt row: B's. A's late success was fenced off, not recorded over it.
    assert list(Attempt.objects.values_list("number", "outcome")) == [(2, "sent")]
    assert "Result of attempt 1" in output and "not recorded" in output, output
    assert "slow-a stopped: sent=0 deferred=0 failed=0" in output, output
    copies = [m.message_id for m in slow.messages]
    assert copies == [message_id, message_id]  # the one extra copy, same Message-ID
    delivered, lost, duplicated = figures(slow, [message_id])
    scenario.record("worker slower than its lease", load="1 message, lease 1 s",
                    faults="worker frozen while the server holds its DATA reply 2.5 s",
                    delivered=delivered, lost=lost, duplicated=duplicated)


# --- network faults between Kipekee and the SMTP server --------------------------------


@db_agnostic
def test_reset_mid_data_defers_then_delivers_once(smtp_server, kipekee_settings, scenario):
    server = smtp_server(faults=Faults(drop_mid_data=True))
    kipekee_settings(primary=smtp_provider(server), _extra=NO_BREAKER)
    ids = queue(10)
    drain()
    rows = OutboxEmail.objects.all()
    assert {r.status for r in rows} == {Status.DEFERRED} and server.messages == []
    assert all(r.error_kind == ErrorKind.TRANSIENT for r in rows)
    assert all("disconnect" in r.last_error or "reset" in r.last_error.lower() for r in rows), [
        r.last_error for r in rows]
    server.faults.drop_mid_data = False
    make_due()
    drain()
    assert set(OutboxEmail.objects.values_list("status", flat=True)) == {Status.SENT}
    delivered, lost, duplicated = figures(server, ids)
    assert (delivered, lost, duplicated) == (10, 0, 0)
    scenario.record("connection reset mid-DATA", load="10 messages",
                    faults="10 connections aborted after 354", delivered=delivered, lost=lost,
                    duplicated=duplicated)


def test_a_reply_after_the_final_dot_later_than_the_timeout_is_waited_for(
        smtp_server, kipekee_settings, settings, scenario):
    """Issue 17 (item 15, and the soak's "reply lost after acceptance" copies): the
    server takes the message and answers 2.5 s after the final dot, past the client's 1 s
    timeout. Before, the worker gave up at 1 s and the mail went out again later: two
    copies. Now it waits ``final_reply_timeout`` (RFC 5321's 10 minutes) for that reply,
    renewing the row's lease meanwhile (a second engine polling past the first lease
    takes nothing): one copy, the row ``sent`` after one attempt."""
    accepted = threading.Event()
    server = smtp_server(faults=Faults(stall_before_data_reply=2.5),
                         on_message=lambda m: accepted.set())
    kipekee_settings(primary=smtp_provider(server, timeout=1),
                     _extra={**NO_BREAKER, "LEASE_SECONDS": 1})
    [message_id] = queue(1)
    with one_row_worker("patient-a", settings.KIPEKEE) as (engine_a, log):
        assert accepted.wait(20)  # the server has the message and holds its reply
        time.sleep(1.2)  # past the lease A took: A renews it while it waits
        drain("fast-b")  # finds nothing due (the row is A's)
        assert engine_a.wait(20) == 0
    [output] = log
    row = OutboxEmail.objects.get()
    assert (row.status, row.attempts, row.claims) == (Status.SENT, 1, 1), (row.last_error, output)
    assert [m.message_id for m in server.messages] == [message_id]
    delivered, lost, duplicated = figures(server, [message_id])
    scenario.record("reply 2.5 s after the final dot", load="1 message, lease 1 s",
                    faults="DATA reply stalled past the 1 s timeout, a second engine polling",
                    delivered=delivered, lost=lost, duplicated=duplicated)


@db_agnostic
def test_no_reply_after_final_dot_resends_with_the_same_message_id(smtp_server, kipekee_settings,
                                                                  scenario):
    """The server takes the message but its reply never arrives within
    ``final_reply_timeout``: Kipekee cannot know, retries, and the recipient may get one
    extra copy with the same Message-ID (which lets their mail client fold it)."""
    # A client timeout well above what a busy machine needs for the other replies.
    server = smtp_server(faults=Faults(stall_before_data_reply=2.5))
    kipekee_settings(primary=smtp_provider(server, timeout=1, final_reply_timeout=1),
                     _extra=NO_BREAKER)
    ids = queue(3)
    drain()
    rows = OutboxEmail.objects.all()
    assert {r.status for r in rows} == {Status.DEFERRED}
    assert all("timed out" in r.last_error for r in rows), [r.last_error for r in rows]
    assert len(server.messages) == 3  # … yet the server has them
    server.faults.stall_before_data_reply = 0
    make_due()
    drain()
    assert set(OutboxEmail.objects.values_list("status", flat=True)) == {Status.SENT}
    received = Counter(m.message_id for m in server.messages)
    assert received == Counter({mid: 2 for mid in ids})  # at most one extra, same Message-ID
    delivered, lost, duplicated = figures(server, ids)
    scenario.record("no reply after the final dot", load="3 messages",
                    faults="reply stalled 2.5 s, final_reply_timeout 1 s", delivered=delivered,
                    lost=lost, duplicated=duplicated)


@db_agnostic
def test_slow_trickle_still_delivers(smtp_server, kipekee_settings, scenario):
    """Every reply arrives one byte at a time, each within the read timeout."""
    server = smtp_server(faults=Faults(trickle_replies=0.003))
    kipekee_settings(primary=smtp_provider(server, timeout=2))
    ids = queue(3)
    drain()
    assert set(OutboxEmail.objects.values_list("status", flat=True)) == {Status.SENT}
    assert set(OutboxEmail.objects.values_list("attempts", flat=True)) == {1}
    delivered, lost, duplicated = figures(server, ids)
    assert (delivered, lost, duplicated) == (3, 0, 0)
    scenario.record("slow trickle of replies", load="3 messages",
                    faults="every reply byte 3 ms apart", delivered=delivered, lost=lost,
                    duplicated=duplicated)


@db_agnostic
def test_starttls_stripped_refuses_to_send_in_clear(smtp_server, kipekee_settings, smtp_ca_file,
                                                    scenario):
    """A server (or a man in the middle) that does not offer STARTTLS to a provider that
    requires it: nothing is sent in clear, the row says why."""
    server = smtp_server(tls="none")
    kipekee_settings(primary=smtp_provider(server, use_tls=True, ca_file=str(smtp_ca_file),
                                           username="ann", password="not-in-clear-pw"))
    receipt = kipekee.send(**MAIL, subject="Reset your password", mode="hybrid")
    row = OutboxEmail.objects.get(pk=receipt.id)
    assert server.messages == [] and server.auth_failures == 0
    assert row.status == Status.DEFERRED and row.error_kind == ErrorKind.CONFIGURATION
    assert "STARTTLS" in row.last_error
    scenario.record("STARTTLS stripped, TLS required", load="1 message",
                    faults="no STARTTLS in EHLO", delivered=0, lost=0, duplicated=0)


@db_agnostic
def test_tls_is_verified_by_default(smtp_server, kipekee_settings, scenario):
    """No ca_file: the server's private-CA certificate is not trusted, nothing is sent."""
    server = smtp_server(tls="starttls", require_starttls=True)
    kipekee_settings(primary=smtp_provider(server, use_tls=True))
    receipt = kipekee.send(**MAIL, subject="Hello", mode="hybrid")
    row = OutboxEmail.objects.get(pk=receipt.id)
    assert server.messages == []
    assert row.error_kind == ErrorKind.CONFIGURATION and "not trusted" in row.last_error
    scenario.record("TLS verification on by default", load="1 message",
                    faults="certificate from an untrusted CA", delivered=0, lost=0, duplicated=0)


# --- hostile input -----------------------------------------------------------------------


BREAKS = ["\r\n", "\n", "\r", "\v", "\f", "\x1c", "\x85", "\u2028", "\u2029"]
INJECTION = "Bcc: victim@evil.example"


def _injections(brk: str) -> dict[str, Callable[[], Any]]:
    evil = f"x{brk}{INJECTION}"
    return {
        "subject": lambda: kipekee.send(**MAIL, subject=evil),
        "display name": lambda: kipekee.send(subject="s", text="t", to=[f'"{evil}" <ann@example.com>']),
        "address": lambda: kipekee.send(subject="s", text="t", to=[f"ann@example.com{brk}{INJECTION}"]),
        "from": lambda: kipekee.send(**MAIL, subject="s", from_email=f"Shop{brk}{INJECTION} <s@example.com>"),
        "reply-to": lambda: kipekee.send(**MAIL, subject="s", reply_to=[f"r@example.com{brk}{INJECTION}"]),
        "cc": lambda: kipekee.send(**MAIL, subject="s", cc=[f"c@example.com{brk}{INJECTION}"]),
        "custom header value": lambda: kipekee.send(**MAIL, subject="s", headers={"X-Order": evil}),
        "custom header name": lambda: kipekee.send(**MAIL, subject="s", headers={f"X-A{brk}Bcc": "v"}),
        "attachment filename": lambda: kipekee.send(**MAIL, subject="s",
                                                    attachments=[(f"a{brk}{INJECTION}.txt", b"x", "text/plain")]),
        "attachment type": lambda: kipekee.send(**MAIL, subject="s",
                                                attachments=[("a.txt", b"x", f"text/plain{brk}{INJECTION}")]),
        "template context": lambda: kipekee.send("emails/reliability/hostile", to=["ann@example.com"],
                                                 context={"name": evil}),
    }


@db_agnostic
def test_header_injection_is_refused_at_the_call_site(sink_provider, scenario):
    tried = 0
    for brk in BREAKS:
        for field, attempt in _injections(brk).items():
            tried += 1
            with pytest.raises(InvalidMessage):
                attempt()
                pytest.fail(f"{field} with {brk!r} accepted")
    assert OutboxEmail.objects.count() == 0 and sink_provider.messages == []
    scenario.record("header injection, every header field", load=f"{tried} attempts",
                    faults=f"{len(BREAKS)} kinds of line break x 11 fields", delivered=0,
                    lost=0, duplicated=0)


@db_agnostic
def test_malformed_and_oversized_attachments(smtp_server, kipekee_settings, scenario):
    server = smtp_server(data_size_limit=100_000)
    kipekee_settings(primary=smtp_provider(server))
    for bad in [("a.txt", 12345, "text/plain"), ("a.txt", b"x", "a b/c"), ("a.txt", b"x", "/")]:
        with pytest.raises(InvalidMessage):
            kipekee.send(**MAIL, subject="s", attachments=[bad])
    assert OutboxEmail.objects.count() == 0
    # Awkward but valid: delivered byte for byte.
    blob = bytes(range(256)) * 4
    ok = kipekee.send(**MAIL, subject="odd files", mode="hybrid", attachments=[
        ("../../etc/passwd", blob, "text/plain"), ("empty.bin", b"", None),
        ("Zoë's “report”.pdf", b"%PDF-1.4", "application/pdf")])
    assert ok.sent
    [message] = server.messages
    parts = {p.get_filename(): p.get_payload(decode=True) for p in message.message.iter_attachments()}
    assert parts == {"../../etc/passwd": blob, "empty.bin": b"", "Zoë's “report”.pdf": b"%PDF-1.4"}
    # Larger than the server's SIZE: refused before DATA, failed at once, with the reason.
    big = kipekee.send(**MAIL, subject="big", mode="hybrid",
                       attachments=[("big.bin", random.randbytes(200_000), None)])
    row = OutboxEmail.objects.get(pk=big.id)
    assert row.status == Status.FAILED and row.error_kind == ErrorKind.PERMANENT
    assert "552" in row.last_error and row.attempts == 1
    assert len(server.messages) == 1
    scenario.record("malformed and oversized attachments", load="5: 3 refused, 1 sent, 1 too big",
                    faults="bad content/type; 200 kB over a 100 kB SIZE", delivered=1, lost=0,
                    duplicated=0)


@db_agnostic
def test_idn_and_non_ascii_addresses(sink_provider, scenario):
    receipt = kipekee.send(subject="Grüße", text="hallo", mode="hybrid",
                           to=["Zoë Müller <zoe@bücher.example>"], from_email="Läden <shop@exämple.com>")
    assert receipt.sent
    [message] = sink_provider.messages
    assert message.rcpt_tos == ("zoe@xn--bcher-kva.example",)  # IDNA on the envelope
    assert message.mail_from == "shop@xn--exmple-cua.com"
    parsed = message.message
    assert parsed["To"].addresses[0].display_name == "Zoë Müller"
    assert parsed["To"].addresses[0].domain == "xn--bcher-kva.example"
    assert str(parsed["Subject"]) == "Grüße"
    # A non-ASCII local part is a valid address (RFC 6531) and is accepted into the
    # outbox; on the wire it needs SMTPUTF8. Either the backend sends it with SMTPUTF8 (the
    # sink offers it), or it refuses it before MAIL FROM with the reason on the row:
    # never lost, never mangled into an encoded-word.
    receipt = kipekee.send(subject="s", text="t", to=["jöran@example.com"])
    assert OutboxEmail.objects.count() == 2
    if receipt.sent:
        assert sink_provider.messages[1].rcpt_tos == ("jöran@example.com",)
    else:
        assert receipt.failed and "non-ASCII" in receipt.error, receipt
    scenario.record("IDN and non-ASCII addresses", load="2: 1 sent, 1 non-ASCII local part",
                    faults="IDN domains; non-ASCII local part (SMTPUTF8 or refused before "
                           "MAIL FROM)", delivered=1 + receipt.sent, lost=0, duplicated=0)


@db_agnostic
def test_script_in_template_context_is_escaped_in_mail_and_admin(sink_provider, admin_client,
                                                                 scenario):
    script = "<script>alert('owned')</script>"
    receipt = kipekee.send("emails/reliability/hostile", to=["ann@example.com"],
                           context={"name": script}, mode="hybrid")
    assert receipt.sent
    message = sink_provider.messages[0].message
    html = message.get_body(("html",)).get_content()
    text = message.get_body(("plain",)).get_content()
    assert script not in html and "&lt;script&gt;alert(&#x27;owned&#x27;)&lt;/script&gt;" in html
    assert script in text  # plain text is not HTML: shown as typed, nothing to run
    for url in ("/admin/kipekee/outboxemail/", f"/admin/kipekee/outboxemail/{receipt.id}/change/"):
        response = admin_client.get(url)
        assert response.status_code == 200
        assert b"<script>alert(" not in response.content
    assert b"&lt;script&gt;alert(" in response.content
    scenario.record("<script> in template context", load="1 message",
                    faults="script tag in a context value", delivered=1, lost=0, duplicated=0)


# --- secrets -----------------------------------------------------------------------------

SECRET = "s3cr3t-Hunter2-pw"


class EchoingAuthServer(LocalSMTPServer):
    """A hostile server whose 535 reply echoes the credentials it was sent, in clear and
    as the AUTH PLAIN blob (real servers have leaked them this way in logs)."""

    def _authenticate(self, server: Any, session: Any, envelope: Any, mechanism: str,
                      auth_data: Any) -> AuthResult:
        assert isinstance(auth_data, LoginPassword)
        user, password = auth_data.login.decode(), auth_data.password.decode()
        blob = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
        self._auth_failures += 1
        return AuthResult(success=False, handled=False,
                          message=f"535 5.7.8 bad credentials {user}:{password} ({blob})")


def _forms(secret: str, user: str = "ann") -> list[str]:
    return [secret, base64.b64encode(secret.encode()).decode(),
            base64.b64encode(f"\0{user}\0{secret}".encode()).decode()]


@db_agnostic
def test_credentials_echoed_by_the_server_are_redacted(kipekee_settings, server_ssl_context,
                                                       smtp_ca_file, caplog, scenario):
    with EchoingAuthServer(tls="starttls", ssl_context=server_ssl_context,
                           auth={"ann": "the-right-one"}) as server:
        kipekee_settings(primary=smtp_provider(server, use_tls=True, ca_file=str(smtp_ca_file),
                                               username="ann", password=SECRET))
        with caplog.at_level(logging.DEBUG):
            receipt = kipekee.send(**MAIL, subject="s", mode="hybrid")
    assert server.auth_failures >= 1 and server.messages == []
    row = OutboxEmail.objects.get(pk=receipt.id)
    assert row.error_kind == ErrorKind.CONFIGURATION
    assert "535" in row.last_error and "[redacted]" in row.last_error  # echoed, then redacted
    # Kipekee's own log lines (the test server's debug log of its own replies is not ours).
    ours = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("kipekee"))
    assert "[redacted]" in ours
    recorded = [row.last_error, receipt.error, repr(receipt), ours,
                *Attempt.objects.values_list("error", flat=True), repr(conf.get())]
    for form in _forms(SECRET):
        for text in recorded:
            assert form not in text
    scenario.record("secrets echoed in a 535 reply", load="1 message",
                    faults="server echoes user:password and AUTH PLAIN blob", delivered=0,
                    lost=0, duplicated=0)


class LeakyBackend(BaseEmailBackend):
    """A third-party backend that puts its options, API key included, in its errors."""

    def __init__(self, *, api_key: str = "", region: str = "", **kwargs: Any) -> None:
        if region not in {"eu", "us"}:
            raise ValueError(f"bad region {region!r} in options {{'api_key': {api_key!r}}}")
        super().__init__(**kwargs)


@db_agnostic
def test_provider_options_stay_out_of_configuration_errors(kipekee_settings, caplog, scenario):
    kipekee_settings(leaky={"BACKEND": f"{__name__}.LeakyBackend",
                            "OPTIONS": {"api_key": SECRET, "region": "mars"}})
    with pytest.raises(ConfigurationError) as raised:
        build("leaky")
    assert "mars" in str(raised.value) and "[redacted]" in str(raised.value)
    assert raised.value.__cause__ is None and raised.value.__suppress_context__
    with caplog.at_level(logging.DEBUG):
        receipt = kipekee.send(**MAIL, subject="s", mode="hybrid")
    row = OutboxEmail.objects.get(pk=receipt.id)
    assert "mars" in row.last_error
    for text in [str(raised.value), row.last_error, caplog.text, repr(conf.get()),
                 *Attempt.objects.values_list("error", flat=True)]:
        assert SECRET not in text
    scenario.record("secrets in provider options", load="1 message",
                    faults="backend error carrying its api_key", delivered=0, lost=0,
                    duplicated=0)


@db_agnostic
def test_no_secrets_in_shipped_settings_and_docs(scenario):
    """Every ``password``/``api_key`` set in the README, the design notes and the demo comes
    from the environment (or is a ``...`` placeholder), never a literal."""
    import re

    root = Path(__file__).resolve().parent.parent
    files = [root / "README.md", *root.glob("demo/**/*.py"), *root.glob("bench/**/*.md"),
             *root.glob("src/kipekee/**/*.py")]
    assignment = re.compile(r"""["'](password|api_key|token|secret)["']\s*[:=]\s*([^,}\n]+)""", re.I)
    checked = 0
    for path in files:
        for match in assignment.finditer(path.read_text()):
            checked += 1
            value = match[2].strip()
            # A string literal is a secret in the source unless it is empty or a
            # placeholder; expressions (os.environ[...], a parsed environment URL) are not.
            literal = value[:1] in {'"', "'"}
            assert not literal or value in {'""', "''", '"..."', "'...'"}, (
                f"{path.relative_to(root)}: {match[0]}")
    assert checked >= 1  # the README's example was found and checked
    scenario.record("no secrets in settings and docs", load=f"{len(files)} files",
                    faults="-", delivered="-", lost="-", duplicated="-")
