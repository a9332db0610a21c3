"""Kipekee's Mailtrap provider (anymail's backend underneath) against the local
Mailtrap-contract server: requests, streams, every error class, and the batch path."""

from __future__ import annotations

import base64
from datetime import timedelta

import pytest
from django.utils import timezone

import kipekee
from kipekee import dispatch, outbox, recording
from kipekee.backends.mailtrap import EmailBackend
from kipekee.delivery import Deliverer
from kipekee.exceptions import ConfigurationError
from kipekee.models import Attempt, ErrorKind, OutboxEmail, ProviderMessage, Status
from kipekee.options import SendOptions
from kipekee.testing import MailtrapFaults

from .conftest import smtp_provider, unused_port
from .mailtrap_fixtures import TOKEN, mailtrap_provider

pytestmark = pytest.mark.django_db(transaction=True)

MAIL = {"subject": "Your quote", "text": "Here it is.", "to": ["ann@example.com"]}


def claim_all(ids: list[int]) -> list[OutboxEmail]:
    rows = [outbox.claim(pk) for pk in ids]
    assert all(rows)
    return rows  # type: ignore[return-value]


def deliver_many(ids: list[int]) -> list:
    rows = claim_all(ids)
    with Deliverer() as deliverer:
        outcomes = deliverer.deliver_many(rows)
    for row, outcome in zip(rows, outcomes):
        recording.record(row, outcome)
    return outcomes


# --- what goes over the wire ------------------------------------------------------------


def test_send_through_mailtrap(mailtrap, kipekee_settings):
    kipekee_settings(mailtrap=mailtrap_provider(mailtrap))
    png = b"\x89PNG\r\n\x1a\nnot really"
    email = kipekee.Email(subject="Your tour", text="See attached.", html="<p>See <img src='cid:map'></p>",
                          to=["Ann <ann@example.com>"], cc=["bob@example.com"],
                          reply_to=["desk@tours.example"], headers={"X-Tour": "42"},
                          metadata={"category": "quote", "quote_id": 42, "tags": ["a", "b"]})
    email.attach("quote.pdf", b"%PDF-1.4 quote", "application/pdf")
    receipt = email.send()
    assert receipt.sent, receipt

    [request] = mailtrap.requests
    assert request.path == "/api/send"
    assert request.headers["api-token"] == TOKEN
    [message] = mailtrap.messages
    assert message["from"] == {"email": "noreply@kipekee.test", "name": "Kipekee Tests"}
    assert message["to"] == [{"email": "ann@example.com", "name": "Ann"}]
    assert message["cc"] == [{"email": "bob@example.com"}]
    assert message["reply_to"] == {"email": "desk@tours.example"}
    assert message["subject"] == "Your tour"
    assert message["text"] == "See attached."
    assert message["html"] == "<p>See <img src='cid:map'></p>"
    assert message["headers"]["X-Tour"] == "42"
    assert message["headers"]["Message-ID"] == receipt.message_id  # fixed at enqueue
    assert message["category"] == "quote"
    assert message["custom_variables"] == {"quote_id": "42", "tags": '["a", "b"]',
                                           "kipekee_id": str(receipt.id)}
    [attachment] = message["attachments"]
    assert attachment["filename"] == "quote.pdf"
    assert base64.b64decode(attachment["content"]) == b"%PDF-1.4 quote"
    assert png  # (inline images: see the next test)

    # One id per recipient, kept so that webhooks lead back to the row.
    ids = dict(ProviderMessage.objects.filter(email_id=receipt.id)
               .values_list("recipient", "message_id"))
    assert ids == {"ann@example.com": message["message_ids"][0],
                   "bob@example.com": message["message_ids"][1]}


