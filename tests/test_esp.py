"""Postmark, SendGrid, Mailgun and Amazon SES (v2) through anymail's real backends and
webhook views, against local servers that follow each ESP's documented contract
(kipekee.testing): the matrix of issue 20 — ESP × (sent with its message id, the ESP's
validation error, a bad key, 429 with Retry-After, 5xx, a dropped connection, a hard
and a soft bounce webhook)."""

from __future__ import annotations

import base64
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from django.test import Client

import kipekee
from kipekee.models import Attempt, ErrorKind, OutboxEmail, ProviderMessage, Status, Suppression
from kipekee.testing import (
    ESPFaults,
    LocalMailgunServer,
    LocalPostmarkServer,
    LocalSendGridServer,
    LocalSESServer,
)
from kipekee.testing.esp import ContractServer

from .conftest import smtp_provider

pytestmark = [pytest.mark.django_db(transaction=True),
              pytest.mark.filterwarnings("ignore::anymail.exceptions.AnymailNotSupportedWarning")]

SECRET = "hooks:s3cret"
SENDER = "Shop <shop@mg.example.com>"


@dataclass
class ESP:
    """How one ESP is set up against its local server, and how its tests provoke it."""

    name: str  # anymail's esp_name
    url: str  # Kipekee's webhook URL for it
    start: Callable[[], ContractServer]
    provider: Callable[[Any, bool], dict[str, Any]]  # (server, good key) -> PROVIDERS entry
    # What the ESP refuses as invalid (its "422"): send kwargs, and the reason it gives.
    invalid: dict[str, Any]
    reason: str
    # (server, event, message id, recipient) -> a webhook request's body and headers.
    webhook: Callable[[Any, str, str, str], tuple[bytes, dict[str, str]]]
    anymail: Callable[[Any], dict[str, Any]] = lambda server: {}


def _postmark_hook(server: LocalPostmarkServer, kind: str, mid: str, to: str) -> tuple[bytes, dict[str, str]]:
    if kind == "delivered":
        return server.webhook("Delivery", mid, to)
    return server.webhook("Bounce", mid, to,
                          bounce_type="HardBounce" if kind == "hard" else "SoftBounce")


def _sendgrid_hook(server: LocalSendGridServer, kind: str, mid: str, to: str) -> tuple[bytes, dict[str, str]]:
    [message] = [m for m in server.messages if m["message_id"] == mid]
    if kind == "delivered":
        event = server.event("delivered", message, to, response="250 OK")
    else:
        event = server.event("bounce", message, to,
                             **({} if kind == "hard" else {"type": "blocked"}))
    return server.webhook([event])


def _mailgun_hook(server: LocalMailgunServer, kind: str, mid: str, to: str) -> tuple[bytes, dict[str, str]]:
    if kind == "delivered":
        return server.webhook("delivered", mid, to)
    return server.webhook("failed", mid, to, severity="permanent" if kind == "hard" else "temporary")


def _ses_hook(server: LocalSESServer, kind: str, mid: str, to: str) -> tuple[bytes, dict[str, str]]:
    if kind == "delivered":
        return server.webhook("Delivery", mid, to)
    return server.webhook("Bounce", mid, to,
                          bounce_type="Permanent" if kind == "hard" else "Transient")


