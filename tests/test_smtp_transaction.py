"""How one message crosses the wire through Kipekee's SMTP backend, against the real test
server: PIPELINING (RFC 2920), the recipient limit of a transaction (RFC 5321 4.5.3.1.10),
slow readers and the inactivity timeout, deadlines, SMTPUTF8 (RFC 6531), TLS session
resumption and the queue id of the DATA reply."""

from __future__ import annotations

import re
import smtplib
import time
from collections import Counter
from typing import Any

import pytest
from django.core.mail import EmailMessage
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

import kipekee
from kipekee import deadlines, outbox
from kipekee.backends import smtp_client
from kipekee.backends.smtp import EmailBackend
from kipekee.delivery import Deliverer
from kipekee.engines.worker import Worker
from kipekee.models import ErrorKind, OutboxEmail, ProviderMessage, Status
from kipekee.testing import Faults, LocalSMTPServer

from .conftest import smtp_provider

SENDER = "shop@example.com"
db = pytest.mark.django_db(transaction=True)


def backend_for(server: LocalSMTPServer, **options: Any) -> EmailBackend:
    return EmailBackend(**{"host": server.host, "port": server.port, "timeout": 2, **options})


def mail(to: list[str], subject: str = "Hello", **kwargs: Any) -> EmailMessage:
    return EmailMessage(subject, "Hello there.\n.a line that starts with a dot\n", SENDER, to,
                        **kwargs)


# The four ways a transaction can cross the wire, by what the server offers.
WIRES = {
    "pipelined": {"pipelining": True},
    "one-by-one": {"pipelining": False},
    "chunked": {"pipelining": True, "chunking": True},
    "chunked-one-by-one": {"pipelining": False, "chunking": True},
}
wires = pytest.mark.parametrize("wire", WIRES.values(), ids=WIRES.keys())


def transaction_groups(server: LocalSMTPServer) -> list[tuple[str, ...]]:
    """The command groups of the server, without the session's opening and closing."""
    return [g for g in server.command_groups if g[0] not in {"EHLO", "HELO", "QUIT", "NOOP",
                                                               "STARTTLS", "AUTH", "RSET"}]


# --- PIPELINING ---------------------------------------------------------------------


def test_a_warm_connection_sends_mail_rcpt_and_data_in_one_write(smtp_sink):
    to = ["a@example.com", "b@example.com", "c@example.com"]
    with backend_for(smtp_sink) as backend:
        assert backend.send_messages([mail(to, "first"), mail(to, "second")]) == 2
    first, second = smtp_sink.wait_for(2)
    assert (first.subject, second.subject) == ("first", "second")
    assert first.rcpt_tos == tuple(to)
    # Two round trips a message: the envelope and DATA together, then the content.
    assert transaction_groups(smtp_sink) == [("MAIL", "RCPT", "RCPT", "RCPT", "DATA")] * 2
    assert smtp_sink.connections == 1
    # Dot-stuffing survives the new writer.
    assert first.message.get_content() == "Hello there.\n.a line that starts with a dot\n"


def test_without_pipelining_each_command_waits_for_its_reply(smtp_server):
    server = smtp_server(pipelining=False)
    with backend_for(server) as backend:
        assert backend.send_messages([mail(["a@example.com", "b@example.com"])]) == 1
    assert server.wait_for(1)[0].rcpt_tos == ("a@example.com", "b@example.com")
    assert transaction_groups(server) == [("MAIL",), ("RCPT",), ("RCPT",), ("DATA",)]


@wires
def test_partial_refusals_are_kept_per_recipient(smtp_server, wire):
    server = smtp_server(**wire, faults=Faults(refuse_recipients={
        "b@example.com": "550 5.1.1 no such user", "c@example.com": "451 4.2.1 busy"}))
    message = mail(["a@example.com", "b@example.com", "c@example.com", "d@example.com"])
    with backend_for(server) as backend:
        assert backend.send_messages([message]) == 1
    assert message.refused_recipients == {"b@example.com": "550 5.1.1 no such user",
                                          "c@example.com": "451 4.2.1 busy"}
    assert server.wait_for(1)[0].rcpt_tos == ("a@example.com", "d@example.com")