def test_inline_image_and_template_category(mailtrap, kipekee_settings):
    from django.core.mail import EmailMultiAlternatives

    from kipekee.message import inline_part

    kipekee_settings(mailtrap=mailtrap_provider(mailtrap))
    message = EmailMultiAlternatives("Ticket", "Your ticket", to=["ann@example.com"])
    message.attach_alternative('<img src="cid:qr1">', "text/html")
    message.attach(inline_part("qr.png", b"PNGDATA", "image/png", "qr1"))
    receipt = dispatch.submit(message, SendOptions(template="emails/ticket"))
    assert receipt.sent, receipt
    [sent] = mailtrap.messages
    [image] = sent["attachments"]
    assert image["disposition"] == "inline" and image["content_id"] == "qr1"
    assert image["type"] == "image/png" and base64.b64decode(image["content"]) == b"PNGDATA"
    assert sent["category"] == "emails/ticket"


def test_bearer_and_api_token_headers_are_both_accepted(mailtrap):
    import requests

    body = {"from": {"email": "a@shop.example"}, "to": [{"email": "b@example.com"}],
            "subject": "s", "text": "t"}
    for headers in ({"Api-Token": TOKEN}, {"Authorization": f"Bearer {TOKEN}"}):
        assert requests.post(mailtrap.api_url + "send", json=body, headers=headers,
                             timeout=2).status_code == 200
    answer = requests.post(mailtrap.api_url + "send", json=body,
                           headers={"Authorization": "Bearer nope"}, timeout=2)
    assert answer.status_code == 401
    assert answer.json() == {"success": False, "errors": ["Unauthorized"]}


def test_streams(mailtrap_server, kipekee_settings):
    sandbox = mailtrap_server(stream="sandbox", inbox_ids={777})
    kipekee_settings(sandbox=mailtrap_provider(sandbox, stream="sandbox", sandbox_id=777))
    receipt = kipekee.send(**{**MAIL, "to": ["ann@example.com", "bob@example.com"]})
    assert receipt.sent, receipt
    assert [r.path for r in sandbox.requests] == ["/api/send/777"]
    # The sandbox gives one id for the whole message: kept for each recipient.
    ids = ProviderMessage.objects.filter(email_id=receipt.id)
    assert sorted(ids.values_list("recipient", flat=True)) == ["ann@example.com",
                                                               "bob@example.com"]
    assert len(set(ids.values_list("message_id", flat=True))) == 1

    ids = [kipekee.send(**MAIL, mode="queue").id for _ in range(3)]
    deliver_many(ids)
    assert sandbox.requests[-1].path == "/api/batch/777"
    assert OutboxEmail.objects.filter(pk__in=ids, status=Status.SENT).count() == 3

    assert EmailBackend(api_token="t", stream="bulk").api_url == "https://bulk.api.mailtrap.io/api/"
    assert EmailBackend(api_token="t").api_url == "https://send.api.mailtrap.io/api/"


def test_one_pooled_connection_for_many_sends(mailtrap, kipekee_settings):
    kipekee_settings(mailtrap=mailtrap_provider(mailtrap))
    ids = [kipekee.send(**MAIL, mode="queue").id for _ in range(4)]
    with Deliverer() as deliverer:
        for pk in ids:
            row = outbox.claim(pk)
            recording.record(row, deliverer.deliver(row))
    assert [r.path for r in mailtrap.requests] == ["/api/send"] * 4
    assert mailtrap.connections == 1  # anymail's session, kept open by the Deliverer
    assert OutboxEmail.objects.filter(status=Status.SENT).count() == 4


def test_proxy_environment_is_honoured_when_the_session_opens(mailtrap, kipekee_settings,
                                                              monkeypatch):
    # requests reads HTTP(S)_PROXY for each request; Kipekee's session reads it when it
    # opens: a proxy named then is used (here one nobody listens on: transient).
    kipekee_settings(mailtrap=mailtrap_provider(mailtrap))
    for name in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{unused_port()}")
    receipt = kipekee.send(**MAIL, mode="hybrid")
    assert receipt.status == Status.DEFERRED and receipt.error_kind == ErrorKind.TRANSIENT
    assert mailtrap.requests == []