ESPS = {
    "postmark": ESP(
        name="Postmark", url="/kipekee/webhooks/postmark/",
        start=lambda: LocalPostmarkServer(tokens={"pm-token"}),
        provider=lambda s, good: {
            "BACKEND": "anymail.backends.postmark.EmailBackend",
            "OPTIONS": {"server_token": "pm-token" if good else "revoked", "api_url": s.api_url,
                        "timeout": 2}},
        invalid={"text": ""}, reason="Provide either email TextBody or HtmlBody or both.",
        webhook=_postmark_hook),
    "sendgrid": ESP(
        name="SendGrid", url="/kipekee/webhooks/sendgrid/",
        start=lambda: LocalSendGridServer(api_keys={"SG.key"}),
        provider=lambda s, good: {
            "BACKEND": "anymail.backends.sendgrid.EmailBackend",
            "OPTIONS": {"api_key": "SG.key" if good else "SG.revoked", "api_url": s.api_url,
                        "timeout": 2}},
        invalid={"text": ""}, reason="content parameter is required",
        webhook=_sendgrid_hook,
        anymail=lambda s: {"SENDGRID_TRACKING_WEBHOOK_VERIFICATION_KEY": s.verification_key}),
    "mailgun": ESP(
        name="Mailgun", url="/kipekee/webhooks/mailgun/",
        start=lambda: LocalMailgunServer(api_keys={"mg-key"}, domains={"mg.example.com"},
                                         signing_key="mg-signing"),
        provider=lambda s, good: {
            "BACKEND": "anymail.backends.mailgun.EmailBackend",
            "OPTIONS": {"api_key": "mg-key" if good else "revoked", "api_url": s.api_url,
                        "timeout": 2}},
        invalid={"text": ""}, reason="Need at least one of 'text', 'html' or 'template'",
        webhook=_mailgun_hook,
        anymail=lambda s: {"MAILGUN_WEBHOOK_SIGNING_KEY": s.signing_key}),
    "amazon_ses": ESP(
        name="Amazon SES", url="/kipekee/webhooks/amazon_ses/",
        # In the sandbox, an unverified recipient is refused (MessageRejected, 400).
        start=lambda: LocalSESServer(credentials={"AKIDTEST": "ses-secret"}, sandbox=True,
                                     verified_identities={"example.com"}),
        provider=lambda s, good: {
            "BACKEND": "kipekee.backends.amazon_ses.EmailBackend",
            "OPTIONS": {"client_params": s.client_params(secret=None if good else "wrong")}},
        invalid={"to": ["someone@unverified.example"]},
        reason="MessageRejected: Email address is not verified",
        webhook=_ses_hook),
}

MAIL = {"subject": "Your booking", "text": "See you on Friday.", "to": ["ann@example.com"],
        "from_email": SENDER}


@pytest.fixture(params=list(ESPS))
def esp(request: pytest.FixtureRequest) -> Iterator[tuple[ESP, Any]]:
    spec = ESPS[request.param]
    with spec.start() as server:
        yield spec, server


def attempts(receipt: Any) -> list[Attempt]:
    return list(Attempt.objects.filter(email_id=receipt.id).order_by("number"))


def test_sent_with_the_providers_message_id(esp, kipekee_settings):
    spec, server = esp
    kipekee_settings(esp=spec.provider(server, True))
    receipt = kipekee.send(**{**MAIL, "to": ["ann@example.com", "Bob <bob@example.com>"]},
                           mode="now")
    assert receipt.sent, receipt
    [message] = server.wait_for(1)
    ids = dict(ProviderMessage.objects.filter(email_id=receipt.id)
               .values_list("recipient", "message_id"))
    # One id for the message (these ESPs give one per message), kept per recipient.
    assert ids == {"ann@example.com": message["message_id"],
                   "bob@example.com": message["message_id"]}
    assert server.statuses() in ([200], [202])


def test_the_esps_validation_error_fails_the_message_after_one_attempt(esp, kipekee_settings,
                                                                         smtp_sink):
    spec, server = esp
    kipekee_settings(esp=spec.provider(server, True), backup=smtp_provider(smtp_sink))
    receipt = kipekee.send(**{**MAIL, **spec.invalid}, mode="now")
    assert receipt.failed, receipt
    assert receipt.error_kind == ErrorKind.PERMANENT
    assert spec.reason in receipt.error and receipt.error.startswith(f"{spec.name} 4")
    assert receipt.attempts == 1 and len(server.requests) == 1
    assert smtp_sink.messages == []  # the message is at fault: not passed on


