"""Templates, CSS inlining, text from HTML, language, inline images and QR codes — checked
on the MIME a real SMTP server received."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from django.template import Context, Template
from django.utils import translation

import kipekee
from kipekee.compose import html_to_text
from kipekee.exceptions import TemplateError
from kipekee.models import OutboxEmail
from kipekee.qr import png_size, qr_attachment, qr_png

from .conftest import rows
from .mime import decode_qr, tree

pytestmark = pytest.mark.django_db(transaction=True)

QUOTE = {"name": "Amina", "email": "amina@example.com", "trip": "Kilimanjaro Trek", "pk": 7}
SHOW = datetime(2026, 12, 7, 19, 30, tzinfo=UTC)  # a Monday
BOOKING = {"number": "BK-1042", "film": "Sarafina", "seat": "F7", "starts_at": SHOW}
TICKET = "BOOKING:BK-1042;SEAT:F7"


def test_base_layout_with_css_inlined_and_text_made_from_html(sink_provider):
    receipt = kipekee.send("emails/quote_received", to=["amina@example.com"],
                           context={"quote": QUOTE})
    assert receipt.sent, receipt
    received = sink_provider.wait_for(1)[0].message
    assert tree(received) == ("multipart/alternative", ["text/plain", "text/html"])
    html = received.get_body(("html",)).get_content()
    # The base layout's <style> rules are now style attributes; the <style> block is gone.
    assert "<style" not in html
    assert '<h1 style="color: #0b5394;font-size: 22px;">Yes, Amina</h1>' in html
    assert '<p class="muted" style="color: #888888;">Kipekee Tours &amp; Cinema</p>' in html
    assert '<td class="qty" style="text-align: right;">2</td>' in html
    text = received.get_body(("plain",)).get_content()
    # A layout, not stripped tags: the table keeps its columns, the link its address, and
    # the hidden preheader is left out.
    assert "Yes, Amina" in text
    assert "[Kilimanjaro Trek](https://tours.example/trips/kilimanjaro-trek)" in text
    lines = [line.split() for line in text.splitlines()]
    assert ["Trip", "People"] in lines and ["Kilimanjaro", "Trek", "2"] in lines
    assert "We got your request" not in text
    assert "<" not in text and "&amp;" not in text and "Kipekee Tours & Cinema" in text


def test_a_text_template_wins_over_the_generated_text(sink_provider):
    kipekee.send("emails/welcome", to=["a@example.com"], context={"name": "Ann", "order": 1})
    text = sink_provider.wait_for(1)[0].message.get_body(("plain",)).get_content()
    assert text.strip() == "Hello Ann, your order 1 is confirmed."


def test_html_to_text_escapes_nothing_and_keeps_entities_decoded():
    assert html_to_text("<p>Fish &amp; chips &lt;3</p><p>Next</p>") == "Fish & chips <3\n\nNext\n"


@pytest.mark.parametrize(("language", "yes", "monday"), [
    ("de", "Ja", "Montag"), ("fr", "Oui", "lundi"), ("sw", "Ndiyo", "Jumatatu"),
])
def test_rendered_in_the_recipients_language(sink_provider, language, yes, monday):
    before = translation.get_language()
    email = kipekee.Email("emails/quote_received", to=["amina@example.com"],
                          context={"quote": QUOTE}, language=language)
    email.send()
    assert translation.get_language() == before  # the override ends with the rendering
    received = sink_provider.wait_for(1)[0].message
    assert received["Subject"] == f"Kilimanjaro Trek: {yes}"
    assert f"<h1 style=\"color: #0b5394;font-size: 22px;\">{yes}, Amina</h1>" in \
        received.get_body(("html",)).get_content()
    assert f'<html lang="{language}">' in received.get_body(("html",)).get_content()
    # Dates too: Django's own translations of day names.
    booking = kipekee.Email("emails/booking_confirmed", to=["b@example.com"], language=language,
                            context={"booking": BOOKING, "ticket": TICKET})
    _, text, _ = booking.render()
    assert text is not None and monday in text


def test_inline_qr_and_logo_are_related_parts_with_matching_content_ids(sink_provider):
    email = kipekee.Email("emails/booking_confirmed", to=["sam@example.com"],
                          context={"booking": BOOKING, "ticket": TICKET})
    email.attach(*qr_attachment(TICKET, "ticket-BK-1042.png"))
    email.attach("terms.pdf", b"%PDF-1.4 terms", "application/pdf")
    receipt = email.send()
    assert receipt.sent, receipt
    received = sink_provider.wait_for(1)[0].message
    # mixed( alternative( text, related( html, images ) ), attachments )
    assert tree(received) == ("multipart/mixed", [
        ("multipart/alternative", [
            "text/plain",
            ("multipart/related", ["text/html", "image/png", "image/png"]),
        ]),
        "image/png",
        "application/pdf",
    ])
    related = received.get_payload()[0].get_payload()[1]
    html_part, *images = related.get_payload()
    html = html_part.get_content()
    by_cid = {img["Content-ID"].strip("<>"): img for img in images}
    assert len(by_cid) == 2
    for cid, image in by_cid.items():
        assert f'src="cid:{cid}"' in html
        assert image.get_content_disposition() == "inline"
    # The logo appears twice in the HTML but travels once.
    logo_cid = next(c for c, i in by_cid.items() if i.get_filename() == "logo.png")
    assert html.count(f"cid:{logo_cid}") == 2
    qr = next(i for i in images if i.get_filename() == "qr-code.png")
    assert decode_qr(qr.get_content()) == TICKET
    assert 'alt="Your ticket"' in html and "data:" not in html
    assert f'<img src="cid:{logo_cid}" alt="Kipekee Cinema" width="40">' in html
    # The ticket attachment is a regular attachment that decodes to the same booking.
    attachments = {p.get_filename(): p for p in received.iter_attachments()}
    assert attachments["ticket-BK-1042.png"].get_content_disposition() == "attachment"
    assert decode_qr(attachments["ticket-BK-1042.png"].get_content()) == TICKET
    assert attachments["terms.pdf"].get_content() == b"%PDF-1.4 terms"
    stored = OutboxEmail.objects.get(pk=receipt.id).attachments.all()
    assert sorted(bool(a.content_id) for a in stored) == [False, False, True, True]


def test_inline_image_without_other_attachments_has_no_mixed_part(sink_provider):
    email = kipekee.Email(subject="Logo", html="<p>x</p>", to=["a@example.com"])
    cid = email.attach_inline("dot.png", qr_png("dot", scale=1), "image/png")
    assert email.attach_inline("again.png", qr_png("dot", scale=1), "image/png") == cid
    email.html = f'<p><img src="cid:{cid}" alt="dot"></p>'
    email.send()
    received = sink_provider.wait_for(1)[0].message
    assert tree(received) == ("multipart/alternative", [
        "text/plain", ("multipart/related", ["text/html", "image/png"]),
    ])
    image = received.get_payload()[1].get_payload()[1]
    assert image["Content-ID"] == f"<{cid}>"
    assert decode_qr(image.get_content()) == "dot"


def test_qr_png_is_a_png_of_the_requested_scale():
    small, large = qr_png("KIPEKEE", scale=2), qr_png("KIPEKEE", scale=8)
    assert decode_qr(small) == decode_qr(large) == "KIPEKEE"
    assert png_size(large)[0] == 4 * png_size(small)[0]
    with pytest.raises(ValueError, match="needs data"):
        qr_png("")


def test_qr_tag_outside_an_email_is_an_error():
    with pytest.raises(TemplateError, match="only in a template rendered by kipekee"):
        Template("{% load kipekee %}{% qr_code 'x' %}").render(Context())


def test_qr_tag_with_a_missing_variable_fails_at_enqueue(sink_provider):
    with pytest.raises(TemplateError, match="qr_missing.html"):
        kipekee.send("emails/qr_missing", to=["a@example.com"], context={})
    assert rows() == 0


def test_rendering_twice_adds_no_duplicate_parts(sink_provider):
    email = kipekee.Email("emails/booking_confirmed", to=["sam@example.com"],
                          context={"booking": BOOKING, "ticket": TICKET})
    email.render()
    email.render()
    assert len(email.build().attachments) == 2  # the QR and the logo, once each


def test_django_message_with_an_inline_part_through_the_drop_in_backend(settings, sink_provider):
    # A project's own EmailMultiAlternatives with a Content-ID part (the way Django's docs
    # embed images) arrives with the image next to the HTML, on Django 5.2 and 6.x alike.
    from django.core.mail import EmailMultiAlternatives

    from kipekee.message import inline_part

    settings.EMAIL_BACKEND = "kipekee.backend.EmailBackend"
    message = EmailMultiAlternatives("Ticket", "see the code", "cinema@example.com",
                                     ["ann@example.com"])
    message.attach_alternative('<img src="cid:qr-1@cinema.example">', "text/html")
    message.attach(inline_part("qr.png", qr_png(TICKET), "image/png", "qr-1@cinema.example"))
    message.attach("receipt.txt", "paid", "text/plain")
    assert message.send() == 1
    received = sink_provider.wait_for(1)[0].message
    assert tree(received) == ("multipart/mixed", [
        ("multipart/alternative", [
            "text/plain", ("multipart/related", ["text/html", "image/png"]),
        ]),
        "text/plain",
    ])
    image = received.get_payload()[0].get_payload()[1].get_payload()[1]
    assert image["Content-ID"] == "<qr-1@cinema.example>"
    assert decode_qr(image.get_content()) == TICKET