@wires
def test_all_refused_raises_recipients_refused_and_the_next_message_goes_through(smtp_server, wire):
    server = smtp_server(**wire, faults=Faults(refuse_recipients={
        "x@example.com": "550 5.1.1 no such user", "y@example.com": "450 4.2.1 busy"}))
    with backend_for(server) as backend:
        with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
            backend.send_messages([mail(["x@example.com", "y@example.com"])])
        assert refused.value.recipients == {"x@example.com": (550, b"5.1.1 no such user"),
                                            "y@example.com": (450, b"4.2.1 busy")}
        assert backend.send_messages([mail(["a@example.com"], "after")]) == 1
    assert [m.subject for m in server.wait_for(1)] == ["after"]
    assert server.connections == 1


@wires
def test_refused_sender_raises_and_leaves_no_transaction_open(smtp_server, wire):
    server = smtp_server(**wire,
                         faults=Faults(mail_reply="553 5.7.1 sender not owned by this account"))
    with backend_for(server) as backend:
        with pytest.raises(smtplib.SMTPSenderRefused) as refused:
            backend.send_messages([mail(["a@example.com", "b@example.com"])])
        assert refused.value.smtp_code == 553 and refused.value.sender == SENDER
        server.faults.mail_reply = None
        assert backend.send_messages([mail(["a@example.com"], "after")]) == 1
    assert [m.subject for m in server.wait_for(1)] == ["after"]
    assert server.connections == 1


@wires
def test_message_refused_at_its_end_is_an_smtp_data_error(smtp_server, wire):
    server = smtp_server(**wire,
                         faults=Faults(data_replies=["554 5.7.1 rejected as spam"]))
    with backend_for(server) as backend:
        with pytest.raises(smtplib.SMTPDataError) as refused:
            backend.send_messages([mail(["a@example.com"])])
        assert (refused.value.smtp_code, refused.value.smtp_error) == (
            554, b"5.7.1 rejected as spam")
        assert backend.send_messages([mail(["a@example.com"], "after")]) == 1
    assert [m.subject for m in server.wait_for(1)] == ["after"]


def test_with_chunking_a_message_and_its_envelope_go_in_one_write(smtp_server):
    server = smtp_server(chunking=True)
    to = ["a@example.com", "b@example.com"]
    with backend_for(server) as backend:
        assert backend.send_messages([mail(to, "first"), mail(to, "second")]) == 2
    first, second = server.wait_for(2)
    # One round trip a message: BDAT carries the content, no 354 to wait for.
    assert transaction_groups(server) == [("MAIL", "RCPT", "RCPT", "BDAT")] * 2
    assert first.rcpt_tos == tuple(to) and first.queue_id
    # No dot-stuffing with BDAT, and none needed.
    assert first.message.get_content() == "Hello there.\n.a line that starts with a dot\n"


def test_with_chunking_a_large_message_waits_for_its_envelope(smtp_server):
    # Not sent before the server said yes to the envelope: it may be megabytes.
    server = smtp_server(chunking=True)
    message = mail(["a@example.com"], "large")
    message.attach("data.bin", b"\x00.\n" * 40_000, "application/octet-stream")
    with backend_for(server) as backend:
        backend.send_messages([message])
    [received] = server.wait_for(1)
    assert [p.get_content() for p in received.message.iter_attachments()] == [
        b"\x00.\n" * 40_000]
    assert transaction_groups(server) == [("MAIL", "RCPT"), ("BDAT",)]


@db
def test_pipelined_delivery_through_the_outbox(smtp_sink, kipekee_settings):
    kipekee_settings(primary=smtp_provider(smtp_sink))
    receipt = kipekee.send(subject="Team", text="x", to=["a@example.com", "b@example.com"])
    assert receipt.sent, receipt
    assert transaction_groups(smtp_sink) == [("MAIL", "RCPT", "RCPT", "DATA")]


# --- the recipient limit of a transaction (452) -----------------------------------------