def test_environment_is_read_once_per_session(mailtrap, kipekee_settings, monkeypatch):
    kipekee_settings(mailtrap=mailtrap_provider(mailtrap))
    for name in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy", "HTTP_PROXY", "http_proxy"):
        monkeypatch.delenv(name, raising=False)
    assert kipekee.send(**MAIL, mode="hybrid").sent
    # The warm session keeps what it read: the proxy set now is not looked up per send.
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{unused_port()}")
    assert kipekee.send(**MAIL, mode="hybrid").sent
    backend = EmailBackend(api_token=TOKEN, api_url="http://127.0.0.1:9/api/")
    backend.open()
    assert backend.session.trust_env is False
    assert backend.session.proxies["http"].startswith("http://127.0.0.1:")
    backend.close()
    assert len(mailtrap.requests) == 2 and mailtrap.connections == 1


def test_option_checks():
    with pytest.raises(ConfigurationError, match="api_token"):
        EmailBackend(alias="m")
    with pytest.raises(ConfigurationError, match="stream"):
        EmailBackend(api_token="t", stream="marketing")
    with pytest.raises(ConfigurationError, match="sandbox_id"):
        EmailBackend(api_token="t", stream="sandbox")
    with pytest.raises(ConfigurationError, match="sandbox_id"):
        EmailBackend(api_token="t", sandbox_id=1)
    with pytest.raises(TypeError):
        EmailBackend(api_token="t", api_key="typo")  # type: ignore[call-arg]


# --- error classes ------------------------------------------------------------------------


def test_bad_token_is_a_configuration_error(mailtrap, kipekee_settings):
    kipekee_settings(mailtrap=mailtrap_provider(mailtrap, api_token="wrong"))
    receipt = kipekee.send(**MAIL, mode="now")
    assert receipt.status == Status.DEFERRED  # kept for when the token is fixed
    assert receipt.error_kind == ErrorKind.CONFIGURATION
    assert "Mailtrap 401: Unauthorized" in receipt.error
    assert receipt.attempts == 1  # no quick retries for bad configuration


def test_unverified_domain_403_is_a_configuration_error(mailtrap_server, kipekee_settings):
    server = mailtrap_server(verified_domains={"tours.example"})
    kipekee_settings(mailtrap=mailtrap_provider(server))
    receipt = kipekee.send(**MAIL)
    assert receipt.error_kind == ErrorKind.CONFIGURATION
    assert "Mailtrap 403" in receipt.error and "kipekee.test" in receipt.error
    assert kipekee.send(**MAIL, from_email="desk@tours.example").sent


@pytest.mark.parametrize("status", [400, 422])
def test_refused_message_is_permanent(mailtrap, kipekee_settings, smtp_sink, status):
    mailtrap.faults = MailtrapFaults(statuses=[status])
    kipekee_settings(mailtrap=mailtrap_provider(mailtrap), backup=smtp_provider(smtp_sink))
    receipt = kipekee.send(**MAIL, mode="now")
    assert receipt.failed, receipt
    assert receipt.error_kind == ErrorKind.PERMANENT and f"Mailtrap {status}" in receipt.error
    assert smtp_sink.messages == []  # not passed on to the backup: the message is at fault


def test_413_is_the_providers_since_mailtrap_documents_no_size(mailtrap, kipekee_settings,
                                                                smtp_sink):
    """A 413 for a message of a few hundred bytes says nothing against the message
    (kipekee.providers.DOCUMENTED_SIZE has no Mailtrap entry): the backup takes it."""
    mailtrap.faults = MailtrapFaults(statuses=[413])
    kipekee_settings(mailtrap=mailtrap_provider(mailtrap), backup=smtp_provider(smtp_sink))
    receipt = kipekee.send(**MAIL, mode="now")
    assert (receipt.status, receipt.provider) == (Status.SENT, "backup")
    assert "Mailtrap 413" in Attempt.objects.get(email_id=receipt.id).error


