"""The drop-in backend: Django's own sending API goes through the outbox unchanged."""

from __future__ import annotations

import django
import pytest
from django.core import mail
from django.core.mail import EmailMultiAlternatives, send_mail
from django.db import transaction

from kipekee.backend import EmailBackend
from kipekee.exceptions import ConfigurationError, InvalidMessage
from kipekee.models import ErrorKind, OutboxEmail, Status

from .conftest import rows, smtp_provider

pytestmark = pytest.mark.django_db(transaction=True)

DROP_IN = "kipekee.backend.EmailBackend"


@pytest.fixture
def drop_in(settings, sink_provider):
    settings.EMAIL_BACKEND = DROP_IN
    return sink_provider


def test_send_mail_goes_through_the_outbox(drop_in):
    count = send_mail("Your OTP", "Code: 123456", "PRS <otp@prs.example>", ["admin@prs.example"])
    assert count == 1
    row = OutboxEmail.objects.get()
    assert (row.subject, row.status, row.to) == ("Your OTP", Status.SENT, ["admin@prs.example"])
    received = drop_in.wait_for(1)[0]
    assert received.message["Message-ID"] == row.message_id
    assert received.mail_from == "otp@prs.example"


def test_email_message_send_with_html_and_attachment(drop_in):
    message = EmailMultiAlternatives("Ticket", "text body", "cinema@example.com", ["ann@example.com"],
                                     headers={"X-Booking": "BK001"})
    message.attach_alternative("<b>html body</b>", "text/html")
    message.attach("ticket.png", b"\x89PNG\r\n\x1a\nfake", "image/png")
    assert message.send() == 1
    received = drop_in.wait_for(1)[0].message
    assert received["X-Booking"] == "BK001"
    assert received.get_body(("html",)).get_content().strip() == "<b>html body</b>"
    [png] = list(received.iter_attachments())
    assert png.get_content() == b"\x89PNG\r\n\x1a\nfake"


def test_send_mail_in_a_rolled_back_transaction_sends_nothing(drop_in):
    with pytest.raises(RuntimeError), transaction.atomic():
        send_mail("s", "b", "a@example.com", ["b@example.com"])
        raise RuntimeError
    assert rows() == 0 and drop_in.messages == []


def test_bad_header_via_send_mail_writes_nothing(drop_in):
    with pytest.raises((InvalidMessage, ValueError)):
        send_mail("Hi\r\nBcc: evil@example.com", "b", "a@example.com", ["b@example.com"])
    assert rows() == 0


def test_send_mass_mail_is_all_or_nothing(drop_in):
    good = ("ok", "b", "a@example.com", ["b@example.com"])
    bad = ("ok", "b", "a@example.com", ["not an address"])
    with pytest.raises(InvalidMessage):
        mail.send_mass_mail([good, bad])
    assert rows() == 0


def test_backend_options_mode(drop_in):
    backend = EmailBackend(mode="queue")
    message = EmailMultiAlternatives("s", "b", "a@example.com", ["b@example.com"])
    assert backend.send_messages([message]) == 1
    assert OutboxEmail.objects.get().status == Status.QUEUED
    with pytest.raises(ConfigurationError, match="unknown options"):
        EmailBackend(modes="now")
    with pytest.raises(ConfigurationError, match="mode must be"):
        EmailBackend(mode="later")
    with pytest.raises(ConfigurationError, match="fail silently"):
        EmailBackend(fail_silently=True)


def test_provider_pointing_at_the_drop_in_is_refused(settings):
    settings.KIPEKEE = {"ENGINE": None, "PROVIDERS": {"loop": {"BACKEND": DROP_IN}}}
    from kipekee import conf

    with pytest.raises(ConfigurationError, match="loop forever"):
        conf.get()


def test_provider_relaying_to_the_default_backend_is_stopped(settings, drop_in):
    settings.KIPEKEE = {"ENGINE": None, "PROVIDERS": {"relay": {"BACKEND": "tests.app.backends.RelayToDefault"}}}
    send_mail("s", "b", "a@example.com", ["b@example.com"])
    row = OutboxEmail.objects.get()  # exactly one row: no loop
    assert row.status == Status.DEFERRED
    assert row.error_kind == ErrorKind.CONFIGURATION and "drop-in backend" in row.last_error


if django.VERSION >= (6, 1):

    def test_mailers_setting_on_django_6(settings, smtp_sink):
        settings.MAILERS = {"default": {"BACKEND": DROP_IN, "OPTIONS": {"mode": "hybrid"}}}
        settings.KIPEKEE = {"ENGINE": None, "PROVIDERS": {"primary": smtp_provider(smtp_sink)}}
        message = EmailMultiAlternatives("via mailers", "b", "a@example.com", ["b@example.com"])
        assert message.send() == 1
        assert OutboxEmail.objects.get().status == Status.SENT
        assert smtp_sink.wait_for(1)[0].subject == "via mailers"

    def test_mailers_unknown_option_on_django_6(settings):
        settings.MAILERS = {"default": {"BACKEND": DROP_IN, "OPTIONS": {"speed": "fast"}}}
        with pytest.raises(ConfigurationError, match="unknown options"):
            mail.mailers["default"]