@db
def test_recipients_past_the_servers_limit_go_out_in_further_transactions(smtp_server,
                                                                           kipekee_settings):
    server = smtp_server(max_recipients=30)
    kipekee_settings(primary=smtp_provider(server))
    to = [f"user{i}@example.com" for i in range(100)]
    receipt = kipekee.send(subject="Newsletter", text="x", bcc=to, to=["list@example.com"])
    assert receipt.sent, receipt
    assert receipt.refused == {}
    received = server.wait_for(4)
    assert [len(m.rcpt_tos) for m in received] == [30, 30, 30, 11]
    assert sorted(r for m in received for r in m.rcpt_tos) == sorted(["list@example.com", *to])
    assert len({m.message_id for m in received}) == 1  # one message, four envelopes
    assert server.connections == 1
    assert not OutboxEmail.objects.exclude(pk=receipt.id).exists()  # no follow-up row


@pytest.mark.parametrize("limit", [None, 2])
def test_an_address_named_twice_is_a_recipient_once(smtp_server, limit):
    server = smtp_server(max_recipients=limit)
    message = mail(["a@example.com", "b@example.com"], cc=["a@example.com"],
                   bcc=["c@example.com", "b@example.com"])
    with backend_for(server) as backend:
        assert backend.send_messages([message]) == 1
    received = server.wait_for(1 if limit is None else 2)
    assert sorted(r for m in received for r in m.rcpt_tos) == [
        "a@example.com", "b@example.com", "c@example.com"]


@wires
def test_a_limit_of_452_without_enhanced_code_is_the_limit_too(smtp_server, wire):
    # RFC 5321 4.5.3.1.10: 452 is the reply to a RCPT past the limit; no enhanced code.
    server = smtp_server(**wire, max_recipients=2)
    message = mail([f"u{i}@example.com" for i in range(5)])
    with backend_for(server) as backend:
        assert backend.send_messages([message]) == 1
    assert message.refused_recipients == {}
    assert [len(m.rcpt_tos) for m in server.wait_for(3)] == [2, 2, 1]


@db
def test_a_later_transaction_that_fails_leaves_its_recipients_for_a_follow_up(
        smtp_server, kipekee_settings):
    server = smtp_server(max_recipients=2,
                         faults=Faults(data_replies=["", "451 4.3.0 try again later"]))
    kipekee_settings(primary=smtp_provider(server))
    receipt = kipekee.send(subject="x", text="x",
                           to=["a@example.com", "b@example.com", "c@example.com", "d@example.com"])
    # a and b have it: the row is not sent again to them, and c and d are not dropped.
    assert receipt.sent
    assert receipt.refused == {"c@example.com": "451 4.3.0 try again later",
                               "d@example.com": "451 4.3.0 try again later"}
    assert server.wait_for(1)[0].rcpt_tos == ("a@example.com", "b@example.com")
    follow_up = OutboxEmail.objects.get(metadata__recipients_of=receipt.id)
    assert follow_up.status == Status.DEFERRED
    assert follow_up.to == ["c@example.com", "d@example.com"]


def test_a_recipient_refused_for_its_own_reason_is_not_retried_in_the_same_attempt(
        smtp_server):
    # 452 4.2.2 (mailbox full) is about the recipient, not the transaction: a new
    # transaction would not help, the follow-up row's backoff does.
    server = smtp_server(faults=Faults(refuse_recipients={"b@example.com": "452 4.2.2 full"}))
    message = mail(["a@example.com", "b@example.com"])
    with backend_for(server) as backend:
        assert backend.send_messages([message]) == 1
    assert message.refused_recipients == {"b@example.com": "452 4.2.2 full"}
    assert len(server.wait_for(1)) == 1
    assert transaction_groups(server) == [("MAIL", "RCPT", "RCPT", "DATA")]


# --- slow readers: the timeout is an inactivity timeout --------------------------------