def test_validation_errors_are_reported(mailtrap, kipekee_settings):
    kipekee_settings(mailtrap=mailtrap_provider(mailtrap))
    receipt = kipekee.send(subject="Hi", html="", text="", to=["ann@example.com"])
    assert receipt.failed
    assert "must specify either text or html body" in receipt.error


@pytest.mark.parametrize("status", [429, 500, 503])
def test_busy_or_broken_api_is_transient(mailtrap, kipekee_settings, status):
    mailtrap.faults = MailtrapFaults(statuses=[status], retry_after=7)
    kipekee_settings(mailtrap=mailtrap_provider(mailtrap))
    receipt = kipekee.send(**MAIL)
    assert receipt.status == Status.DEFERRED and receipt.error_kind == ErrorKind.TRANSIENT
    assert f"Mailtrap {status}" in receipt.error
    row = OutboxEmail.objects.get(pk=receipt.id)
    if status == 429:
        # Mailtrap's Retry-After is the earliest the retry may come.
        assert (row.due_at - row.attempt_log.get().finished_at).total_seconds() >= 6.9


def test_retry_after_429_in_mode_now_then_sent(mailtrap, kipekee_settings):
    mailtrap.faults = MailtrapFaults(statuses=[429], retry_after=0)
    kipekee_settings(mailtrap=mailtrap_provider(mailtrap))
    receipt = kipekee.send(**MAIL, mode="now")
    assert receipt.sent, receipt
    assert mailtrap.statuses() == [429, 200]


def test_network_errors_are_transient(mailtrap, kipekee_settings):
    mailtrap.faults = MailtrapFaults(drop=1)
    kipekee_settings(mailtrap=mailtrap_provider(mailtrap))
    dropped = kipekee.send(**MAIL)
    assert dropped.error_kind == ErrorKind.TRANSIENT and "Mailtrap unreachable" in dropped.error

    kipekee_settings(mailtrap={"BACKEND": "kipekee.backends.mailtrap.EmailBackend",
                               "OPTIONS": {"api_token": TOKEN, "timeout": 1,
                                           "api_url": f"http://127.0.0.1:{unused_port()}/api/"}})
    refused = kipekee.send(**MAIL)
    assert refused.error_kind == ErrorKind.TRANSIENT and "ConnectionError" in refused.error


def test_slow_api_times_out_as_transient(mailtrap_server, kipekee_settings):
    server = mailtrap_server(latency=1.5)
    kipekee_settings(mailtrap=mailtrap_provider(server, timeout=0.3))
    receipt = kipekee.send(**MAIL)
    assert receipt.error_kind == ErrorKind.TRANSIENT and "Timeout" in receipt.error


def test_wrong_url_is_a_configuration_error(mailtrap_server, kipekee_settings):
    server = mailtrap_server(stream="sandbox", inbox_ids={1})
    kipekee_settings(mailtrap=mailtrap_provider(server, stream="sandbox", sandbox_id=2))
    receipt = kipekee.send(**MAIL)
    assert receipt.error_kind == ErrorKind.CONFIGURATION and "Mailtrap 404" in receipt.error


def test_transient_failure_fails_over_to_the_next_provider(mailtrap, kipekee_settings, smtp_sink):
    mailtrap.faults = MailtrapFaults(statuses=[503])
    kipekee_settings(mailtrap=mailtrap_provider(mailtrap), backup=smtp_provider(smtp_sink))
    receipt = kipekee.send(**MAIL)
    assert receipt.sent and receipt.provider == "backup"
    assert len(smtp_sink.wait_for(1)) == 1


# --- the batch path ------------------------------------------------------------------------