def test_a_bad_key_is_configuration_and_fails_over_with_nothing_failed(esp, kipekee_settings,
                                                                         smtp_sink, caplog):
    spec, server = esp
    kipekee_settings(esp=spec.provider(server, False), backup=smtp_provider(smtp_sink))
    with caplog.at_level(logging.ERROR, logger="kipekee.delivery"):
        receipt = kipekee.send(**MAIL, mode="now")
    assert receipt.sent and receipt.provider == "backup", receipt
    [attempt] = attempts(receipt)
    assert f"esp: {spec.name} 40" in attempt.error and "check the API key" in attempt.error
    assert any(r.levelno == logging.ERROR and "configuration" in r.getMessage()
               for r in caplog.records)  # loudly
    assert len(smtp_sink.wait_for(1)) == 1

    # Alone, it leaves the row deferred for when the key is fixed: never failed.
    kipekee_settings(esp=spec.provider(server, False))
    alone = kipekee.send(**MAIL, mode="now")
    assert alone.status == Status.DEFERRED and alone.error_kind == ErrorKind.CONFIGURATION
    assert alone.attempts == 1


@pytest.mark.parametrize("mode", ["now", "hybrid"])
def test_429_with_retry_after_is_tried_once_and_waits(esp, kipekee_settings, mode):
    spec, server = esp
    server.faults = ESPFaults(statuses=[429], retry_after=1800)
    kipekee_settings(esp=spec.provider(server, True))
    receipt = kipekee.send(**MAIL, mode=mode)
    assert receipt.status == Status.DEFERRED and receipt.error_kind == ErrorKind.TRANSIENT
    assert receipt.attempts == 1 and server.statuses() == [429]  # no quick retries
    row = OutboxEmail.objects.get(pk=receipt.id)
    [attempt] = attempts(receipt)
    assert (row.due_at - attempt.finished_at).total_seconds() >= 1800
    assert f"{spec.name} 429" in receipt.error


def test_retry_after_as_an_http_date(esp, kipekee_settings):
    from email.utils import format_datetime

    from django.utils import timezone

    spec, server = esp
    later = timezone.now() + timezone.timedelta(hours=1)
    server.faults = ESPFaults(statuses=[429], retry_after=format_datetime(later, usegmt=True))
    kipekee_settings(esp=spec.provider(server, True))
    receipt = kipekee.send(**MAIL, mode="hybrid")
    row = OutboxEmail.objects.get(pk=receipt.id)
    assert abs((row.due_at - later).total_seconds()) < 5


@pytest.mark.parametrize("status", [500, 503])
def test_server_errors_are_transient(esp, kipekee_settings, status):
    spec, server = esp
    server.faults = ESPFaults(statuses=[status])
    kipekee_settings(esp=spec.provider(server, True))
    receipt = kipekee.send(**MAIL, mode="hybrid")
    assert receipt.status == Status.DEFERRED and receipt.error_kind == ErrorKind.TRANSIENT
    assert f"{spec.name} {status}" in receipt.error and receipt.attempts == 1


def test_a_dropped_connection_is_transient(esp, kipekee_settings):
    spec, server = esp
    server.faults = ESPFaults(drop=1)
    kipekee_settings(esp=spec.provider(server, True))
    receipt = kipekee.send(**MAIL, mode="hybrid")
    assert receipt.status == Status.DEFERRED and receipt.error_kind == ErrorKind.TRANSIENT
    assert f"{spec.name} unreachable" in receipt.error
    assert server.statuses() == [0]  # tried once, by Kipekee, not by the client library


# --- webhooks ------------------------------------------------------------------------------


def _post(spec: ESP, body: bytes, headers: dict[str, str], secret: str = SECRET) -> Any:
    headers = dict(headers)
    content_type = headers.pop("Content-Type", "application/json")
    auth = "Basic " + base64.b64encode(secret.encode()).decode()
    return Client(raise_request_exception=False).post(
        spec.url, data=body, content_type=content_type, headers={**headers, "Authorization": auth})