def test_a_large_message_to_a_slow_reader_is_sent(smtp_server):
    # 4 MB on the wire at 2 MB/s with a 0.5 s timeout: the transfer takes 2 s but
    # never stalls for 0.5 s, and the reply after the final dot comes once the server
    # has read what the socket buffers still held.
    server = smtp_server(faults=Faults(read_rate=2_000_000))
    message = mail(["a@example.com"], "big")
    message.attach("big.bin", bytes(range(256)) * 12_000, "application/octet-stream")
    with backend_for(server, timeout=0.5) as backend:
        assert backend.send_messages([message]) == 1
    [received] = server.wait_for(1)
    assert received.subject == "big" and len(received.data) > 4_000_000


def test_the_reply_after_the_final_dot_is_awaited_past_the_timeout(smtp_server):
    """RFC 5321 4.5.3.2.6: the reply after the final dot may take 10 minutes (the server
    has the message by then); giving up at ``timeout`` sent it again (issue 17)."""
    server = smtp_server(faults=Faults(stall_before_data_reply=1.5))
    with backend_for(server, timeout=0.5) as backend:
        assert backend.final_reply_timeout == 600
        assert backend.send_messages([mail(["a@example.com"])]) == 1
    assert len(server.messages) == 1


def test_the_reply_after_the_final_dot_still_times_out(smtp_server):
    server = smtp_server(faults=Faults(stall_before_data_reply=3))
    started = time.monotonic()
    with backend_for(server, timeout=0.5, final_reply_timeout=1) as backend, pytest.raises(
            TimeoutError):
        backend.send_messages([mail(["a@example.com"])])
    assert 0.9 < time.monotonic() - started < 2.5


# --- deadlines --------------------------------------------------------------------------


def test_a_trickling_server_is_cut_off_at_the_exchange_time_limit(smtp_server):
    # Each byte comes within the 1 s timeout; the banner and EHLO alone would take ~10 s.
    server = smtp_server(faults=Faults(trickle_replies=0.05))
    started = time.monotonic()
    with pytest.raises(deadlines.DeadlineExceeded):
        backend_for(server, timeout=1, exchange_time_limit=1).send_messages(
            [mail(["a@example.com"])])
    assert time.monotonic() - started < 2.5


def test_an_outside_deadline_bounds_connect_and_transaction(smtp_server):
    server = smtp_server(faults=Faults(stall_greeting=3))
    started = time.monotonic()
    with deadlines.within(0.5), pytest.raises(deadlines.DeadlineExceeded):
        backend_for(server, timeout=2).send_messages([mail(["a@example.com"])])
    assert time.monotonic() - started < 1.5
    server.faults.stall_greeting = 0
    server.faults.stall_before_data_reply = 3
    with backend_for(server, timeout=2) as backend:
        started = time.monotonic()
        with deadlines.within(0.5), pytest.raises(deadlines.DeadlineExceeded):
            backend.send_messages([mail(["a@example.com"])])
        assert time.monotonic() - started < 1.5


@db
@pytest.mark.parametrize("mode", ["hybrid", "now"])
def test_in_request_delivery_returns_within_the_time_budget(smtp_server, kipekee_settings,
                                                            mode):
    server = smtp_server(faults=Faults(trickle_replies=0.05))
    kipekee_settings(primary=smtp_provider(server, timeout=2),
                     _extra={"NOW_TIME_BUDGET": 0.5, "NOW_RETRY_DELAYS": [0.1, 0.1]})
    started = time.monotonic()
    receipt = kipekee.send(subject="x", text="x", to=["a@example.com"], mode=mode)
    assert time.monotonic() - started < 1.5
    # Left to an engine, as any transient failure is.
    assert receipt.status == Status.DEFERRED and receipt.error_kind == ErrorKind.TRANSIENT
    assert "deadline" in receipt.error


# --- SMTPUTF8 -----------------------------------------------------------------------------


def test_by_default_a_non_ascii_local_part_is_refused_as_django_does(smtp_sink):
    # Django's backend refuses it whatever the server offers (Django's own
    # test_rejects_non_ascii_local_part, run by the gate): so does Kipekee's, unless told.
    with backend_for(smtp_sink) as backend:
        with pytest.raises(ValueError, match="local-part contains non-ASCII characters"):
            backend.send_messages([mail(["jörg@example.com"])])
        assert backend.send_messages([mail(["ann@example.com"], "next")]) == 1
    assert [m.subject for m in smtp_sink.wait_for(1)] == ["next"]


