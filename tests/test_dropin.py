"""Django's API on Kipekee's backends: the drop-in (Django's sending API goes through the
outbox unchanged) and Kipekee's SMTP backend, behaving as Django's own backends do.

Django's own tests of the same behaviour run in tests/django_gate (``make test``).
"""

from __future__ import annotations

import smtplib
import warnings

import django
import pytest
from django.core import mail
from django.core.exceptions import ImproperlyConfigured
from django.core.mail import EmailMessage, EmailMultiAlternatives, send_mail
from django.db import transaction
from django.http import HttpRequest, HttpResponse
from django.test import Client
from django.urls import path
from django.utils.translation import gettext_lazy

from kipekee import providers
from kipekee.backend import EmailBackend
from kipekee.backends.smtp import DEFAULT_TIMEOUT
from kipekee.backends.smtp import EmailBackend as SMTPBackend
from kipekee.exceptions import ConfigurationError, InvalidMessage, KipekeeWarning
from kipekee.models import ErrorKind, OutboxEmail, Status
from kipekee.testing import Faults

from .conftest import SMTP_BACKEND, rows, smtp_provider, unused_port

pytestmark = pytest.mark.django_db(transaction=True)

DROP_IN = "kipekee.backend.EmailBackend"
DJANGO_61 = django.VERSION >= (6, 1)


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


def test_send_messages_takes_a_generator(drop_in):
    # The check of every message first used to exhaust it: nothing was sent, 0 returned.
    messages = (EmailMessage("s", "b", "a@example.com", [f"to-{i}@example.com"]) for i in range(2))
    assert EmailBackend().send_messages(messages) == 2
    assert sorted(m.rcpt_tos for m in drop_in.wait_for(2)) == [("to-0@example.com",),
                                                            ("to-1@example.com",)]


def test_a_message_without_recipients_is_skipped_as_djangos_smtp_backend_does(drop_in):
    nobody = EmailMessage("s", "b", "a@example.com", to=[])
    somebody = EmailMessage("s", "b", "a@example.com", ["b@example.com"])
    assert EmailBackend().send_messages([nobody, somebody]) == 1
    assert rows() == 1


def test_open_close_and_context_manager(drop_in):
    backend = EmailBackend()
    backend.close()  # never opened: fine, as with Django's backends
    with backend as same:
        assert same is backend
        assert backend.send_messages([EmailMessage("s", "b", "a@example.com", ["b@example.com"])]) == 1
    assert backend.open() is None  # nothing to open: the providers' connections are Kipekee's


def test_backend_options_mode(drop_in):
    backend = EmailBackend(mode="queue")
    message = EmailMultiAlternatives("s", "b", "a@example.com", ["b@example.com"])
    assert backend.send_messages([message]) == 1
    assert OutboxEmail.objects.get().status == Status.QUEUED
    with pytest.raises(ConfigurationError, match="mode must be"):
        EmailBackend(mode="later")


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


# --- fail_silently: never raises, and the mail stays in the outbox ----------------------


def test_fail_silently_is_taken_by_both_backends(drop_in):
    # The drop-in refused fail_silently=True (send_mail, mail_admins raised
    # ConfigurationError); Kipekee's SMTP backend refused the keyword altogether.
    assert send_mail("s", "b", "a@example.com", ["b@example.com"], fail_silently=True) == 1
    assert mail.get_connection(DROP_IN, fail_silently=True).fail_silently is True
    smtp = mail.get_connection(SMTP_BACKEND, fail_silently=False)
    assert isinstance(smtp, SMTPBackend) and smtp.fail_silently is False
    assert OutboxEmail.objects.get().status == Status.SENT


def test_fail_silently_logs_what_it_could_not_write_and_sends_the_rest(drop_in, caplog):
    good = EmailMessage("good", "b", "a@example.com", ["b@example.com"])
    bad = EmailMessage("bad", "b", "a@example.com", ["not an address"])
    assert EmailBackend(fail_silently=True).send_messages([bad, good]) == 1
    assert list(OutboxEmail.objects.values_list("subject", flat=True)) == ["good"]
    [record] = [r for r in caplog.records if r.name == "kipekee.backend"]
    assert record.levelname == "ERROR" and "'bad'" in record.getMessage() and record.exc_info


def _broken_view(request: HttpRequest) -> HttpResponse:
    raise RuntimeError("the view broke")