@pytest.fixture
def sent(esp, kipekee_settings, settings):
    """A message sent through the ESP's local server: (spec, server, receipt, message id)."""
    spec, server = esp
    settings.ANYMAIL = spec.anymail(server)
    kipekee_settings({"WEBHOOK_SECRET": SECRET}, esp=spec.provider(server, True))
    receipt = kipekee.send(**MAIL, mode="now")
    assert receipt.sent, receipt
    [message] = server.wait_for(1)
    return spec, server, receipt, message["message_id"]


def test_hard_bounce_webhook_suppresses_and_the_next_mail_is_suppressed(sent):
    spec, server, receipt, mid = sent
    response = _post(spec, *spec.webhook(server, "hard", mid, "ann@example.com"))
    assert response.status_code == 200, response.content
    entry = Suppression.objects.get()
    assert (entry.address, entry.reason) == ("ann@example.com", "hard_bounce")
    assert entry.source == f"{spec.name} webhook"
    row = OutboxEmail.objects.get(pk=receipt.id)
    assert row.delivery["ann@example.com"]["event"] == "bounced"
    assert "ann@example.com" in row.refused

    again = kipekee.send(**MAIL, mode="now")
    assert again.suppressed and again.status == Status.SUPPRESSED
    assert len(server.messages) == 1  # not sent


def test_soft_bounce_webhook_does_not_suppress(sent):
    spec, server, receipt, mid = sent
    assert _post(spec, *spec.webhook(server, "soft", mid, "ann@example.com")).status_code == 200
    assert not Suppression.objects.exists()
    assert OutboxEmail.objects.get(pk=receipt.id).delivery["ann@example.com"]["event"] in {
        "bounced", "deferred"}


def test_delivery_webhook_is_recorded_once(sent):
    spec, server, receipt, mid = sent
    body, headers = spec.webhook(server, "delivered", mid, "ann@example.com")
    assert _post(spec, body, headers).status_code == 200
    assert _post(spec, body, headers).status_code == 200  # a replay
    row = OutboxEmail.objects.get(pk=receipt.id)
    assert row.delivery["ann@example.com"]["event"] == "delivered"
    assert row.webhook_events.count() == 1


def test_webhook_without_the_secret_changes_nothing(sent):
    spec, server, receipt, mid = sent
    response = _post(spec, *spec.webhook(server, "hard", mid, "ann@example.com"),
                     secret="hooks:wrong")
    assert response.status_code in (400, 401)
    assert not Suppression.objects.exists()
    assert OutboxEmail.objects.get(pk=receipt.id).delivery == {}


@pytest.mark.parametrize("esp", ["sendgrid", "mailgun"], indirect=True)
def test_webhook_with_a_bad_signature_changes_nothing(sent):
    spec, server, _, mid = sent
    body, headers = spec.webhook(server, "hard", mid, "ann@example.com")
    tampered = body.replace(b"ann@example.com", b"bob@example.com")
    if spec.name == "Mailgun":  # Mailgun signs its token and timestamp: re-use one
        tampered = body.replace(b'"signature": "', b'"signature": "0')
    assert _post(spec, tampered, headers).status_code == 400
    assert not Suppression.objects.exists()


# --- PROVIDERS naming a Django 6.1 MAILERS entry -------------------------------------------


def test_a_provider_may_name_a_mailers_alias(kipekee_settings, settings, recwarn):
    import warnings

    import django

    from kipekee.conf import get as kipekee_conf
    from kipekee.limits import Rate

    with LocalPostmarkServer(tokens={"pm-token"}) as server:
        settings.MAILERS = {
            "default": {"BACKEND": "kipekee.backend.EmailBackend"},
            "transactional": {"BACKEND": "anymail.backends.postmark.EmailBackend",
                              "OPTIONS": {"server_token": "pm-token", "api_url": server.api_url}},
        }
        kipekee_settings(postmark={"MAILER": "transactional", "LIMITS": {"RATE": "50/s"}})
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the README's configuration warns of nothing
            config = kipekee_conf().provider("postmark")
            assert config.backend == "anymail.backends.postmark.EmailBackend"
            assert config.rate == (Rate(count=50, per=1.0),)
            receipt = kipekee.send(**MAIL, mode="now")
            assert receipt.sent and receipt.provider == "postmark", receipt
            if django.VERSION >= (6, 1):
                # The same entry serves Django's own mailers, and its drop-in default
                # routes Django's send_mail() through the outbox.
                from django.core.mail import mailers, send_mail

                assert mailers["transactional"].server_token == "pm-token"
                send_mail("Hi", "Through the outbox", SENDER, ["bob@example.com"])
                assert OutboxEmail.objects.filter(to=["bob@example.com"]).exists()
        assert len(server.wait_for(1)) >= 1
    assert not [w for w in recwarn.list if issubclass(w.category, DeprecationWarning)]