def test_batch_with_some_items_failing(mailtrap, kipekee_settings):
    kipekee_settings(mailtrap=mailtrap_provider(mailtrap, batch_size=3))
    mailtrap.faults = MailtrapFaults(recipients={"bad@example.com": 422})
    ids = [kipekee.send(**{**MAIL, "to": [f"c{i}@example.com"]}, mode="queue").id for i in range(5)]
    ids.insert(2, kipekee.send(**{**MAIL, "to": ["bad@example.com"]}, mode="queue").id)
    ids.insert(4, kipekee.send(subject="no body", text="", to=["c9@example.com"], mode="queue").id)

    outcomes = deliver_many(ids)

    assert [r.path for r in mailtrap.requests] == ["/api/batch"] * 3  # 7 messages, 3 per call
    assert mailtrap.statuses() == [200, 200, 200]  # always 200: results are per item
    assert [o.ok for o in outcomes] == [True, True, False, True, False, True, True]
    rows = {r.pk: r for r in OutboxEmail.objects.filter(pk__in=ids)}
    assert rows[ids[2]].status == Status.FAILED
    assert rows[ids[2]].error_kind == ErrorKind.PERMANENT
    assert "Unprocessable Entity: bad@example.com" in rows[ids[2]].last_error
    assert rows[ids[4]].status == Status.FAILED
    assert "must specify either text or html body" in rows[ids[4]].last_error
    sent = [pk for pk in ids if rows[pk].status == Status.SENT]
    assert len(sent) == 5
    # Each sent row knows the id Mailtrap gave its message.
    assert ProviderMessage.objects.filter(email_id__in=sent).count() == 5
    assert sorted(m["to"][0]["email"] for m in mailtrap.messages) == sorted(
        [f"c{i}@example.com" for i in range(5)])


def test_batch_refused_as_a_whole_falls_back_to_single_sends(mailtrap, kipekee_settings):
    kipekee_settings(mailtrap=mailtrap_provider(mailtrap))
    mailtrap.faults = MailtrapFaults(statuses=[400])
    ids = [kipekee.send(**MAIL, mode="queue").id for _ in range(3)]
    outcomes = deliver_many(ids)
    assert all(o.ok for o in outcomes)
    assert [r.path for r in mailtrap.requests] == ["/api/batch"] + ["/api/send"] * 3


def test_batch_failing_as_a_whole_fails_over(mailtrap, kipekee_settings, smtp_sink):
    kipekee_settings(mailtrap=mailtrap_provider(mailtrap, batch_size=2),
                     backup=smtp_provider(smtp_sink))
    mailtrap.faults = MailtrapFaults(statuses=[500])
    ids = [kipekee.send(**MAIL, mode="queue").id for _ in range(5)]
    outcomes = deliver_many(ids)
    assert [o.provider for o in outcomes] == ["backup"] * 5 and all(o.ok for o in outcomes)
    # After the first request failed, the other chunks were not sent to Mailtrap at all.
    assert mailtrap.statuses() == [500]
    assert len(smtp_sink.wait_for(5)) == 5
    assert all("mailtrap: Mailtrap 500" in o.error for o in outcomes)


def test_batch_with_bad_token_is_deferred_as_configuration(mailtrap, kipekee_settings):
    kipekee_settings(mailtrap=mailtrap_provider(mailtrap, api_token="wrong"))
    ids = [kipekee.send(**MAIL, mode="queue").id for _ in range(3)]
    outcomes = deliver_many(ids)
    assert {o.kind for o in outcomes} == {ErrorKind.CONFIGURATION}
    assert OutboxEmail.objects.filter(pk__in=ids, status=Status.DEFERRED).count() == 3