urlpatterns = [path("broken/", _broken_view)]


def test_error_reports_with_every_provider_down_are_queued(settings, smtp_server):
    """ADMINS set, DEBUG off, every provider down: a view that raises still gets Django's
    500 page, and the error report (and the broken-link report) waits in the outbox.

    Before, the drop-in refused the fail_silently=True of Django's error reporting: the
    report crashed inside logging and the request got no 500 page."""
    busy = smtp_server(faults=Faults(greeting="421 4.3.2 too busy, try later"))
    settings.KIPEKEE = {"ENGINE": None, "PROVIDERS": {
        "primary": {"BACKEND": SMTP_BACKEND,
                    "OPTIONS": {"host": "127.0.0.1", "port": unused_port(), "timeout": 2}},
        "backup": smtp_provider(busy),
    }}
    settings.EMAIL_BACKEND = DROP_IN
    settings.DEBUG = False
    settings.ROOT_URLCONF = __name__
    settings.MIDDLEWARE = [*settings.MIDDLEWARE, "django.middleware.common.BrokenLinkEmailsMiddleware"]
    if django.VERSION >= (6, 0):  # (name, address) pairs are deprecated
        settings.ADMINS, settings.MANAGERS = ["ops@example.com"], ["web@example.com"]
    else:
        settings.ADMINS, settings.MANAGERS = [("Ops", "ops@example.com")], [("Web", "web@example.com")]

    client = Client(raise_request_exception=False)
    response = client.get("/broken/")
    assert response.status_code == 500 and b"Server Error (500)" in response.content
    # A broken link on our own site: BrokenLinkEmailsMiddleware mails the managers.
    assert client.get("/missing/", HTTP_REFERER="http://testserver/broken/").status_code == 404

    report, broken_link = OutboxEmail.objects.order_by("pk")
    assert report.to == ["ops@example.com"] and "/broken/" in report.subject
    assert "RuntimeError at /broken/\nthe view broke" in report.body
    assert broken_link.to == ["web@example.com"] and "Broken" in broken_link.subject
    for row in (report, broken_link):
        assert row.status == Status.DEFERRED and row.error_kind == ErrorKind.TRANSIENT
        assert "primary:" in row.last_error and "421" in row.last_error
    assert busy.messages == []


# --- addresses: as Django's SMTP backend reads them, in both backends -------------------


@pytest.mark.parametrize("address", [
    "to@other.com <to@example.com>",  # before: sent to to@other.com
    "to@other.com@example.com",  # before: RCPT TO:<None>
    "@",
    "to@",  # before: IndexError
    "@example.com",
    "to@example.com, other@example.com",
    '"evil@example.com\r\nto"@example.com',
    "to\nevil@example.com",
])
def test_an_invalid_address_is_a_value_error_before_any_smtp_command(address, smtp_sink, capsys):
    backend = SMTPBackend(host=smtp_sink.host, port=smtp_sink.port, alias="t")
    with backend:
        backend.connection.set_debuglevel(1)  # smtplib prints each command it sends
        with pytest.raises(ValueError, match="Invalid address"):
            backend.send_messages([EmailMessage("s", "b", "from@example.com", bcc=[address])])
        assert "mail FROM" not in capsys.readouterr().err
        # The connection is fine for the next message.
        ok = EmailMessage("s", "b", "from@example.com", ["to@example.com"])
        assert backend.send_messages([ok]) == 1
    assert [m.rcpt_tos for m in smtp_sink.wait_for(1)] == [("to@example.com",)]


@pytest.mark.parametrize("address", ["to@other.com <to@example.com>", "to@", "@"])
def test_an_invalid_address_through_the_drop_in_writes_nothing(address, drop_in):
    with pytest.raises(ValueError, match="Invalid address"):
        EmailMessage("s", "b", "from@example.com", ["a@example.com"], bcc=[address]).send()
    assert rows() == 0


def test_the_envelope_is_the_parsed_addr_specs(drop_in):
    # A quoted display name with an @ in it: the mail goes to the address in <>, only.
    message = EmailMessage("s", "b", '"Shop, Inc." <shop@example.com>',
                           ['"x y"@example.com', "Ann <ann@exämple.com>"],
                           bcc=['"to@other.com" <to@example.com>'])
    assert message.send() == 1
    [received] = drop_in.wait_for(1)
    assert received.mail_from == "shop@example.com"
    assert received.rcpt_tos == ('"x y"@example.com', "ann@xn--exmple-cua.com", "to@example.com")


