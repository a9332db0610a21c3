"""Delivery through Kipekee's SMTP backend against real local SMTP servers: TLS, AUTH,
misbehaving servers, error classes, modes and failover."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from django.db import connection, transaction
from django.utils import timezone

import kipekee
from kipekee import outbox
from kipekee.delivery import Deliverer
from kipekee.models import Attempt, ErrorKind, OutboxEmail, Status
from kipekee.testing import Faults, self_signed_context
from kipekee.testing.assertions import deliver_outbox

from .conftest import SMTP_BACKEND, smtp_provider, unused_port

pytestmark = pytest.mark.django_db(transaction=True)

MAIL = {"subject": "Your ticket", "text": "see you", "to": ["ann@example.com"]}


def attempts(receipt) -> list[tuple[int, str]]:
    return list(Attempt.objects.filter(email_id=receipt.id).values_list("number", "outcome"))


# --- TLS and AUTH ------------------------------------------------------------------


def test_starttls_with_auth(smtp_server, smtp_ca_file, kipekee_settings):
    server = smtp_server(tls="starttls", require_starttls=True, auth={"shop": "s3cret"})
    kipekee_settings(primary=smtp_provider(server, use_tls=True, username="shop",
                                           password="s3cret", ca_file=smtp_ca_file))
    receipt = kipekee.send(**MAIL)
    assert receipt.sent, receipt
    received = server.wait_for(1)[0]
    assert received.tls and received.auth_user == "shop"


def test_implicit_ssl_with_auth(smtp_server, smtp_ca_file, kipekee_settings):
    server = smtp_server(tls="ssl", auth={"shop": "s3cret"})
    kipekee_settings(primary=smtp_provider(server, use_ssl=True, username="shop",
                                           password="s3cret", ca_file=smtp_ca_file))
    assert kipekee.send(**MAIL).sent
    assert server.wait_for(1)[0].tls


def test_bad_credentials_are_a_configuration_error(smtp_server, smtp_ca_file, kipekee_settings):
    server = smtp_server(tls="starttls", auth={"shop": "s3cret"})
    kipekee_settings(primary=smtp_provider(server, use_tls=True, username="shop",
                                           password="wrong", ca_file=smtp_ca_file))
    receipt = kipekee.send(**MAIL, mode="now")
    # Not the message's fault: kept for later (an engine, once the password is fixed).
    assert receipt.status == Status.DEFERRED
    assert receipt.error_kind == ErrorKind.CONFIGURATION
    assert "authentication failed: 535" in receipt.error
    assert attempts(receipt) == [(1, "configuration")]  # no quick retries for bad config
    assert server.messages == []


def test_certificate_not_in_certifi_is_refused(smtp_server, kipekee_settings):
    # The server's certificate comes from a test CA that certifi's bundle does not hold.
    server = smtp_server(tls="starttls")
    kipekee_settings(primary=smtp_provider(server, use_tls=True))
    receipt = kipekee.send(**MAIL)
    assert receipt.error_kind == ErrorKind.CONFIGURATION
    assert "TLS certificate not trusted" in receipt.error
    assert server.messages == []


def test_self_signed_certificate_refused_unless_trusted(smtp_server, kipekee_settings, tmp_path):
    context, pem = self_signed_context()
    server = smtp_server(tls="ssl", ssl_context=context)
    kipekee_settings(primary=smtp_provider(server, use_ssl=True))
    refused = kipekee.send(**MAIL)
    assert refused.error_kind == ErrorKind.CONFIGURATION and "not trusted" in refused.error
    assert server.messages == []

    trusted = tmp_path / "relay.pem"
    trusted.write_bytes(pem)
    kipekee_settings(primary=smtp_provider(server, use_ssl=True, ca_file=str(trusted)))
    assert kipekee.send(**MAIL).sent
    assert len(server.wait_for(1)) == 1


def test_tls_required_but_not_offered(smtp_sink, kipekee_settings):
    kipekee_settings(primary=smtp_provider(smtp_sink, use_tls=True))
    receipt = kipekee.send(**MAIL)
    assert receipt.error_kind == ErrorKind.CONFIGURATION
    assert "STARTTLS" in receipt.error
    assert smtp_sink.messages == []  # never sent in clear


def test_ipv4_only(smtp_server, kipekee_settings):
    server = smtp_server(host="::1")
    kipekee_settings(primary=smtp_provider(server))
    assert kipekee.send(**MAIL).sent  # IPv6 is fine by default
    kipekee_settings(primary=smtp_provider(server, ipv4_only=True))
    receipt = kipekee.send(**MAIL)
    # With ipv4_only the IPv6 literal has no IPv4 address to connect to.
    assert receipt.error_kind == ErrorKind.TRANSIENT and "gaierror" in receipt.error
    assert len(server.messages) == 1


def test_unknown_option_is_a_configuration_error_on_the_row(smtp_sink, kipekee_settings):
    kipekee_settings(primary={"BACKEND": SMTP_BACKEND,
                              "OPTIONS": {"host": smtp_sink.host, "port": smtp_sink.port, "tls": True}})
    receipt = kipekee.send(**MAIL)
    assert receipt.error_kind == ErrorKind.CONFIGURATION and "'tls'" in receipt.error


# --- connection reuse ----------------------------------------------------------------


def test_one_connection_is_reused_for_many_messages(sink_provider):
    ids = [kipekee.send(**MAIL, mode="queue").id for _ in range(5)]
    with Deliverer() as deliverer:
        for pk in ids:
            row = outbox.claim(pk)
            outcome = deliverer.deliver(row)
            assert outcome.ok, outcome
            outbox.mark_sent(row, outcome)
    assert len(sink_provider.wait_for(5)) == 5
    assert sink_provider.connections == 1
    assert OutboxEmail.objects.filter(status=Status.SENT).count() == 5


# --- misbehaving servers and error classes ------------------------------------------


def test_451_k_times_then_delivered_in_mode_now(smtp_server, kipekee_settings):
    server = smtp_server(faults=Faults(data_replies=["451 4.3.0 try again later"] * 2))
    kipekee_settings(primary=smtp_provider(server))
    receipt = kipekee.send(**MAIL, mode="now")
    assert receipt.sent, receipt
    assert attempts(receipt) == [(1, "transient"), (2, "transient"), (3, "sent")]
    assert len(server.wait_for(1)) == 1


def test_451_in_hybrid_mode_is_deferred_for_an_engine(smtp_server, kipekee_settings):
    server = smtp_server(faults=Faults(data_replies=["451 4.3.0 try again later"]))
    kipekee_settings(primary=smtp_provider(server))
    receipt = kipekee.send(**MAIL, mode="hybrid")
    assert receipt.status == Status.DEFERRED and receipt.pending
    assert receipt.error_kind == ErrorKind.TRANSIENT and "451" in receipt.error
    row = OutboxEmail.objects.get(pk=receipt.id)
    assert row.due_at > timezone.now() and row.attempts == 1
    assert server.messages == []


def test_now_mode_gives_up_at_the_time_budget(smtp_server, kipekee_settings):
    server = smtp_server(faults=Faults(data_replies=["451 busy"] * 10))
    # Margins wide enough for a loaded machine: the first try has 0.3 s before a retry
    # would no longer fit; after the second, a third (0.5 s later) cannot fit in 0.8 s.
    kipekee_settings(primary=smtp_provider(server), _extra={"NOW_RETRY_DELAYS": [0.5, 0.5, 0.5],
                                                           "NOW_TIME_BUDGET": 0.8})
    receipt = kipekee.send(**MAIL, mode="now")
    assert receipt.status == Status.DEFERRED
    assert [n for n, _ in attempts(receipt)] == [1, 2]  # a third try would pass the budget


def test_550_on_data_fails_at_once_and_is_never_retried(smtp_server, kipekee_settings):
    server = smtp_server(faults=Faults(data_replies=["550 5.7.1 message rejected as spam"]))
    kipekee_settings(primary=smtp_provider(server))
    receipt = kipekee.send(**MAIL, mode="now")
    assert receipt.failed
    assert receipt.error_kind == ErrorKind.PERMANENT and "550 5.7.1" in receipt.error
    assert attempts(receipt) == [(1, "permanent")]
    assert outbox.claim(receipt.id) is None  # failed is final


def test_refused_address_is_reported_to_the_caller(smtp_server, kipekee_settings):
    server = smtp_server(faults=Faults(refuse_recipients={"nobody@example.com": "550 5.1.1 no such user"}))
    kipekee_settings(primary=smtp_provider(server))
    receipt = kipekee.send(subject="Quote", text="x", to=["nobody@example.com"], mode="hybrid")
    assert receipt.failed
    assert receipt.refused == {"nobody@example.com": "550 5.1.1 no such user"}


def test_one_refused_recipient_among_three_is_kept(smtp_server, kipekee_settings):
    server = smtp_server(faults=Faults(refuse_recipients={"b@example.com": "550 5.1.1 no such user"}))
    kipekee_settings(primary=smtp_provider(server))
    receipt = kipekee.send(subject="Team", text="x",
                           to=["a@example.com", "b@example.com", "c@example.com"])
    assert receipt.sent
    assert receipt.refused == {"b@example.com": "550 5.1.1 no such user"}
    assert OutboxEmail.objects.get(pk=receipt.id).refused == receipt.refused
    assert sorted(server.wait_for(1)[0].rcpt_tos) == ["a@example.com", "c@example.com"]


def test_a_recipient_refused_for_now_gets_the_message_in_a_follow_up_row(smtp_server,
                                                                         kipekee_settings):
    server = smtp_server(faults=Faults(refuse_recipients={
        "b@example.com": "452 4.2.2 mailbox full, try again in 2 minutes",
        "c@example.com": "550 5.1.1 no such user"}))
    kipekee_settings(primary=smtp_provider(server))
    before = timezone.now()
    receipt = kipekee.send(subject="Team", text="x", cc=["Bea <B@example.com>"],
                           to=["a@example.com", "c@example.com"], attachments=[("a.txt", "hi", "text/plain")])
    assert receipt.sent and sorted(server.wait_for(1)[0].rcpt_tos) == ["a@example.com"]
    assert {a.lower() for a in receipt.refused} == {"b@example.com", "c@example.com"}
    follow_up = OutboxEmail.objects.get(metadata__recipients_of=receipt.id)
    original = OutboxEmail.objects.get(pk=receipt.id)
    # Only the one refused for now; the same message, attachment and Message-ID.
    assert (follow_up.to, follow_up.cc, follow_up.bcc) == ([], ["Bea <B@example.com>"], [])
    assert follow_up.status == Status.DEFERRED and follow_up.message_id == original.message_id
    assert "452 4.2.2 mailbox full" in follow_up.last_error
    assert follow_up.due_at >= before + timezone.timedelta(seconds=119)  # the server's hint
    assert [a.filename for a in follow_up.attachments.all()] == ["a.txt"]
    assert follow_up.attempts == original.attempts and follow_up.created_at == original.created_at
    # The mailbox has room again: the engine's next claim delivers it to her alone.
    server.faults.refuse_recipients = {}
    outbox.reschedule(follow_up.pk, timezone.now())
    [claimed] = outbox.claim_batch(10)
    from kipekee.recording import record

    with Deliverer() as deliverer:
        assert record(claimed, deliverer.deliver(claimed))
    follow_up.refresh_from_db()
    assert follow_up.status == Status.SENT and follow_up.attempts == original.attempts + 1
    again = server.wait_for(2)[1]
    assert again.rcpt_tos == ("B@example.com",) and again.message_id == original.message_id


def test_a_failed_follow_up_when_no_attempt_is_left(smtp_server, kipekee_settings):
    # (Before issue 17's loose end g there was no follow-up row at all: b was dropped.)
    server = smtp_server(faults=Faults(refuse_recipients={"b@example.com": "450 4.2.1 busy"}))
    kipekee_settings(primary=smtp_provider(server), _extra={"RETRY": {"MAX_ATTEMPTS": 1}})
    receipt = kipekee.send(subject="Team", text="x", to=["a@example.com", "b@example.com"])
    assert receipt.sent and receipt.refused == {"b@example.com": "450 4.2.1 busy"}
    [follow_up] = OutboxEmail.objects.exclude(pk=receipt.id)
    assert (follow_up.to, follow_up.status) == (["b@example.com"], Status.FAILED)
    assert "450 4.2.1 busy" in follow_up.last_error
    assert "no attempts left: 1 of 1" in follow_up.last_error


def test_all_recipients_temporarily_refused_is_transient(smtp_server, kipekee_settings):
    server = smtp_server(faults=Faults(refuse_recipients={"a@example.com": "450 4.2.1 mailbox busy"}))
    kipekee_settings(primary=smtp_provider(server))
    receipt = kipekee.send(subject="x", text="x", to=["a@example.com"], mode="hybrid")
    assert receipt.status == Status.DEFERRED and receipt.error_kind == ErrorKind.TRANSIENT


def test_421_greeting_is_transient(smtp_server, kipekee_settings):
    server = smtp_server(faults=Faults(greeting="421 4.3.2 service not available"))
    kipekee_settings(primary=smtp_provider(server))
    receipt = kipekee.send(**MAIL)
    assert receipt.status == Status.DEFERRED and receipt.error_kind == ErrorKind.TRANSIENT
    assert "421" in receipt.error


def test_421_on_mail_from_is_transient(smtp_server, kipekee_settings):
    server = smtp_server(faults=Faults(mail_reply="421 4.7.0 too many connections"))
    kipekee_settings(primary=smtp_provider(server))
    receipt = kipekee.send(**MAIL)
    assert receipt.status == Status.DEFERRED and receipt.error_kind == ErrorKind.TRANSIENT


def test_connection_dropped_mid_data_is_transient(smtp_server, kipekee_settings):
    server = smtp_server(faults=Faults(drop_mid_data=True))
    kipekee_settings(primary=smtp_provider(server))
    receipt = kipekee.send(**MAIL)
    assert receipt.status == Status.DEFERRED and receipt.error_kind == ErrorKind.TRANSIENT
    assert "disconnected" in receipt.error
    assert server.messages == []


def test_server_stalling_past_the_final_reply_timeout_is_transient(smtp_server,
                                                                   kipekee_settings):
    server = smtp_server(faults=Faults(stall_before_data_reply=3))
    kipekee_settings(primary=smtp_provider(server, timeout=0.5, final_reply_timeout=0.5))
    receipt = kipekee.send(**MAIL)
    assert receipt.status == Status.DEFERRED and receipt.error_kind == ErrorKind.TRANSIENT
    assert "timed out" in receipt.error


def test_silent_server_times_out_on_connect(smtp_server, kipekee_settings):
    server = smtp_server(faults=Faults(stall_greeting=3))
    kipekee_settings(primary=smtp_provider(server, timeout=0.5))
    receipt = kipekee.send(**MAIL)
    assert receipt.error_kind == ErrorKind.TRANSIENT and "timed out" in receipt.error


def test_connection_refused_is_transient(kipekee_settings, settings):
    settings.KIPEKEE = {"ENGINE": None, "PROVIDERS": {"down": {"BACKEND": SMTP_BACKEND, "OPTIONS": {
        "host": "127.0.0.1", "port": unused_port(), "timeout": 1}}}}
    receipt = kipekee.send(**MAIL)
    assert receipt.status == Status.DEFERRED and "ConnectionRefusedError" in receipt.error


def test_out_of_attempts_is_failed_with_its_reason(smtp_server, kipekee_settings):
    server = smtp_server(faults=Faults(data_replies=["451 busy"] * 10))
    kipekee_settings(primary=smtp_provider(server), _extra={"RETRY": {"MAX_ATTEMPTS": 2}})
    receipt = kipekee.send(**MAIL, mode="now")
    assert receipt.failed and "451 busy" in receipt.error
    assert [n for n, _ in attempts(receipt)] == [1, 2]


# --- failover --------------------------------------------------------------------------


def test_failover_to_the_second_provider(smtp_sink, kipekee_settings):
    kipekee_settings(
        primary={"BACKEND": SMTP_BACKEND, "OPTIONS": {"host": "127.0.0.1", "port": unused_port(), "timeout": 1}},
        backup=smtp_provider(smtp_sink),
    )
    receipt = kipekee.send(**MAIL)
    assert receipt.sent and receipt.provider == "backup"
    attempt = Attempt.objects.get(email_id=receipt.id)
    assert attempt.provider == "backup" and "primary: ConnectionRefusedError" in attempt.error
    assert len(smtp_sink.wait_for(1)) == 1


def test_permanent_refusal_does_not_fail_over(smtp_server, smtp_sink, kipekee_settings):
    strict = smtp_server(faults=Faults(refuse_recipients={"ann@example.com": "550 5.1.1 unknown"}))
    kipekee_settings(primary=smtp_provider(strict), backup=smtp_provider(smtp_sink))
    receipt = kipekee.send(**MAIL)
    assert receipt.failed
    assert smtp_sink.messages == []  # the backup must not deliver what was refused


def test_pinned_provider_skips_the_others(smtp_server, smtp_sink, kipekee_settings):
    other = smtp_server()
    kipekee_settings(primary=smtp_provider(smtp_sink), secondary=smtp_provider(other))
    assert kipekee.send(**MAIL, provider="secondary").provider == "secondary"
    assert len(other.wait_for(1)) == 1 and smtp_sink.messages == []


def test_no_providers_keeps_the_mail_queued(settings):
    settings.KIPEKEE = {"ENGINE": None, "PROVIDERS": {}}
    receipt = kipekee.send(**MAIL)
    assert receipt.status == Status.DEFERRED
    assert receipt.error_kind == ErrorKind.CONFIGURATION and "no providers" in receipt.error


# --- provider-level refusals fail over (issue 17, item 13) -------------------------------


@pytest.mark.parametrize("reply", [
    "553 5.7.1 sender address not owned by this account",
    "550 5.7.1 sender address rejected: not verified",
    "554 5.7.1 access denied for this client",
])
def test_a_provider_refusing_the_sender_fails_over(smtp_server, smtp_sink, kipekee_settings,
                                                   reply):
    """A 5xx to MAIL FROM is about this provider (the account, its verified senders, its
    limits): nothing about the recipients or the content has been said yet. The next
    provider is tried; the refusing one is not broken, only unsuitable."""
    from kipekee import circuit

    picky = smtp_server(faults=Faults(mail_reply=reply))
    kipekee_settings(primary=smtp_provider(picky), backup=smtp_provider(smtp_sink))
    receipts = [kipekee.send(**MAIL) for _ in range(2)]
    assert [(r.status, r.provider) for r in receipts] == [(Status.SENT, "backup")] * 2
    assert len(smtp_sink.wait_for(2)) == 2 and picky.messages == []
    attempt = Attempt.objects.get(email_id=receipts[0].id)
    assert f"primary: SMTPSenderRefused: {reply}" in attempt.error
    assert circuit.for_provider("primary").state == circuit.CircuitBreaker.CLOSED


def test_a_message_over_the_size_limit_of_one_provider_fails_over(smtp_server, smtp_sink,
                                                                  kipekee_settings):
    # The server advertises SIZE 20000: smtplib declares the size in MAIL FROM and the
    # server answers 552 there, as Postfix and Exim do.
    small = smtp_server(data_size_limit=20_000)
    # This one says nothing beforehand and refuses after the data.
    late = smtp_server(faults=Faults(data_replies=["552 5.3.4 message size exceeds fixed limit"]))
    kipekee_settings(primary=smtp_provider(small), secondary=smtp_provider(late),
                     backup=smtp_provider(smtp_sink))
    receipt = kipekee.send(**MAIL, attachments=[("photo.jpg", b"\xff" * 30_000, "image/jpeg")])
    assert receipt.sent and receipt.provider == "backup", receipt
    assert len(smtp_sink.wait_for(1)) == 1 and small.messages == []
    attempt = Attempt.objects.get(email_id=receipt.id)
    assert "primary: SMTPSenderRefused: 552" in attempt.error
    assert "secondary: SMTPDataError: 552 5.3.4" in attempt.error


def test_every_provider_refusing_fails_with_each_reason(smtp_server, kipekee_settings):
    one = smtp_server(faults=Faults(mail_reply="553 5.7.1 sender not owned by this account"))
    two = smtp_server(faults=Faults(data_replies=["552 5.3.4 message too big"]))
    kipekee_settings(primary=smtp_provider(one), backup=smtp_provider(two))
    receipt = kipekee.send(**MAIL, mode="now")
    assert receipt.failed and receipt.error_kind == ErrorKind.PERMANENT
    assert "primary: SMTPSenderRefused: 553 5.7.1 sender not owned" in receipt.error
    assert "backup: SMTPDataError: 552 5.3.4 message too big" in receipt.error
    assert attempts(receipt) == [(1, "permanent")]  # no quick retries: it would not change


def test_a_provider_refusal_and_a_transient_failure_defer(smtp_server, kipekee_settings):
    one = smtp_server(faults=Faults(mail_reply="553 5.7.1 sender not owned by this account"))
    kipekee_settings(primary=smtp_provider(one), backup={"BACKEND": SMTP_BACKEND, "OPTIONS": {
        "host": "127.0.0.1", "port": unused_port(), "timeout": 1}})
    receipt = kipekee.send(**MAIL)
    assert receipt.status == Status.DEFERRED and receipt.error_kind == ErrorKind.TRANSIENT
    assert "primary: SMTPSenderRefused: 553" in receipt.error
    assert "backup: ConnectionRefusedError" in receipt.error


def test_content_refused_after_data_does_not_fail_over(smtp_server, smtp_sink, kipekee_settings):
    # 554 / 550 5.7.1 after the data: the content (spam, a virus): another provider
    # must not deliver what the first one judged.
    strict = smtp_server(faults=Faults(data_replies=["554 5.7.1 message rejected as spam"]))
    kipekee_settings(primary=smtp_provider(strict), backup=smtp_provider(smtp_sink))
    receipt = kipekee.send(**MAIL)
    assert receipt.failed and "554 5.7.1" in receipt.error
    assert smtp_sink.messages == []


# --- a configuration failure opens the circuit at once (issue 17, loose end a) -------------


def test_a_configuration_failure_opens_the_circuit_at_once(smtp_server, smtp_sink,
                                                           kipekee_settings, caplog):
    """Bad credentials do not get better with the next message: the first 535 opens the
    provider's circuit (and is logged once at ERROR), so the next mails go straight to the
    backup instead of each trying the broken provider first, as transient failures do
    until the breaker's threshold (5 by default)."""
    from kipekee import circuit

    locked = smtp_server(auth={"user": "right"}, auth_require_tls=False)
    kipekee_settings(primary=smtp_provider(locked, username="user", password="wrong"),
                     backup=smtp_provider(smtp_sink))
    receipts = [kipekee.send(**MAIL)]
    refused_logins = locked.auth_failures  # (smtplib tries each mechanism it shares)
    receipts += [kipekee.send(**MAIL) for _ in range(3)]
    assert [(r.status, r.provider) for r in receipts] == [(Status.SENT, "backup")] * 4
    assert refused_logins and locked.auth_failures == refused_logins  # not tried again
    assert circuit.for_provider("primary").state == circuit.CircuitBreaker.OPEN
    alarms = [r for r in caplog.records
              if r.levelname == "ERROR" and "authentication" in r.getMessage()]
    assert len(alarms) == 1, [r.getMessage() for r in alarms]


