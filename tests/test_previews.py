"""Previews with sample context: every registered notification and template, rendered as it
would go out, in the admin (HTML in the sandboxed frame, a test send through the outbox)
and by ``manage.py kipekee_render`` (a template error fails CI)."""

from __future__ import annotations

import io
from collections.abc import Iterator
from email import message_from_bytes, policy

import pytest
from django.core.management import CommandError, call_command

from kipekee import previews
from kipekee.admin import PREVIEW_CSP
from kipekee.exceptions import ConfigurationError, TemplateError
from kipekee.models import MailingList, OutboxEmail
from kipekee.notifications import Message, register, unregister

from .app.models import Quote

pytestmark = pytest.mark.django_db

PREVIEWS = "/admin/kipekee/outboxemail/previews/"


@pytest.fixture
def templates(tmp_path, settings) -> Iterator[object]:
    """A template directory of the test's own (``write(name, text)``), in front of the
    app's; template samples registered in the test are dropped after it."""
    settings.TEMPLATES = [{**settings.TEMPLATES[0], "DIRS": [str(tmp_path)]}]

    def write(name: str, text: str) -> None:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)

    before = dict(previews._templates)
    yield write
    previews._templates.clear()
    previews._templates.update(before)


def run_render(*args: str) -> tuple[str, str]:
    out, err = io.StringIO(), io.StringIO()
    call_command("kipekee_render", *args, stdout=out, stderr=err, no_color=True)
    return out.getvalue(), err.getvalue()


@pytest.mark.django_db(transaction=True)  # the preview's own transaction, not a test's
def test_a_notification_renders_with_its_sample_and_the_sample_rows_are_rolled_back():
    preview = previews.get("notification/quote_request.received/admin")
    rendered = previews.render(preview)
    assert rendered.subject.startswith("New quote request #")
    assert "Ann Traveller" in rendered.subject
    assert "Serengeti, 5 days" in rendered.html and "Serengeti, 5 days" in rendered.text
    headers = dict(rendered.headers)
    assert headers["To"] == "office@tours.example" and headers["Reply-To"] == "ann@example.com"
    assert headers["Message-ID"].endswith("@kipekee.test>")  # the sender's domain, as sent
    assert rendered.size == len(rendered.raw) > 0
    parsed = message_from_bytes(rendered.raw, policy=policy.default)
    assert parsed["Subject"] == rendered.subject
    assert not Quote.objects.exists()  # the sample created one; it is gone
    assert not OutboxEmail.objects.exists()


def test_attachments_and_inline_images_are_listed():
    rendered = previews.render(previews.get("notification/booking.confirmed/customer"))
    files = {(part.filename, part.mimetype) for part in rendered.attachments}
    assert ("ticket-B-1001.png", "image/png") in files
    inline = [part for part in rendered.attachments if part.content_id]
    assert inline and all(part.content_id in rendered.inline for part in inline)
    assert all(f"cid:{part.content_id}" in rendered.html for part in inline)


def test_templates_render_strictly_whatever_the_setting_says(templates, settings):
    settings.KIPEKEE = {**settings.KIPEKEE, "STRICT_TEMPLATES": False}
    templates("mail/otp.subject.txt", "Your code")
    templates("mail/otp.html", "<p>Code {{ code }}, valid {{ minutes }} minutes</p>")
    previews.register_template("mail/otp", sample=lambda: {"code": "123456"})
    with pytest.raises(TemplateError, match=r"mail/otp.html.*\{\{ minutes \}\}"):
        previews.render(previews.get("template/mail/otp"))