def test_a_mailers_alias_that_does_not_exist_is_a_clear_error(settings):
    from kipekee.conf import parse
    from kipekee.exceptions import ConfigurationError

    settings.MAILERS = {"default": {"BACKEND": "kipekee.backend.EmailBackend"}}
    with pytest.raises(ConfigurationError, match=r"'nope', which is not an alias of "
                                                 r"settings.MAILERS \(its aliases: \['default'\]\)"):
        parse({"PROVIDERS": {"p": {"MAILER": "nope"}}})
    with pytest.raises(ConfigurationError, match="routes back|drop-in"):
        parse({"PROVIDERS": {"p": {"MAILER": "default"}}})  # the drop-in itself: a loop
    with pytest.raises(ConfigurationError, match="only 'MAILER' and 'LIMITS'"):
        parse({"PROVIDERS": {"p": {"MAILER": "default", "OPTIONS": {}}}})


# --- batch sends through the ESP's batch API (anymail's merge_data) -----------------------


def _message_id_header(spec: ESP, message: dict[str, Any]) -> str:
    if spec.name == "Postmark":
        return next(h["Value"] for h in message["Headers"] if h["Name"] == "Message-ID")
    if spec.name == "SendGrid":
        return message["personalization"]["headers"]["Message-ID"]
    # Mailgun: through the recipient's variables, filled in per copy.
    return next(v for k, v in message["headers"].items() if k.lower() == "message-id")


@pytest.mark.parametrize("esp", ["postmark", "sendgrid", "mailgun"], indirect=True)
def test_identical_rows_share_one_batch_request(esp, kipekee_settings):
    from kipekee import outbox, recording
    from kipekee.delivery import Deliverer

    spec, server = esp
    kipekee_settings(esp=spec.provider(server, True))
    news = {**MAIL, "subject": "Spring tours are open", "mode": "queue"}
    receipts = [kipekee.send(**{**news, "to": [f"guest{i}@example.com"]}) for i in range(4)]
    other = kipekee.send(**{**MAIL, "mode": "queue", "to": ["desk@example.com"]})
    rows = [outbox.claim(r.id) for r in [*receipts, other]]
    with Deliverer() as deliverer:
        outcomes = deliverer.deliver_many(rows)
    for row, outcome in zip(rows, outcomes):
        recording.record(row, outcome)

    assert all(o.ok for o in outcomes), [o.error for o in outcomes]
    assert len(server.requests) == 2  # the four identical ones together, the other alone
    assert len(server.messages) == 5
    by_to = {m["to"][0]: m for m in server.messages}
    for receipt in receipts:
        row = OutboxEmail.objects.get(pk=receipt.id)
        assert row.status == Status.SENT
        message = by_to[row.to[0]]
        assert _message_id_header(spec, message) == row.message_id  # each row's own
        [pm] = ProviderMessage.objects.filter(email=row)
        assert pm.recipient == row.to[0]