def test_a_non_ascii_local_part_goes_out_with_smtputf8(smtp_sink):
    message = mail(["jörg@example.com", "ann@example.com"], "Grüße")
    with backend_for(smtp_sink, smtputf8=True) as backend:
        assert backend.send_messages([message]) == 1
    [received] = smtp_sink.wait_for(1)
    assert received.rcpt_tos == ("jörg@example.com", "ann@example.com")
    assert "SMTPUTF8" in received.mail_options
    assert received.subject == "Grüße"


def test_an_ascii_message_does_not_ask_for_smtputf8(smtp_sink):
    with backend_for(smtp_sink) as backend:
        backend.send_messages([mail(["ann@example.com"], "Grüße")])
    assert "SMTPUTF8" not in smtp_sink.wait_for(1)[0].mail_options


@wires
def test_without_smtputf8_a_non_ascii_local_part_is_refused_before_mail_from(smtp_server,
                                                                            wire):
    server = smtp_server(smtputf8=False, **wire)
    with backend_for(server, smtputf8=True) as backend:
        with pytest.raises(ValueError, match="SMTPUTF8"):
            backend.send_messages([mail(["jörg@example.com"])])
        assert transaction_groups(server) == []  # nothing was sent for it
        # The connection is clean: the next message is not met with "503 nested MAIL".
        assert backend.send_messages([mail(["ann@example.com"], "next")]) == 1
    assert [m.subject for m in server.wait_for(1)] == ["next"]
    assert server.connections == 1


# --- TLS session resumption ----------------------------------------------------------------


@pytest.mark.parametrize("tls", ["starttls", "ssl"])
def test_a_new_connection_resumes_the_tls_session(smtp_server, smtp_ca_file, tls):
    server = smtp_server(tls=tls)
    options = {"use_tls": tls == "starttls", "use_ssl": tls == "ssl", "ca_file": str(smtp_ca_file),
               "alias": f"resume-{tls}"}
    for subject in ("first", "second", "third"):
        # A new backend each time, as a new process-wide pool entry would be.
        with backend_for(server, **options) as backend:
            backend.send_messages([mail(["a@example.com"], subject)])
    first, second, third = server.wait_for(3)
    assert all(m.tls for m in (first, second, third))
    assert (first.tls_resumed, second.tls_resumed, third.tls_resumed) == (False, True, True)


# --- the queue id ---------------------------------------------------------------------------


def test_the_queue_id_of_the_data_reply_is_kept_per_recipient(smtp_server):
    server = smtp_server(max_recipients=1)
    message = mail(["a@example.com", "b@example.com"])
    with backend_for(server) as backend:
        backend.send_messages([message])
    first, second = server.wait_for(2)
    assert first.queue_id and first.queue_id != second.queue_id
    assert message.provider_message_ids == {"a@example.com": first.queue_id,
                                            "b@example.com": second.queue_id}


def test_no_queue_id_when_the_server_gives_none(smtp_server):
    server = smtp_server(faults=Faults(data_replies=["250 2.0.0 Ok"]))
    message = mail(["a@example.com"])
    with backend_for(server) as backend:
        backend.send_messages([message])
    assert message.provider_message_ids == {}


@db
def test_the_queue_id_lands_in_provider_messages(smtp_sink, kipekee_settings):
    kipekee_settings(primary=smtp_provider(smtp_sink))
    receipt = kipekee.send(subject="x", text="x", to=["a@example.com"])
    assert receipt.sent
    [stored] = ProviderMessage.objects.filter(email_id=receipt.id)
    assert (stored.provider, stored.message_id, stored.recipient) == (
        "primary", smtp_sink.wait_for(1)[0].queue_id, "a@example.com")


@db
def test_one_connection_per_deliverer_still(smtp_sink, kipekee_settings):
    kipekee_settings(primary=smtp_provider(smtp_sink))
    ids = [kipekee.send(subject=str(i), text="x", to=["a@example.com"], mode="queue").id
           for i in range(3)]
    with Deliverer() as deliverer:
        for pk in ids:
            assert deliverer.deliver(outbox.claim(pk)).ok
    assert smtp_sink.connections == 1
    assert transaction_groups(smtp_sink) == [("MAIL", "RCPT", "DATA")] * 3