def test_local_and_lazy_addresses_in_both_backends(drop_in, settings):
    """Django accepts a local mailbox (``tester``, #15042) and lazy strings (#24416); the
    drop-in refused both, the SMTP backend accepted them: now both do."""
    lazy = gettext_lazy
    message = EmailMessage("s", "b", lazy("tester"), [lazy("django")], cc=["ann@example.com"])
    assert message.send() == 1
    row = OutboxEmail.objects.get()
    assert (row.from_email, row.to) == ("tester", ["django"])
    [received] = drop_in.wait_for(1)
    assert (received.mail_from, received.rcpt_tos) == ("tester", ("django", "ann@example.com"))
    backend = SMTPBackend(host=drop_in.host, port=drop_in.port, alias="t")
    assert backend.send_messages([EmailMessage("s", "b", lazy("tester"), [lazy("django")])]) == 1
    assert drop_in.wait_for(2)[1].rcpt_tos == ("django",)


# --- keywords, settings, credentials, options: the two backends agree with Django -----


def test_email_settings_are_the_smtp_backends_defaults_when_django_builds_it(settings, smtp_sink):
    settings.EMAIL_BACKEND = SMTP_BACKEND
    settings.EMAIL_HOST, settings.EMAIL_PORT = smtp_sink.host, smtp_sink.port
    settings.EMAIL_HOST_USER, settings.EMAIL_TIMEOUT = "", 7
    assert send_mail("via settings", "b", "a@example.com", ["b@example.com"]) == 1
    assert smtp_sink.wait_for(1)[0].subject == "via settings"
    connection = mail.get_connection()
    assert (connection.host, connection.port, connection.timeout) == (smtp_sink.host, smtp_sink.port, 7)
    settings.EMAIL_USE_TLS = settings.EMAIL_USE_SSL = True
    with pytest.raises(ValueError, match="mutually exclusive"):
        mail.get_connection()


def test_a_provider_reads_its_options_only(settings, smtp_sink, kipekee_settings):
    settings.EMAIL_HOST, settings.EMAIL_PORT = "mail.invalid", 2
    settings.EMAIL_HOST_USER, settings.EMAIL_HOST_PASSWORD = "user", "secret"
    kipekee_settings(primary={"BACKEND": SMTP_BACKEND,
                              "OPTIONS": {"host": smtp_sink.host, "port": smtp_sink.port}})
    backend = providers.build("primary")
    assert (backend.host, backend.port, backend.username, backend.password) == (
        smtp_sink.host, smtp_sink.port, None, None)
    assert backend.timeout == DEFAULT_TIMEOUT  # Kipekee's default for its providers
    import kipekee

    assert kipekee.send(subject="s", text="b", to="b@example.com").sent
    kipekee_settings(primary={"BACKEND": SMTP_BACKEND,
                              "OPTIONS": {"host": "h", "use_tls": True, "timeout": None}})
    backend = providers.build("primary")
    assert (backend.port, backend.timeout) == (587, None)  # not EMAIL_PORT


def test_smtp_backend_keywords_as_django(settings):
    settings.EMAIL_HOST_USER, settings.EMAIL_HOST_PASSWORD = "user", "secret"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Django 6.1: direct construction is deprecated
        compat = SMTPBackend(username="", password="")  # Django's "no AUTH"
        assert (compat.username, compat.password) == ("", "")
        assert (SMTPBackend().username, SMTPBackend().timeout) == ("user", None)
        # Django's order of positional arguments.
        positional = SMTPBackend("h", 2525, "u", "p", True, True)
        assert (positional.host, positional.port, positional.use_tls,
                positional.fail_silently) == ("h", 2525, True, True)
    configured = SMTPBackend(alias="p", host="h")  # OPTIONS only: Django 6.1 keeps None
    assert (configured.username, configured.password, configured.port) == (None, None, 25)
    assert SMTPBackend(alias="p", host="h", use_ssl=True).port == 465
    with pytest.raises(ImproperlyConfigured, match="OPTIONS must define 'host'"):
        SMTPBackend(alias="p")
    with pytest.raises(ImproperlyConfigured, match="'use_ssl' and 'use_tls' OPTIONS are incompatible"):
        SMTPBackend(alias="p", host="h", use_tls=True, use_ssl=True)
    with pytest.raises(ImproperlyConfigured, match="both 'username' and 'password'"):
        SMTPBackend(alias="p", host="h", username="u")