@pytest.mark.parametrize("esp", ["postmark"], indirect=True)
def test_a_refused_recipient_fails_its_row_alone_in_a_batch(esp, kipekee_settings):
    from kipekee import outbox, recording
    from kipekee.delivery import Deliverer

    spec, server = esp
    server.inactive = {"guest1@example.com"}
    kipekee_settings(esp=spec.provider(server, True))
    ids = [kipekee.send(**{**MAIL, "mode": "queue", "to": [f"guest{i}@example.com"]}).id
           for i in range(3)]
    rows = [outbox.claim(pk) for pk in ids]
    with Deliverer() as deliverer:
        outcomes = deliverer.deliver_many(rows)
    for row, outcome in zip(rows, outcomes):
        recording.record(row, outcome)
    assert [o.ok for o in outcomes] == [True, False, True]
    assert len(server.requests) == 1
    failed = OutboxEmail.objects.get(pk=ids[1])
    assert failed.status == Status.FAILED and failed.error_kind == ErrorKind.PERMANENT
    assert "refused by Postmark (rejected)" in failed.refused["guest1@example.com"]


@pytest.mark.parametrize("esp", ["amazon_ses"], indirect=True)
def test_no_batch_where_the_esp_needs_a_template(esp, kipekee_settings):
    from kipekee import outbox, recording
    from kipekee.delivery import Deliverer

    spec, server = esp
    kipekee_settings(esp=spec.provider(server, True))
    ids = [kipekee.send(**{**MAIL, "mode": "queue", "to": [f"guest{i}@example.com"]}).id
           for i in range(3)]
    rows = [outbox.claim(pk) for pk in ids]
    with Deliverer() as deliverer:
        outcomes = deliverer.deliver_many(rows)
    for row, outcome in zip(rows, outcomes):
        recording.record(row, outcome)
    assert all(o.ok for o in outcomes) and len(server.requests) == 3


@pytest.mark.parametrize("esp", ["mailgun"], indirect=True)
def test_a_webhook_about_a_shared_batch_id_finds_its_recipients_row(esp, kipekee_settings,
                                                                      settings):
    from kipekee import outbox, recording
    from kipekee.delivery import Deliverer

    spec, server = esp
    settings.ANYMAIL = spec.anymail(server)
    kipekee_settings({"WEBHOOK_SECRET": SECRET}, esp=spec.provider(server, True))
    ids = [kipekee.send(**{**MAIL, "mode": "queue", "to": [f"guest{i}@example.com"]}).id
           for i in range(3)]
    rows = [outbox.claim(pk) for pk in ids]
    with Deliverer() as deliverer:
        for row, outcome in zip(rows, deliverer.deliver_many(rows)):
            recording.record(row, outcome)
    shared = {m["message_id"] for m in server.messages}
    assert len(server.requests) == 1 and len(shared) == 1  # Mailgun: one id per request
    [mid] = shared
    assert _post(spec, *spec.webhook(server, "hard", mid, "guest1@example.com")).status_code == 200
    bounced = OutboxEmail.objects.get(delivery__has_key="guest1@example.com")
    assert bounced.pk == ids[1]


def test_anymails_own_ses_backend_retries_inside_a_send_and_a_check_says_so(kipekee_settings):
    from django.core.checks import run_checks

    with LocalSESServer(credentials={"AKIDTEST": "ses-secret"}) as server:
        server.faults = ESPFaults(statuses=[429, 429, 429], retry_after=1800)
        kipekee_settings(ses={"BACKEND": "anymail.backends.amazon_ses.EmailBackend",
                              "OPTIONS": {"client_params": server.client_params()}})
        assert [m.id for m in run_checks() if m.id.startswith("kipekee.W013")] == ["kipekee.W013"]
        receipt = kipekee.send(**MAIL, mode="hybrid")
        # The control for kipekee.backends.amazon_ses: boto3 tried again by itself.
        assert receipt.attempts == 1 and len(server.requests) >= 3

        server.faults = ESPFaults(statuses=[429], retry_after=1800)
        kipekee_settings(ses=ESPS["amazon_ses"].provider(server, True))
        assert not [m for m in run_checks() if m.id == "kipekee.W013"]


# --- a provider's Retry-After past MAX_DELAY (issue 17, loose end b) -----------------------


