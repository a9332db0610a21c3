"""Tests of kipekee.testing's SMTP server itself, with the standard library's smtplib
as the client (the same client Kipekee's SMTP backend uses), over real sockets."""

from __future__ import annotations

import select
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from email.message import EmailMessage
from email.utils import make_msgid
from pathlib import Path

import certifi
import pytest

from kipekee.testing import Faults, LocalSMTPServer, ReceivedMessage, self_signed_context
from tests.smtp_fixtures import SMTPServerFactory

# Generous for operations that should succeed; the stall tests use a short one instead.
TIMEOUT = 5.0
SHORT_TIMEOUT = 0.5
SENDER = "sender@kipekee.test"


def make_message(
    subject: str = "Hello", to: tuple[str, ...] = ("bob@example.test",)
) -> EmailMessage:
    message = EmailMessage()
    message["From"] = SENDER
    message["To"] = ", ".join(to)
    message["Subject"] = subject
    message["Message-ID"] = make_msgid(domain="kipekee.test")
    message.set_content("Hello from the tests.\n.a line starting with a dot\n")
    return message


def ipv6_loopback_available() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


def wait_until(condition: Callable[[], bool], timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


# -- delivery ---------------------------------------------------------------------------


def test_plain_delivery_is_recorded_with_envelope_and_headers(smtp_sink: LocalSMTPServer) -> None:
    message = make_message(subject="Plain delivery", to=("bob@example.test", "carol@example.test"))
    with smtplib.SMTP(smtp_sink.host, smtp_sink.port, timeout=TIMEOUT) as client:
        refused = client.send_message(message)

    assert refused == {}
    [received] = smtp_sink.wait_for(1)
    assert received.mail_from == SENDER
    assert received.rcpt_tos == ("bob@example.test", "carol@example.test")
    assert received.subject == "Plain delivery"
    assert received.message_id == message["Message-ID"]
    assert received.tls is False
    assert received.auth_user is None
    assert received.peer[0] == "127.0.0.1"
    # Raw bytes as sent, dot-unstuffed: the body line starting with "." survives.
    assert received.data.startswith(b"From: " + SENDER.encode() + b"\r\n")
    assert received.message.get_content() == "Hello from the tests.\n.a line starting with a dot\n"


def test_wait_for_times_out_with_a_clear_message(smtp_sink: LocalSMTPServer) -> None:
    with smtplib.SMTP(smtp_sink.host, smtp_sink.port, timeout=TIMEOUT) as client:
        client.send_message(make_message(subject="only one"))

    started = time.monotonic()
    with pytest.raises(TimeoutError, match=r"expected at least 2 message\(s\).*got 1.*only one"):
        smtp_sink.wait_for(2, timeout=0.2)
    assert time.monotonic() - started < 2


def test_connections_counts_one_per_session(smtp_sink: LocalSMTPServer) -> None:
    with smtplib.SMTP(smtp_sink.host, smtp_sink.port, timeout=TIMEOUT) as client:
        client.send_message(make_message(subject="first"))
        client.send_message(make_message(subject="second on the same connection"))
    assert smtp_sink.connections == 1

    with smtplib.SMTP(smtp_sink.host, smtp_sink.port, timeout=TIMEOUT) as client:
        client.send_message(make_message(subject="third, new connection"))
    assert smtp_sink.connections == 2
    assert len(smtp_sink.wait_for(3)) == 3

    smtp_sink.clear()
    assert (smtp_sink.connections, smtp_sink.messages) == (0, [])


def test_on_message_sees_each_message_before_it_is_recorded(smtp_server: SMTPServerFactory) -> None:
    seen: list[tuple[str | None, int]] = []
    server: LocalSMTPServer

    def on_message(message: ReceivedMessage) -> None:
        seen.append((message.subject, len(server.messages)))

    server = smtp_server(on_message=on_message)
    with smtplib.SMTP(server.host, server.port, timeout=TIMEOUT) as client:
        client.send_message(make_message(subject="callback"))
    assert seen == [("callback", 0)]
    assert len(server.messages) == 1


def test_on_message_raising_refuses_the_message(smtp_server: SMTPServerFactory) -> None:
    def on_message(message: ReceivedMessage) -> None:
        raise ValueError("storage full")

    server = smtp_server(on_message=on_message)
    with smtplib.SMTP(server.host, server.port, timeout=TIMEOUT) as client:
        with pytest.raises(smtplib.SMTPDataError) as excinfo:
            client.send_message(make_message())
        assert excinfo.value.smtp_code == 500
        assert b"storage full" in excinfo.value.smtp_error
    assert server.messages == []


def test_restart_keeps_the_port(smtp_sink: LocalSMTPServer) -> None:
    port = smtp_sink.port
    smtp_sink.stop()
    with pytest.raises(ConnectionRefusedError):
        smtplib.SMTP(smtp_sink.host, port, timeout=TIMEOUT)

    smtp_sink.start()
    assert smtp_sink.port == port
    with smtplib.SMTP(smtp_sink.host, port, timeout=TIMEOUT) as client:
        client.send_message(make_message(subject="after restart"))
    assert smtp_sink.wait_for(1)[0].subject == "after restart"


@pytest.mark.skipif(not ipv6_loopback_available(), reason="no IPv6 loopback here")
def test_ipv6_loopback_with_verified_starttls(
    smtp_server: SMTPServerFactory, smtp_client_ssl_context: ssl.SSLContext
) -> None:
    server = smtp_server(host="::1", tls="starttls")
    with smtplib.SMTP("::1", server.port, timeout=TIMEOUT) as client:
        # Verifies the trustme certificate's IP SAN ::1 against the host we dialled.
        client.starttls(context=smtp_client_ssl_context)
        client.send_message(make_message(subject="over IPv6"))
    [received] = server.wait_for(1)
    assert received.peer[0] == "::1"
    assert received.tls is True


# -- TLS and AUTH ------------------------------------------------------------------------


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
@pytest.mark.parametrize("initial_response", [True, False], ids=["initial", "challenge"])
def test_starttls_then_auth_with_a_trusted_ca(
    smtp_server: SMTPServerFactory, smtp_ca_file: Path, mechanism: str, initial_response: bool
) -> None:
    server = smtp_server(tls="starttls", auth={"alice": "s3cret"})
    context = ssl.create_default_context(cafile=str(smtp_ca_file))
    with smtplib.SMTP(server.host, server.port, timeout=TIMEOUT) as client:
        client.ehlo()
        # AUTH is only offered once the session is encrypted.
        assert client.has_extn("starttls")
        assert not client.has_extn("auth")
        client.starttls(context=context)
        client.ehlo()
        assert not client.has_extn("starttls")
        assert set(client.esmtp_features["auth"].split()) == {"PLAIN", "LOGIN"}
        client.user, client.password = "alice", "s3cret"
        authobject = getattr(client, f"auth_{mechanism.lower()}")
        code, _ = client.auth(mechanism, authobject, initial_response_ok=initial_response)
        assert code == 235
        client.send_message(make_message(subject=f"AUTH {mechanism}"))

    [received] = server.wait_for(1)
    assert received.tls is True
    assert received.auth_user == "alice"
    assert server.auth_failures == 0


def test_wrong_password_is_refused_and_mail_stays_refused(
    smtp_server: SMTPServerFactory, smtp_client_ssl_context: ssl.SSLContext
) -> None:
    server = smtp_server(tls="starttls", auth={"alice": "s3cret"})
    with smtplib.SMTP(server.host, server.port, timeout=TIMEOUT) as client:
        client.starttls(context=smtp_client_ssl_context)
        with pytest.raises(smtplib.SMTPAuthenticationError) as excinfo:
            client.login("alice", "wrong")
        assert excinfo.value.smtp_code == 535
        with pytest.raises(smtplib.SMTPSenderRefused) as refused:
            client.send_message(make_message())
        assert refused.value.smtp_code == 530
    # smtplib's login() tries each advertised mechanism (PLAIN, then LOGIN) before
    # giving up, so one wrong login() is two refused AUTH commands.
    assert server.auth_failures == 2
    assert server.messages == []


def test_mail_without_auth_is_refused(
    smtp_server: SMTPServerFactory, smtp_client_ssl_context: ssl.SSLContext
) -> None:
    server = smtp_server(tls="starttls", auth={"alice": "s3cret"})
    with smtplib.SMTP(server.host, server.port, timeout=TIMEOUT) as client:
        client.starttls(context=smtp_client_ssl_context)
        with pytest.raises(smtplib.SMTPSenderRefused) as excinfo:
            client.send_message(make_message())
    assert excinfo.value.smtp_code == 530
    assert b"Authentication required" in excinfo.value.smtp_error
    assert server.messages == []


def test_auth_in_clear_is_refused_unless_allowed(smtp_server: SMTPServerFactory) -> None:
    strict = smtp_server(tls="starttls", auth={"alice": "s3cret"})
    with smtplib.SMTP(strict.host, strict.port, timeout=TIMEOUT) as client:
        client.ehlo()
        with pytest.raises(smtplib.SMTPNotSupportedError):
            client.login("alice", "s3cret")  # not advertised before STARTTLS
        # And a client that tries anyway is refused on the wire.
        code, reply = client.docmd("AUTH", "PLAIN AGFsaWNlAHMzY3JldA==")
        assert (code, reply[:10]) == (538, b"5.7.11 Enc")

    lax = smtp_server(auth={"alice": "s3cret"}, auth_require_tls=False)
    with smtplib.SMTP(lax.host, lax.port, timeout=TIMEOUT) as client:
        client.login("alice", "s3cret")
        client.send_message(make_message(subject="auth in clear"))
    [received] = lax.wait_for(1)
    assert (received.tls, received.auth_user) == (False, "alice")


def test_no_auth_configured_means_no_auth_offered(smtp_sink: LocalSMTPServer) -> None:
    with smtplib.SMTP(smtp_sink.host, smtp_sink.port, timeout=TIMEOUT) as client:
        client.ehlo()
        assert not client.has_extn("auth")
        assert client.docmd("AUTH", "PLAIN AGEAYg==")[0] == 502


def test_implicit_tls_with_auth(
    smtp_server: SMTPServerFactory, smtp_client_ssl_context: ssl.SSLContext
) -> None:
    server = smtp_server(tls="ssl", auth={"alice": "s3cret"})
    with smtplib.SMTP_SSL(
        server.host, server.port, context=smtp_client_ssl_context, timeout=TIMEOUT
    ) as client:
        client.ehlo()
        assert not client.has_extn("starttls")
        # AUTH is offered and works: implicit TLS counts as encrypted.
        client.login("alice", "s3cret")
        client.send_message(make_message(subject="implicit TLS"))
    [received] = server.wait_for(1)
    assert (received.tls, received.auth_user) == (True, "alice")


def test_plain_client_cannot_talk_to_the_implicit_tls_port(smtp_server: SMTPServerFactory) -> None:
    server = smtp_server(tls="ssl")
    # The server waits for a TLS ClientHello; a plain client waits for a banner.
    with pytest.raises(smtplib.SMTPServerDisconnected):
        smtplib.SMTP(server.host, server.port, timeout=SHORT_TIMEOUT)


def test_require_starttls_refuses_mail_in_clear(
    smtp_server: SMTPServerFactory, smtp_client_ssl_context: ssl.SSLContext
) -> None:
    server = smtp_server(tls="starttls", require_starttls=True)
    with smtplib.SMTP(server.host, server.port, timeout=TIMEOUT) as client:
        client.ehlo()
        code, reply = client.mail(SENDER)
        assert (code, reply) == (530, b"Must issue a STARTTLS command first")
        client.starttls(context=smtp_client_ssl_context)
        client.send_message(make_message(subject="after STARTTLS"))
    [received] = server.wait_for(1)
    assert received.tls is True


@pytest.mark.parametrize("tls", ["ssl", "starttls"])
def test_self_signed_server_is_refused_by_public_cas_and_accepted_when_trusted(
    smtp_server: SMTPServerFactory, tls: str
) -> None:
    server_context, cert_pem = self_signed_context()
    server = smtp_server(tls=tls, ssl_context=server_context)
    public_cas = ssl.create_default_context(cafile=certifi.where())
    pinned = ssl.create_default_context(cadata=cert_pem.decode())

    def session(context: ssl.SSLContext) -> None:
        if tls == "ssl":
            with smtplib.SMTP_SSL(server.host, server.port, context=context, timeout=TIMEOUT) as c:
                c.send_message(make_message(subject=f"self-signed {tls}"))
        else:
            with smtplib.SMTP(server.host, server.port, timeout=TIMEOUT) as c:
                c.starttls(context=context)
                c.send_message(make_message(subject=f"self-signed {tls}"))

    with pytest.raises(ssl.SSLCertVerificationError, match=r"self.signed certificate"):
        session(public_cas)
    assert server.messages == []

    session(pinned)
    [received] = server.wait_for(1)
    assert received.tls is True
    assert received.subject == f"self-signed {tls}"


# -- faults ------------------------------------------------------------------------------


def test_greeting_fault_raises_connect_error_and_can_be_switched_off(
    smtp_server: SMTPServerFactory,
) -> None:
    faults = Faults(greeting="421 4.3.2 busy, try later")
    server = smtp_server(faults=faults)
    with pytest.raises(smtplib.SMTPConnectError) as excinfo:
        smtplib.SMTP(server.host, server.port, timeout=TIMEOUT)
    assert excinfo.value.smtp_code == 421
    assert excinfo.value.smtp_error == b"4.3.2 busy, try later"

    faults.greeting = None  # read per connection, so this takes effect at once
    with smtplib.SMTP(server.host, server.port, timeout=TIMEOUT) as client:
        client.send_message(make_message())
    assert server.connections == 2
    assert len(server.wait_for(1)) == 1


def test_mail_reply_fault_refuses_the_sender(smtp_server: SMTPServerFactory) -> None:
    server = smtp_server(faults=Faults(mail_reply="451 4.7.1 greylisted, come back later"))
    with smtplib.SMTP(server.host, server.port, timeout=TIMEOUT) as client:
        with pytest.raises(smtplib.SMTPSenderRefused) as excinfo:
            client.send_message(make_message())
        assert excinfo.value.smtp_code == 451
        server.faults.mail_reply = None
        client.send_message(make_message(subject="not greylisted any more"))
    assert [m.subject for m in server.wait_for(1)] == ["not greylisted any more"]


def test_data_fails_k_times_then_succeeds(smtp_sink: LocalSMTPServer) -> None:
    k = 3
    smtp_sink.faults.data_replies = ["451 4.3.0 try again"] * k
    message = make_message(subject="eventually")
    with smtplib.SMTP(smtp_sink.host, smtp_sink.port, timeout=TIMEOUT) as client:
        for _ in range(k):
            with pytest.raises(smtplib.SMTPDataError) as excinfo:
                client.send_message(message)
            assert (excinfo.value.smtp_code, excinfo.value.smtp_error) == (451, b"4.3.0 try again")
            assert smtp_sink.messages == []
        assert client.send_message(message) == {}

    [received] = smtp_sink.wait_for(1)
    assert received.message_id == message["Message-ID"]
    assert smtp_sink.faults.data_replies == []
    assert smtp_sink.connections == 1


def test_one_of_three_recipients_refused(smtp_sink: LocalSMTPServer) -> None:
    smtp_sink.faults.refuse_recipients = {"nobody@example.test": "550 5.1.1 no such user"}
    recipients = ["bob@example.test", "Nobody@Example.test", "carol@example.test"]
    with smtplib.SMTP(smtp_sink.host, smtp_sink.port, timeout=TIMEOUT) as client:
        refused = client.sendmail(SENDER, recipients, make_message().as_bytes())

    # Matched case-insensitively; smtplib reports the address as the client gave it.
    assert refused == {"Nobody@Example.test": (550, b"5.1.1 no such user")}
    [received] = smtp_sink.wait_for(1)
    assert received.rcpt_tos == ("bob@example.test", "carol@example.test")


def test_all_recipients_refused(smtp_sink: LocalSMTPServer) -> None:
    smtp_sink.faults.refuse_recipients = {
        "bob@example.test": "550 5.1.1 no such user",
        "carol@example.test": "450 4.2.1 mailbox busy",
    }
    with (
        smtplib.SMTP(smtp_sink.host, smtp_sink.port, timeout=TIMEOUT) as client,
        pytest.raises(smtplib.SMTPRecipientsRefused) as excinfo,
    ):
        client.sendmail(
            SENDER, ["bob@example.test", "carol@example.test"], make_message().as_bytes()
        )
    assert excinfo.value.recipients == {
        "bob@example.test": (550, b"5.1.1 no such user"),
        "carol@example.test": (450, b"4.2.1 mailbox busy"),
    }
    assert smtp_sink.messages == []


def test_drop_mid_data_disconnects_and_records_nothing(smtp_sink: LocalSMTPServer) -> None:
    smtp_sink.faults.drop_mid_data = True
    client = smtplib.SMTP(smtp_sink.host, smtp_sink.port, timeout=TIMEOUT)
    started = time.monotonic()
    try:
        with pytest.raises(smtplib.SMTPServerDisconnected) as excinfo:
            client.send_message(make_message())
    finally:
        client.close()
    # A drop, not a stall: it comes at once and isn't a client-side timeout.
    assert time.monotonic() - started < TIMEOUT / 2
    assert not isinstance(excinfo.value.__context__, TimeoutError)
    assert smtp_sink.messages == []


def test_stall_after_final_dot_times_the_client_out(smtp_sink: LocalSMTPServer) -> None:
    smtp_sink.faults.stall_before_data_reply = 5.0
    client = smtplib.SMTP(smtp_sink.host, smtp_sink.port, timeout=SHORT_TIMEOUT)
    try:
        # smtplib turns the socket timeout in getreply() into SMTPServerDisconnected;
        # the TimeoutError is its context.
        with pytest.raises(smtplib.SMTPServerDisconnected, match="timed out") as excinfo:
            client.send_message(make_message(subject="reply lost"))
    finally:
        client.close()
    assert isinstance(excinfo.value.__context__, TimeoutError)
    # The server had taken the message: a retry by the client would be a duplicate.
    assert [m.subject for m in smtp_sink.messages] == ["reply lost"]


def test_stall_before_greeting_times_out_the_connect(smtp_sink: LocalSMTPServer) -> None:
    smtp_sink.faults.stall_greeting = 5.0
    started = time.monotonic()
    with pytest.raises(smtplib.SMTPServerDisconnected, match="timed out") as excinfo:
        smtplib.SMTP(smtp_sink.host, smtp_sink.port, timeout=SHORT_TIMEOUT)
    assert isinstance(excinfo.value.__context__, TimeoutError)
    assert time.monotonic() - started < 3
    assert smtp_sink.connections == 1


@pytest.mark.parametrize("tls", ["none", "ssl"])
def test_stop_returns_promptly_while_clients_stall(
    smtp_server: SMTPServerFactory, smtp_client_ssl_context: ssl.SSLContext, tls: str
) -> None:
    server = smtp_server(tls=tls, faults=Faults(stall_before_data_reply=30.0))
    errors: list[BaseException] = []

    def send() -> None:
        try:
            client: smtplib.SMTP
            if tls == "ssl":
                client = smtplib.SMTP_SSL(
                    server.host, server.port, context=smtp_client_ssl_context, timeout=10
                )
            else:
                client = smtplib.SMTP(server.host, server.port, timeout=10)
            with client:
                client.send_message(make_message(subject="stalled"))
        except smtplib.SMTPServerDisconnected as exc:
            errors.append(exc)

    sender = threading.Thread(target=send)
    sender.start()
    server.wait_for(1)  # the server has the message and is now sleeping before its reply
    # And a second client that connects and then says nothing at all (on the TLS port:
    # not even a handshake).
    with socket.create_connection((server.host, server.port), timeout=TIMEOUT) as idle:
        if tls == "none":
            assert idle.recv(1024).startswith(b"220 ")
        else:
            wait_until(lambda: server.connections == 2)  # accepted, waiting for a handshake

        started = time.monotonic()
        server.stop()
        assert time.monotonic() - started < 3

        assert idle.recv(1024) == b""  # the server closed the idle connection
    sender.join(TIMEOUT)
    assert not sender.is_alive()
    assert len(errors) == 1  # the stalled client saw the connection go, not a reply
    assert server.connections == 2


def test_python_m_kipekee_testing_prints_each_message(tmp_path: Path) -> None:
    if sys.platform == "win32":
        pytest.skip("stops the server with SIGINT")
    proc = subprocess.Popen(
        [sys.executable, "-m", "kipekee.testing", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
    )
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 10)
        assert ready, "the server printed nothing within 10 s"
        banner = proc.stdout.readline()
        assert banner.startswith("Kipekee test SMTP server listening on 127.0.0.1 port "), banner
        port = int(banner.split(" port ")[1].split()[0])
        with smtplib.SMTP("127.0.0.1", port, timeout=TIMEOUT) as client:
            client.sendmail(
                SENDER,
                ["bob@example.test", "carol@example.test"],
                make_message(subject="from the CLI test").as_bytes(),
            )
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert out.splitlines() == [
        f"from={SENDER} to=bob@example.test,carol@example.test subject='from the CLI test'"
    ]


def test_constructor_rejects_inconsistent_tls_options() -> None:
    with pytest.raises(ValueError, match="needs a server ssl_context"):
        LocalSMTPServer(tls="starttls")
    with pytest.raises(ValueError, match="require_starttls"):
        LocalSMTPServer(require_starttls=True)


# -- PIPELINING, limits, SMTPUTF8, queue ids, slow links --------------------------------------


def raw_exchange(server: LocalSMTPServer, *writes: bytes, replies: int) -> list[bytes]:
    """Open a session, EHLO, then write each of ``writes`` at once (no waiting between
    them) and read ``replies`` reply lines; return them."""
    with socket.create_connection((server.host, server.port), timeout=TIMEOUT) as sock:
        reader = sock.makefile("rb")
        assert reader.readline().startswith(b"220 ")
        sock.sendall(b"EHLO client.test\r\n")
        while reader.readline()[3:4] == b"-":
            pass
        for data in writes:
            sock.sendall(data)
        return [reader.readline() for _ in range(replies)]


def test_pipelining_is_advertised_and_pipelined_commands_are_answered_in_order(
    smtp_sink: LocalSMTPServer,
) -> None:
    with smtplib.SMTP(smtp_sink.host, smtp_sink.port, timeout=TIMEOUT) as client:
        client.ehlo()
        assert client.has_extn("pipelining")
    envelope = (b"MAIL FROM:<" + SENDER.encode() + b">\r\nRCPT TO:<bob@example.test>\r\n"
                b"RCPT TO:<carol@example.test>\r\nDATA\r\n")
    replies = raw_exchange(smtp_sink, envelope, replies=4)
    assert [r[:3] for r in replies] == [b"250", b"250", b"250", b"354"]
    assert smtp_sink.command_groups[-1] == ("MAIL", "RCPT", "RCPT", "DATA")


def test_command_groups_show_a_client_that_waits_for_each_reply(smtp_sink: LocalSMTPServer) -> None:
    with smtplib.SMTP(smtp_sink.host, smtp_sink.port, timeout=TIMEOUT) as client:
        client.sendmail(SENDER, ["bob@example.test", "carol@example.test"],
                        make_message().as_bytes())
    assert smtp_sink.command_groups == [("EHLO",), ("MAIL",), ("RCPT",), ("RCPT",), ("DATA",),
                                        ("QUIT",)]
    smtp_sink.clear()
    assert smtp_sink.command_groups == []


def test_pipelining_can_be_switched_off(smtp_server: SMTPServerFactory) -> None:
    server = smtp_server(pipelining=False)
    with smtplib.SMTP(server.host, server.port, timeout=TIMEOUT) as client:
        client.ehlo()
        assert not client.has_extn("pipelining")


def test_recipient_limit_answers_452_per_transaction(smtp_server: SMTPServerFactory) -> None:
    server = smtp_server(max_recipients=2)
    recipients = ["a@example.test", "b@example.test", "c@example.test"]
    with smtplib.SMTP(server.host, server.port, timeout=TIMEOUT) as client:
        refused = client.sendmail(SENDER, recipients, make_message().as_bytes())
        assert refused == {"c@example.test": (452, b"4.5.3 Error: too many recipients")}
        # The limit is per transaction: the next one takes two again.
        assert client.sendmail(SENDER, ["c@example.test"], make_message().as_bytes()) == {}
    assert [m.rcpt_tos for m in server.wait_for(2)] == [("a@example.test", "b@example.test"),
                                                       ("c@example.test",)]


def test_each_data_reply_carries_the_queue_id_it_records(smtp_sink: LocalSMTPServer) -> None:
    with smtplib.SMTP(smtp_sink.host, smtp_sink.port, timeout=TIMEOUT) as client:
        client.ehlo()
        client.mail(SENDER)
        client.rcpt("bob@example.test")
        code, reply = client.data(make_message().as_bytes())
    [received] = smtp_sink.wait_for(1)
    assert code == 250 and received.queue_id
    assert reply == f"2.0.0 Ok: queued as {received.queue_id}".encode()
    smtp_sink.faults.data_replies = ["250 OK"]
    with smtplib.SMTP(smtp_sink.host, smtp_sink.port, timeout=TIMEOUT) as client:
        client.sendmail(SENDER, ["bob@example.test"], make_message().as_bytes())
    assert smtp_sink.wait_for(2)[1].queue_id == ""


@pytest.mark.parametrize("offered", [True, False])
def test_smtputf8_on_and_off(smtp_server: SMTPServerFactory, offered: bool) -> None:
    server = smtp_server(smtputf8=offered)
    with smtplib.SMTP(server.host, server.port, timeout=TIMEOUT) as client:
        client.ehlo()
        assert client.has_extn("smtputf8") is offered
        if offered:
            client.sendmail(SENDER, ["jörg@example.test"], make_message().as_bytes(),
                            mail_options=["SMTPUTF8"])
        else:
            with pytest.raises(smtplib.SMTPNotSupportedError):
                client.sendmail(SENDER, ["jörg@example.test"], make_message().as_bytes(),
                                mail_options=["SMTPUTF8"])
            # A client that sends UTF-8 anyway is answered 500.
            client.command_encoding = "utf-8"
            assert client.docmd("RCPT", "TO:<jörg@example.test>")[0] == 500
    if offered:
        [received] = server.wait_for(1)
        assert received.rcpt_tos == ("jörg@example.test",) and "SMTPUTF8" in received.mail_options


def test_read_rate_holds_the_client_back(smtp_sink: LocalSMTPServer) -> None:
    # 600 kB at 1 MB/s: the reply to the final dot cannot come before the server has
    # read it all, whatever the socket buffers took at once.
    smtp_sink.faults.read_rate = 1_000_000
    body = b"x" * 76 + b"\r\n"
    data = make_message().as_bytes().replace(b"\n", b"\r\n") + body * 7_700
    started = time.monotonic()
    with smtplib.SMTP(smtp_sink.host, smtp_sink.port, timeout=TIMEOUT) as client:
        client.sendmail(SENDER, ["bob@example.test"], data)
    assert time.monotonic() - started >= 0.5
    assert len(smtp_sink.wait_for(1)[0].data) >= 600_000


def test_reply_latency_delays_each_reply_but_not_the_server(smtp_sink: LocalSMTPServer) -> None:
    latency = 0.3
    smtp_sink.faults.reply_latency = latency
    envelope = (b"MAIL FROM:<" + SENDER.encode() + b">\r\nRCPT TO:<bob@example.test>\r\n"
                b"DATA\r\n")
    started = time.monotonic()
    with socket.create_connection((smtp_sink.host, smtp_sink.port), timeout=TIMEOUT) as sock:
        reader = sock.makefile("rb")
        assert reader.readline().startswith(b"220 ")  # the banner is a reply too
        assert time.monotonic() - started >= latency
        sock.sendall(b"EHLO client.test\r\n")
        while reader.readline()[3:4] == b"-":
            pass
        started = time.monotonic()
        sock.sendall(envelope)
        replies = [reader.readline()[:3] for _ in range(3)]
        # Three pipelined commands: one latency for all their replies.
        elapsed = time.monotonic() - started
        assert replies == [b"250", b"250", b"354"]
        assert latency <= elapsed < 2 * latency
        sock.sendall(make_message().as_bytes().replace(b"\n", b"\r\n") + b".\r\n")
        assert reader.readline().startswith(b"250 ")
        sock.sendall(b"QUIT\r\n")
        assert reader.readline().startswith(b"221 ")  # delivered before the session ends
    assert len(smtp_sink.wait_for(1)) == 1


def test_chunking_bdat_in_chunks_and_refused_without_a_transaction(
    smtp_server: SMTPServerFactory,
) -> None:
    server = smtp_server(chunking=True)
    with smtplib.SMTP(server.host, server.port, timeout=TIMEOUT) as client:
        client.ehlo()
        assert client.has_extn("chunking")
    data = make_message().as_bytes().replace(b"\n", b"\r\n")
    half = len(data) // 2
    replies = raw_exchange(
        server,
        # Without a transaction the chunk is read all the same, then refused.
        b"BDAT 5 LAST\r\nhello",
        b"MAIL FROM:<" + SENDER.encode() + b">\r\nRCPT TO:<bob@example.test>\r\n"
        + b"BDAT %d\r\n" % half + data[:half] + b"BDAT %d LAST\r\n" % (len(data) - half)
        + data[half:],
        replies=5,
    )
    assert [r[:3] for r in replies] == [b"503", b"250", b"250", b"250", b"250"]
    [received] = server.wait_for(1)
    assert received.data == data and replies[-1].rstrip().endswith(received.queue_id.encode())
    assert server.command_groups[-1] == ("MAIL", "RCPT", "BDAT", "BDAT")


def test_bdat_is_unknown_unless_chunking_is_offered(smtp_sink: LocalSMTPServer) -> None:
    with smtplib.SMTP(smtp_sink.host, smtp_sink.port, timeout=TIMEOUT) as client:
        client.ehlo()
        assert not client.has_extn("chunking")
        assert client.docmd("BDAT", "0 LAST")[0] == 500