# What each message costs on the wire, by what the server offers: its round trips are
# its command groups, plus one for the content after DATA's 354.
ROUND_TRIPS = {
    "pipelined": [("MAIL", "RCPT", "DATA")],  # 2: the envelope with DATA, the content
    "one-by-one": [("MAIL",), ("RCPT",), ("DATA",)],  # 4, as smtplib
    "chunked": [("MAIL", "RCPT", "BDAT")],  # 1: BDAT carries the content
    "chunked-one-by-one": [("MAIL",), ("RCPT",), ("BDAT",)],  # 3
}


@db
@pytest.mark.parametrize("wire", WIRES, ids=WIRES.keys())
def test_a_worker_drain_spends_only_each_transactions_round_trips(smtp_server,
                                                                  kipekee_settings, wire):
    """The drain at network speed (issue 18): each sender thread of a worker sends on
    its own warm connection, and a message costs the round trips of its transaction and
    nothing more: no RSET or NOOP between messages, no EHLO, QUIT or new connection per
    claim or per share, whatever the batches."""
    server = smtp_server(**WIRES[wire])
    kipekee_settings(primary=smtp_provider(server))
    n, senders = 45, 4  # several claims and shares per sender, a short last one
    ids = [kipekee.send(subject=f"Order {i}", text="x", to=[f"c{i}@example.com"],
                        mode="queue").id for i in range(n)]
    Worker(concurrency=senders, batch_size=4, once=True, poll_interval=0.02).run()
    assert OutboxEmail.objects.filter(pk__in=ids, status=Status.SENT).count() == n
    assert sorted(m.subject for m in server.wait_for(n)) == sorted(f"Order {i}"
                                                                   for i in range(n))
    sessions = server.connections
    assert 1 <= sessions <= senders
    expected = Counter({("EHLO",): sessions, ("QUIT",): sessions})
    for group in ROUND_TRIPS[wire]:
        expected[group] += n
    assert Counter(server.command_groups) == expected



# --- the content writer ----------------------------------------------------------------


@given(st.lists(st.sampled_from([b".", b"..", b"x", b"\r\n", b"\n", b".\r\n", b"ab" * 700]),
                max_size=400))
@hypothesis_settings(max_examples=200, deadline=None)
def test_content_is_dot_stuffed_in_pieces_as_a_whole(parts):
    content = b"".join(parts)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(smtp_client, "_PIECE", 64)  # many pieces, lines longer than one
        pieces = list(smtp_client._stuffed(content))
    assert b"".join(pieces) == re.sub(rb"(?m)^\.", b"..", content)
    assert all(pieces)


def test_a_large_message_with_dot_lines_arrives_byte_for_byte(smtp_sink):
    # Over the 64 KiB piece size, with lines starting with a dot at piece boundaries.
    body = "".join(f".line {i}\n" if i % 3 == 0 else f"line {i} " + "y" * 60 + "\n"
                   for i in range(4000))
    message = EmailMessage("dots", body, SENDER, ["a@example.com"])
    with backend_for(smtp_sink) as backend:
        backend.send_messages([message])
    assert smtp_sink.wait_for(1)[0].message.get_content() == body


_ADDRESS_PART = st.text(alphabet="aZ09.-_+!#$%&'*/=?^`{|}~\"<>()[]\\,;: @\tü", min_size=0,
                        max_size=12)


@hypothesis_settings(max_examples=2000, deadline=None)
@given(local=_ADDRESS_PART, domain=_ADDRESS_PART)
def test_envelope_quoting_is_smtplibs(local, domain):
    # The client's fast path for plain addresses gives smtplib.quoteaddr's answer, and
    # anything else goes through it.
    for address in (f"{local}@{domain}", local, f"{local}@example.com",
                    f"user@{domain}"):
        assert smtp_client.quoteaddr(address) == smtplib.quoteaddr(address), address