def test_burst_of_10000_queued_messages_holds_the_request_limit(mailtrap_server, kipekee_settings):
    # The real limit is 150 requests / 10 s; scaled down to 10 requests / 1 s here so the
    # 20 batch requests of 10,000 messages must wait for the window, as a long burst does.
    server = mailtrap_server(rate=(10, 1.0), record_bodies=False)
    kipekee_settings(mailtrap=mailtrap_provider(server, limits={"RATE": "10/1s"}))
    now = timezone.now()
    OutboxEmail.objects.bulk_create(
        OutboxEmail(from_email="shop@tours.example", to=[f"guest{i}@example.com"],
                    subject=f"Booking {i}", body="Thanks", message_id=f"<{i}@tours.example>",
                    mode="queue", due_at=now, created_at=now)
        for i in range(10_000))
    # One UPDATE stands in for an engine's batch claim (10,000 outbox.claim() calls
    # would take most of this test's time and test nothing more).
    OutboxEmail.objects.update(status=Status.SENDING, attempts=1,
                               lease_until=now + timedelta(minutes=5))
    rows = list(OutboxEmail.objects.order_by("pk"))
    with Deliverer() as deliverer:
        outcomes = deliverer.deliver_many(rows)

    assert [o.error for o in outcomes if not o.ok] == []
    assert server.statuses() == [200] * 20  # 500 per request, and not one 429
    times = [r.at for r in server.requests]
    assert all(later - earlier >= 1.0 for earlier, later in zip(times, times[10:]))
    assert len(server.messages) == 10_000
    assert sum(len(o.provider_message_ids) for o in outcomes) == 10_000


def test_without_the_limit_the_server_answers_429(mailtrap_server, kipekee_settings):
    # The control for the test above: the server really enforces its window.
    server = mailtrap_server(rate=(10, 1.0))
    kipekee_settings(mailtrap=mailtrap_provider(server, batch_size=10))
    ids = [kipekee.send(**MAIL, mode="queue").id for _ in range(150)]
    outcomes = deliver_many(ids)
    assert server.statuses()[:10] == [200] * 10 and server.statuses()[10] == 429
    assert sum(o.ok for o in outcomes) == 100
    assert {o.kind for o in outcomes if not o.ok} == {ErrorKind.TRANSIENT}


def test_python_m_kipekee_testing_mailtrap_prints_each_message():
    import subprocess
    import sys

    import requests

    process = subprocess.Popen([sys.executable, "-m", "kipekee.testing.mailtrap", "--port", "0"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline()
        assert line.startswith("Kipekee Mailtrap-contract server at http://127.0.0.1:")
        url = line.split(" at ", 1)[1].split()[0]
        answer = requests.post(url + "send", headers={"Api-Token": "test-token"}, timeout=5,
                               json={"from": {"email": "a@shop.example"}, "subject": "Hello",
                                     "to": [{"email": "b@example.com"}], "text": "t"})
        assert answer.status_code == 200
        assert process.stdout.readline().strip() == "to=b@example.com subject='Hello'"
    finally:
        process.terminate()
        process.wait(timeout=5)


def test_batches_are_cut_by_size_and_an_oversized_message_goes_alone(mailtrap, kipekee_settings,
                                                                       monkeypatch):
    # Mailtrap's 50 MB per request, scaled down to 20 kB to keep the test small.
    monkeypatch.setattr(EmailBackend, "batch_max_bytes", 20_000)
    kipekee_settings(mailtrap=mailtrap_provider(mailtrap))
    ids = []
    for i in range(5):
        email = kipekee.Email(**{**MAIL, "to": [f"c{i}@example.com"]}, mode="queue")
        email.attach("plan.bin", b"x" * 6_000, "application/octet-stream")  # ~8 kB in base64
        ids.append(email.send().id)
    big = kipekee.Email(**MAIL, mode="queue")
    big.attach("scan.bin", b"y" * 30_000, "application/octet-stream")
    ids.append(big.send().id)

    outcomes = deliver_many(ids)

    assert all(o.ok for o in outcomes)
    paths = [r.path for r in mailtrap.requests]
    assert paths.count("/api/send") == 1  # the one too big to share a request
    batches = [r for r in mailtrap.requests if r.path == "/api/batch"]
    assert [len(r.json["requests"]) for r in batches] == [2, 2, 1]
    assert all(len(r.body) <= 20_000 + 1024 for r in batches)