@pytest.mark.parametrize("backend", [EmailBackend, SMTPBackend])
def test_unknown_options_as_django(backend):
    # Configured by OPTIONS (an alias): an error naming them, as Django 6.1's MAILERS
    # (its InvalidMailer, and Kipekee's ConfigurationError, which its checks report).
    with pytest.raises(ConfigurationError, match="Unknown options 'hots'"):
        backend(alias="p", host="h", hots="typo") if backend is SMTPBackend else backend(
            alias="p", hots="typo")
    # Built by get_connection(): ignored, as Django does (with a deprecation warning on 6.1).
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        backend(hots="typo")
    if DJANGO_61:
        assert any("does not support 'hots'" in str(w.message) for w in caught)


def test_drop_in_credentials(drop_in):
    # Django's tests call get_connection(username="", password=""): "no credentials".
    with warnings.catch_warnings():
        warnings.simplefilter("error", KipekeeWarning)
        EmailBackend(username="", password="")
        EmailBackend(username=None, password=None)
    # Credentials for this one call cannot apply: the providers send. Said, not hidden.
    with pytest.warns(KipekeeWarning, match="ignores username/password"):
        send_mail("s", "b", "a@example.com", ["b@example.com"], auth_user="u", auth_password="p")
    assert OutboxEmail.objects.get().status == Status.SENT


def test_smtp_fail_silently_as_django(smtp_server):
    refusing = smtp_server(faults=Faults(mail_reply="451 4.3.0 try again later"))
    message = EmailMessage("s", "b", "a@example.com", ["b@example.com"])
    backend = SMTPBackend(host=refusing.host, port=refusing.port, alias="t")
    with pytest.raises(smtplib.SMTPSenderRefused):
        backend.send_messages([message])
    quiet = SMTPBackend(host=refusing.host, port=refusing.port, alias="t", fail_silently=True)
    assert quiet.send_messages([message]) == 0
    closed = SMTPBackend(host="127.0.0.1", port=unused_port(), alias="t", fail_silently=True)
    assert closed.send_messages([message]) == 0


if DJANGO_61:

    def test_mailers_setting_on_django_6(settings, smtp_sink):
        settings.MAILERS = {"default": {"BACKEND": DROP_IN, "OPTIONS": {"mode": "hybrid"}}}
        settings.KIPEKEE = {"ENGINE": None, "PROVIDERS": {"primary": smtp_provider(smtp_sink)}}
        message = EmailMultiAlternatives("via mailers", "b", "a@example.com", ["b@example.com"])
        assert message.send() == 1
        assert OutboxEmail.objects.get().status == Status.SENT
        assert smtp_sink.wait_for(1)[0].subject == "via mailers"

    def test_mailers_unknown_option_on_django_6(settings):
        from django.core.mail import InvalidMailer

        settings.MAILERS = {"default": {"BACKEND": DROP_IN, "OPTIONS": {"speed": "fast"}}}
        with pytest.raises(InvalidMailer, match=r"MAILERS\['default'\]: Unknown options 'speed'"):
            mail.mailers["default"]

    def test_the_readme_configuration_warns_of_nothing(settings, smtp_sink):
        """The README's Django 6.1 settings (MAILERS, a KIPEKEE provider) and the calls a
        project makes: no RemovedInDjango2028Warning (EMAIL_BACKEND would give one)."""
        from django.utils.deprecation import RemovedInDjango2028Warning

        settings.MAILERS = {"default": {"BACKEND": DROP_IN}}
        settings.KIPEKEE = {"ENGINE": None, "PROVIDERS": {"primary": smtp_provider(smtp_sink)}}
        with warnings.catch_warnings():
            warnings.simplefilter("error", RemovedInDjango2028Warning)
            assert send_mail("s", "b", "a@example.com", ["b@example.com"]) == 1
            assert EmailMessage("s", "b", "a@example.com", ["c@example.com"]).send() == 1
            assert mail.mailers.default.send_messages(
                [EmailMessage("s", "b", "a@example.com", ["d@example.com"])]) == 1
        assert len(smtp_sink.wait_for(3)) == 3