# --- recipients refused for now, with no attempt left (issue 17, loose end g) --------------


def test_recipients_refused_for_now_with_no_attempt_left_are_recorded_failed(smtp_server,
                                                                            kipekee_settings):
    """A follow-up row for two recipients, on its last attempt: the server takes one and
    refuses the other for now (451). Before: the row was ``sent`` and the second recipient
    was left in its ``refused`` with a 4xx reply, which promises a retry that never came:
    dropped without a failed row or a ``failed`` signal. Now that recipient gets a row of
    its own, ``failed``, saying why (no attempts left), announced by ``signals.failed``."""
    from kipekee import signals

    server = smtp_server(faults=Faults(refuse_recipients={
        "b@example.com": "451 4.2.1 mailbox busy", "c@example.com": "451 4.2.1 mailbox busy"}))
    kipekee_settings(primary=smtp_provider(server), _extra={"RETRY": {"MAX_ATTEMPTS": 2}})
    receipt = kipekee.send(subject="Team", text="x",
                           to=["a@example.com", "b@example.com", "c@example.com"])
    follow_up = OutboxEmail.objects.get(metadata__recipients_of=receipt.id)
    assert sorted(follow_up.to) == ["b@example.com", "c@example.com"]
    server.faults.refuse_recipients = {"c@example.com": "451 4.2.1 mailbox busy"}
    failed = []
    signals.failed.connect(receiver := lambda sender, email, **kw: failed.append(email.to))
    try:
        outbox.reschedule(follow_up.pk, timezone.now())
        [claimed] = outbox.claim_batch(10)  # its second attempt: the last
        from kipekee.delivery import Deliverer
        from kipekee.recording import record

        with Deliverer() as deliverer:
            assert record(claimed, deliverer.deliver(claimed))
    finally:
        signals.failed.disconnect(receiver)
    follow_up.refresh_from_db()
    assert follow_up.status == Status.SENT  # b got it
    last = OutboxEmail.objects.get(metadata__recipients_of=follow_up.pk)
    assert (last.to, last.status, last.attempts) == (["c@example.com"], Status.FAILED, 2)
    assert "451 4.2.1 mailbox busy" in last.last_error and "no attempts left" in last.last_error
    assert last.message_id == follow_up.message_id and failed == [["c@example.com"]]


