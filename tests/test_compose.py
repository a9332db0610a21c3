"""Compose: templates → message, Message-ID, attachments — checked on what a real SMTP
server received."""

from __future__ import annotations

import pytest

import kipekee
from kipekee.exceptions import TemplateError
from kipekee.models import OutboxEmail

from .conftest import rows

pytestmark = pytest.mark.django_db(transaction=True)


def test_template_renders_subject_html_and_text(sink_provider):
    receipt = kipekee.send("emails/welcome", to="ann@example.com",
                           context={"name": "Ann <b>", "order": 42})
    assert receipt.sent, receipt
    received = sink_provider.wait_for(1)[0].message
    # Subject and text are not HTML: no escaping there; the HTML part is autoescaped.
    assert received["Subject"] == "Welcome, Ann <b> & friends"
    assert received.get_content_type() == "multipart/alternative"
    text = received.get_body(("plain",)).get_content()
    html = received.get_body(("html",)).get_content()
    assert "Hello Ann <b>, your order 42 is confirmed." in text
    assert "Hello Ann &lt;b&gt;, your order 42" in html
    assert "Nickname: friend" in html  # |default works with a missing variable
    assert "Coupon" not in html  # {% if %} of a missing variable is false


def test_html_only_template_gets_a_text_part_made_from_the_html(sink_provider):
    kipekee.send("emails/htmlonly", to=["bo@example.com"], context={"name": "Bo"})
    received = sink_provider.wait_for(1)[0].message
    # No HTML-only mail (a spam signal, unreadable in text clients): text is generated.
    assert received.get_content_type() == "multipart/alternative"
    assert "<h1>Hi Bo</h1>" in received.get_body(("html",)).get_content()
    assert received.get_body(("plain",)).get_content().strip() == "Hi Bo"


def test_direct_bodies_without_templates(sink_provider):
    kipekee.send(subject="Plain", text="just text", html="<i>html</i>", to=["c@example.com"])
    received = sink_provider.wait_for(1)[0].message
    assert received["Subject"] == "Plain"
    assert received.get_body(("plain",)).get_content().strip() == "just text"
    assert received.get_body(("html",)).get_content().strip() == "<i>html</i>"


def test_missing_template_is_an_error_and_writes_nothing(sink_provider):
    with pytest.raises(TemplateError, match="emails/nope.subject.txt"):
        kipekee.send("emails/nope", to=["a@example.com"])
    with pytest.raises(TemplateError, match="neither emails/nobody.html nor emails/nobody.txt"):
        kipekee.send("emails/nobody", to=["a@example.com"], context={"name": "x"})
    with pytest.raises(TemplateError, match="missingsubject.subject.txt"):
        kipekee.send("emails/missingsubject", to=["a@example.com"])
    with pytest.raises(TemplateError, match="does-not-exist.html"):
        kipekee.send("emails/broken", to=["a@example.com"], context={"name": "x"})
    assert rows() == 0


def test_missing_variable_is_an_error_naming_it(sink_provider):
    with pytest.raises(TemplateError, match=r"\{\{ order \}\}"):
        kipekee.send("emails/welcome", to=["a@example.com"], context={"name": "Ann"})
    assert rows() == 0
    assert sink_provider.messages == []


def test_missing_variable_renders_blank_when_strict_is_off(settings, smtp_sink):
    from .conftest import smtp_provider

    settings.KIPEKEE = {"ENGINE": None, "PROVIDERS": {"p": smtp_provider(smtp_sink)}, "STRICT_TEMPLATES": False}
    receipt = kipekee.send("emails/welcome", to=["a@example.com"], context={"name": "Ann"})
    assert receipt.sent
    assert "your order  is confirmed" in smtp_sink.wait_for(1)[0].message.get_body(("plain",)).get_content()


def test_message_id_is_set_once_in_sender_domain(sink_provider):
    receipt = kipekee.send(subject="Hi", text="x", to=["a@example.com"],
                           from_email="Shop <orders@shop.example>")
    row = OutboxEmail.objects.get(pk=receipt.id)
    assert row.message_id == receipt.message_id
    assert row.message_id.endswith("@shop.example>")
    received = sink_provider.wait_for(1)[0]
    assert received.message["Message-ID"] == row.message_id


def test_caller_message_id_is_kept(sink_provider):
    receipt = kipekee.send(subject="Hi", text="x", to=["a@example.com"],
                           headers={"Message-ID": "<fixed-1@kipekee.test>"})
    assert receipt.message_id == "<fixed-1@kipekee.test>"
    assert sink_provider.wait_for(1)[0].message["Message-ID"] == "<fixed-1@kipekee.test>"


def test_attachments_arrive_intact(sink_provider):
    pdf = bytes(range(256)) * 40
    email = kipekee.Email(subject="CV", text="attached", to=["jobs@example.com"])
    email.attach("cv.pdf", pdf, "application/pdf").attach("notes.txt", "héllo", "text/plain")
    receipt = email.send()
    assert receipt.sent
    received = sink_provider.wait_for(1)[0].message
    parts = {p.get_filename(): p for p in received.iter_attachments()}
    assert parts["cv.pdf"].get_content() == pdf
    assert parts["cv.pdf"].get_content_type() == "application/pdf"
    assert parts["notes.txt"].get_content().strip() == "héllo"
    row = OutboxEmail.objects.get(pk=receipt.id)
    assert [a.filename for a in row.attachments.all()] == ["cv.pdf", "notes.txt"]


def test_cc_bcc_and_reply_to_reach_the_envelope(sink_provider):
    kipekee.send(subject="Team", text="x", to=["a@example.com"], cc=["b@example.com"],
                 bcc=["c@example.com"], reply_to=["help@example.com"])
    received = sink_provider.wait_for(1)[0]
    assert sorted(received.rcpt_tos) == ["a@example.com", "b@example.com", "c@example.com"]
    assert received.message["Reply-To"] == "help@example.com"
    assert received.message["Bcc"] is None  # Bcc is envelope-only