def test_a_list_template_is_previewed_with_its_unsubscribe_headers(templates, settings):
    settings.KIPEKEE = {**settings.KIPEKEE, "UNSUBSCRIBE": {"BASE_URL": "https://shop.example"}}
    templates("mail/news.subject.txt", "News for {{ month }}")
    templates("mail/news.html", '<p>{{ month }}</p><a href="{{ unsubscribe_url }}">Leave</a>')
    previews.register_template("mail/news", sample=lambda: {"month": "May"},
                               mailing_list="newsletter")
    rendered = previews.render(previews.get("template/mail/news"))
    headers = dict(rendered.headers)
    assert headers["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert "https://shop.example/kipekee/unsubscribe/" in headers["List-Unsubscribe"]
    assert 'href="https://shop.example/kipekee/unsubscribe/' in rendered.html


def test_a_notification_without_a_sample_says_so():
    register("test.nosample", Message("emails/quote_received", to=lambda q: q.email))
    try:
        preview = previews.get("notification/test.nosample/emails/quote_received")
        assert not preview.has_sample
        with pytest.raises(ConfigurationError, match="no sample"):
            previews.render(preview)
    finally:
        unregister("test.nosample")


def test_register_template_twice_is_an_error(templates):
    previews.register_template("mail/x", sample=dict)
    with pytest.raises(ConfigurationError, match="already"):
        previews.register_template("mail/x", sample=dict)
    previews.register_template("mail/x", sample=dict, replace=True)


# --- manage.py kipekee_render -------------------------------------------------------------

def test_the_command_renders_every_preview():
    out, err = run_render()
    for key in ("notification/quote_request.received/admin",
                "notification/quote_request.received/customer",
                "notification/booking.confirmed/customer",
                "notification/booking.reminder/customer"):
        assert f"ok    {key}" in out, out
    assert "4 of 4 rendered." in out
    # The test app's other templates have no sample: named, not failed.
    assert "no sample: emails/welcome" in err


def test_a_broken_template_fails_the_command_naming_it_and_the_error(templates):
    templates("mail/broken.subject.txt", "Hello {{ name }}")
    templates("mail/broken.html", "<p>{{ name }} owes {{ amount }}</p>")
    previews.register_template("mail/broken", sample=lambda: {"name": "Ann"})
    out = io.StringIO()
    with pytest.raises(CommandError) as failed:
        call_command("kipekee_render", stdout=out, stderr=io.StringIO(), no_color=True)
    assert failed.value.returncode == 1
    assert "template/mail/broken" in str(failed.value)
    line = next(line for line in out.getvalue().splitlines() if line.startswith("FAIL"))
    assert "mail/broken" in line and "TemplateError" in line and "{{ amount }}" in line
    assert "4 of 5 rendered." in out.getvalue()


def test_a_sample_that_raises_fails_the_command(templates):
    def sample() -> dict[str, str]:
        raise LookupError("fixture data missing")

    templates("mail/x.subject.txt", "x")
    templates("mail/x.txt", "x")
    previews.register_template("mail/x", sample=sample)
    with pytest.raises(CommandError, match="template/mail/x"):
        call_command("kipekee_render", "--only", "template/*", stdout=io.StringIO(),
                     stderr=io.StringIO())


def test_require_samples_fails_for_templates_no_preview_covers():
    with pytest.raises(CommandError, match=r"emails/welcome \(no sample\)"):
        call_command("kipekee_render", "--require-samples", stdout=io.StringIO(),
                     stderr=io.StringIO())


def test_only_and_eml(tmp_path):
    out, _ = run_render("--only", "notification/booking.*", "--eml", str(tmp_path))
    assert "2 of 2 rendered." in out
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == ["notification__booking.confirmed__customer.eml",
                       "notification__booking.reminder__customer.eml"]
    parsed = message_from_bytes((tmp_path / written[0]).read_bytes(), policy=policy.default)
    assert parsed["To"] == "ann@example.com"
    with pytest.raises(CommandError, match="Nothing to render"):
        run_render("--only", "nothing/*")


# --- the admin -------------------------------------------------------------------------------

def test_admin_lists_the_previews_and_shows_one(admin_client):
    page = admin_client.get("/admin/kipekee/outboxemail/")
    assert f'href="{PREVIEWS}"'.encode() in page.content  # the list's "Previews" button
    listing = admin_client.get(PREVIEWS)
    assert listing.status_code == 200
    assert b"notification/booking.confirmed/customer" in listing.content
    shown = admin_client.get(PREVIEWS + "show/notification/booking.confirmed/customer")
    assert shown.status_code == 200
    text = shown.content.decode()
    assert "Your ticket" in text or "Queen of Katwe" in text
    assert "ticket-B-1001.png" in text and "bytes on the wire" in text
    assert f'sandbox src="{PREVIEWS}frame/notification/booking.confirmed/customer"' in text


def test_admin_frame_is_sandboxed_with_inline_images(admin_client):
    frame = admin_client.get(PREVIEWS + "frame/notification/booking.confirmed/customer")
    assert frame.status_code == 200
    assert frame["Content-Security-Policy"] == PREVIEW_CSP
    assert b'src="data:image/png;base64,' in frame.content and b"cid:" not in frame.content


def test_admin_shows_a_broken_preview_and_a_404_for_an_unknown_one(admin_client, templates):
    templates("mail/broken.subject.txt", "Hi")
    templates("mail/broken.html", "{{ nope }}")
    previews.register_template("mail/broken", sample=dict)
    page = admin_client.get(PREVIEWS + "show/template/mail/broken")
    assert page.status_code == 200 and b"{{ nope }}" in page.content
    assert admin_client.get(PREVIEWS + "frame/template/mail/broken").status_code == 422
    assert admin_client.get(PREVIEWS + "show/template/no/such").status_code == 404


def test_admin_test_send_goes_through_the_outbox_marked_as_a_test(admin_client, admin_user):
    url = PREVIEWS + "show/notification/quote_request.received/customer"
    response = admin_client.post(url, {"to": "designer@example.com"})
    assert response.status_code == 302
    row = OutboxEmail.objects.get()
    assert row.to == ["designer@example.com"] and row.cc == [] and row.bcc == []
    assert row.subject.startswith("[Test] ") and row.status == "queued" and row.mode == "queue"
    assert row.lane == "transactional"  # a person waits for it
    assert row.metadata == {"preview_test": {
        "preview": "notification/quote_request.received/customer", "by": admin_user.username}}
    assert not Quote.objects.exists()  # the sample's row was rolled back, the email kept


def test_admin_previews_need_permissions(client, django_user_model):
    assert client.get(PREVIEWS).status_code == 302  # to the admin's sign-in
    viewer = django_user_model.objects.create_user("viewer", password="pw", is_staff=True)
    from django.contrib.auth.models import Permission

    viewer.user_permissions.add(Permission.objects.get(codename="view_outboxemail"))
    client.force_login(viewer)
    url = PREVIEWS + "show/notification/booking.confirmed/customer"
    assert client.get(url).status_code == 200
    assert client.post(url, {"to": "x@example.com"}).status_code == 403  # sending: change
    assert not OutboxEmail.objects.exists()


def test_a_test_send_of_list_mail_names_the_tester(admin_client, templates, settings):
    settings.KIPEKEE = {**settings.KIPEKEE, "UNSUBSCRIBE": {"BASE_URL": "https://shop.example"}}
    MailingList.objects.create(key="newsletter", name="News")
    templates("mail/news.subject.txt", "News")
    templates("mail/news.txt", "Leave: {{ unsubscribe_url }}")
    previews.register_template("mail/news", sample=dict, mailing_list="newsletter")
    admin_client.post(PREVIEWS + "show/template/mail/news", {"to": "designer@example.com"})
    row = OutboxEmail.objects.get()
    from kipekee import lists

    token = row.headers["List-Unsubscribe"].split("/unsubscribe/")[1].split("/")[0]
    assert lists.read_token(token) == lists.Subscription("newsletter", "designer@example.com")
    assert row.mailing_list == "newsletter"