# --- the in-request send after the caller's commit ---------------------------------


@contextmanager
def outbox_locked_after_commit(held: list[threading.Event]) -> Iterator[None]:
    """This thread's connection waits at most 0.2 s for a lock; an on_commit hook
    registered in the block (``grab()``) has another connection take the outbox table's
    write lock (SQLite: the database's) and hold it until the block ends."""
    release = threading.Event()
    table = OutboxEmail._meta.db_table

    def hold(holding: threading.Event) -> None:
        try:
            with transaction.atomic(), connection.cursor() as cursor:
                if connection.vendor == "postgresql":
                    cursor.execute(f"LOCK TABLE {table} IN EXCLUSIVE MODE")
                else:  # BEGIN IMMEDIATE (tests/settings.py) took the write lock
                    cursor.execute(f"UPDATE {table} SET attempts = attempts WHERE id = -1")
                holding.set()
                release.wait(10)
        finally:
            holding.set()
            connection.close()

    def grab() -> None:
        holding = threading.Event()
        threading.Thread(target=hold, args=(holding,), daemon=True).start()
        holding.wait(5)
        held.append(holding)

    setting = ("SET lock_timeout = '200ms'" if connection.vendor == "postgresql"
               else "PRAGMA busy_timeout = 200")
    with connection.cursor() as cursor:
        cursor.execute(setting)
    try:
        yield grab
    finally:
        release.set()
        with connection.cursor() as cursor:
            cursor.execute("RESET lock_timeout" if connection.vendor == "postgresql"
                           else "PRAGMA busy_timeout = 20000")