def test_a_retry_after_longer_than_max_delay_wins(esp, kipekee_settings):
    """The provider said when it will take the message again: trying before then only
    spends an attempt on a certain 429. MAX_DELAY caps our own backoff, not its word."""
    spec, server = esp
    server.faults = ESPFaults(statuses=[429], retry_after=7200)
    kipekee_settings(esp=spec.provider(server, True), _extra={"RETRY": {"MAX_DELAY": 600}})
    receipt = kipekee.send(**MAIL, mode="hybrid")
    row = OutboxEmail.objects.get(pk=receipt.id)
    [attempt] = attempts(receipt)
    assert row.status == Status.DEFERRED
    assert abs((row.due_at - attempt.finished_at).total_seconds() - 7200) < 5


def test_a_retry_after_past_the_lifetime_fails_with_why(esp, kipekee_settings):
    """Bounded by the message's lifetime: a wait that ends after it leaves no attempt, so
    the message fails now, saying so (not silently at the end of its lifetime)."""
    spec, server = esp
    server.faults = ESPFaults(statuses=[429], retry_after=7200)
    kipekee_settings(esp=spec.provider(server, True),
                     _extra={"RETRY": {"MAX_DELAY": 600, "LIFETIME_SECONDS": 3600}})
    receipt = kipekee.send(**MAIL, mode="hybrid")
    row = OutboxEmail.objects.get(pk=receipt.id)
    assert row.status == Status.FAILED and f"{spec.name} 429" in row.last_error
    assert "lifetime" in row.last_error, row.last_error


# --- 413 Payload Too Large (issue 17, loose end c) ----------------------------------------


def test_413_for_a_message_within_the_documented_size_is_the_providers(smtp_sink,
                                                                       kipekee_settings):
    """SendGrid documents 30 MB; a 413 for a 1 KB message is not about the message (a
    proxy in front of the API, a limit lowered on the account): the next provider takes
    it, and with no other provider it waits and is tried again, never failed for it."""
    spec = ESPS["sendgrid"]
    with spec.start() as server:
        server.faults = ESPFaults(statuses=[413, 413])
        kipekee_settings(esp=spec.provider(server, True), backup=smtp_provider(smtp_sink))
        moved = kipekee.send(**MAIL, mode="hybrid")
        assert (moved.status, moved.provider) == (Status.SENT, "backup"), moved.error
        kipekee_settings(esp=spec.provider(server, True))
        alone = kipekee.send(**MAIL, mode="hybrid")
    assert alone.status == Status.DEFERRED and alone.error_kind == ErrorKind.TRANSIENT
    assert "SendGrid 413" in alone.error and "documented" in alone.error, alone.error


def test_413_for_a_message_over_the_documented_size_fails_over_then_fails(smtp_sink,
                                                                          kipekee_settings):
    """Postmark documents 10 MB (as base64, attachments included): a message over it
    never fits Postmark, but another provider may take it (as an SMTP 552 does); with no
    other provider it fails, saying why."""
    spec = ESPS["postmark"]
    big = ("scan.pdf", b"\x00" * (8 * 1024 * 1024), "application/pdf")  # 10.7 MB as base64
    with spec.start() as server:
        server.faults = ESPFaults(statuses=[413, 413])
        # (Time for 11 MB over SMTP on a loaded machine.)
        kipekee_settings(esp=spec.provider(server, True),
                         backup=smtp_provider(smtp_sink, timeout=60),
                         _extra={"NOW_TIME_BUDGET": 60})
        moved = kipekee.send(**MAIL, attachments=[big], mode="hybrid")
        assert (moved.status, moved.provider) == (Status.SENT, "backup"), moved.error
        kipekee_settings(esp=spec.provider(server, True))
        alone = kipekee.send(**MAIL, attachments=[big], mode="hybrid")
    assert alone.status == Status.FAILED and alone.error_kind == ErrorKind.PERMANENT
    assert "Postmark 413" in alone.error and "over Postmark's documented" in alone.error