def test_a_database_error_after_the_commit_never_reaches_the_caller(sink_provider, caplog):
    """The business transaction committed (the row written already claimed by the
    request), the provider took the message, then its result cannot be recorded (the
    database is locked past the timeout): the caller's block returns, the application's
    later on_commit hooks run, the error is logged and the row stays claimed until its
    lease ends, when an engine takes it (at least once: the same Message-ID)."""
    held: list[threading.Event] = []
    later: list[str] = []
    with outbox_locked_after_commit(held) as grab:
        with transaction.atomic():
            transaction.on_commit(grab)
            receipt = kipekee.send(**MAIL, mode="hybrid")
            transaction.on_commit(lambda: later.append("ran"))
        assert held and later == ["ran"]
    assert receipt.status == Status.QUEUED and not receipt.sent
    row = OutboxEmail.objects.get(pk=receipt.id)
    assert row.status == Status.SENDING and row.lease_until > timezone.now()
    assert f"outbox email {receipt.id}" in caplog.text and "stays queued" in caplog.text
    # When the lease ends, an engine sends it again and records it.
    OutboxEmail.objects.filter(pk=receipt.id).update(lease_until=timezone.now())
    assert deliver_outbox() == 1
    assert receipt.refresh().sent
    assert {m.message_id for m in sink_provider.wait_for(2)} == {receipt.message_id}
