"""kipekee.forms and kipekee.validation: a form that validated never hands Kipekee an
address or a subject it then refuses (the demo's 500s of issue 24)."""

from __future__ import annotations

import hypothesis
import pytest
from django import forms
from django.core.exceptions import ValidationError
from hypothesis import strategies as st

import kipekee
from kipekee.exceptions import InvalidMessage
from kipekee.forms import EmailAddressField, HeaderTextField, validate_address, validate_header_text
from kipekee.validation import check_address, check_header_text

pytestmark = pytest.mark.django_db

LINE_BREAKS = ["\r", "\n", "\r\n", "\v", "\f", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029"]

# What the demo's forms took and Kipekee refused (issue 24), and their neighbours.
ADDRESSES = [
    "ann@example.com", "Ann.Example+tag@Example.CO.TZ", "user@bücher.example",
    "user@xn--bcher-kva.example", "user@bu\u0308cher.example", '"quoted"@example.com',
    '"x y"@example.com', '"x\\ y"@example.com', '"a\vb"@example.com', '"a\fb"@example.com',
    '"a@b"@example.com', "a@exa\u2028mple.com", "a@exa\x85mple.com", "a@[127.0.0.1]",
    "ü@example.com", "a@example.com\r\nBcc: victim@example.com", "x@", "@example.com",
    '"a\x00b"@example.com', "a@example.com\u2028",
]


class Form(forms.Form):
    name = HeaderTextField(max_length=100)
    email = EmailAddressField()


def sends(address: str = "ann@example.com", subject: str = "Hello") -> bool:
    """True if ``kipekee.send`` takes it (written, queued); False on InvalidMessage."""
    try:
        kipekee.send(subject=subject, text="body", to=[address], mode="queue")
    except InvalidMessage:
        return False
    return True


@pytest.fixture
def queue_only(kipekee_settings, smtp_sink):
    from .conftest import smtp_provider

    kipekee_settings(primary=smtp_provider(smtp_sink))


@pytest.mark.parametrize("address", ADDRESSES)
def test_an_address_the_form_accepts_is_one_kipekee_sends_to(queue_only, address):
    form = Form({"name": "Ann", "email": address})
    if form.is_valid():
        assert sends(form.cleaned_data["email"]), address
    else:
        assert list(form.errors) == ["email"]
        assert "Enter a valid email address." in form.errors["email"]


@pytest.mark.parametrize("text", [f"Eve{b}Bcc: victim@example.com" for b in LINE_BREAKS]
                         + ["Zoë Ñandú", "O'Brien \"Bo\" <b>", "Tab\there", "a\x00b"])
def test_a_name_the_form_accepts_can_be_a_subject(queue_only, text):
    form = Form({"name": text, "email": "ann@example.com"})
    if form.is_valid():
        assert sends(subject=f"New quote request from {form.cleaned_data['name']}"), text
    else:
        assert list(form.errors) == ["name"]
    # Every line break Kipekee refuses in a subject, the field refuses in the middle of a
    # name (at the ends, CharField strips it first, as it strips spaces).
    assert form.is_valid() == (not any(b in text for b in LINE_BREAKS + ["\x00"]))


def test_the_refusals_kipekee_makes_are_form_errors():
    # The ones the demo's EmailField/CharField let through and Kipekee refused (500).
    for address in ('"a\vb"@example.com', '"a\fb"@example.com', "a@exa\u2028mple.com"):
        assert forms.EmailField().clean(address)  # Django's field alone takes it
        with pytest.raises(ValidationError):
            EmailAddressField().clean(address)
    for text in ("Eve\u2028Bcc", "Eve\x0bBcc", "Eve\x85Bcc"):
        assert forms.CharField().clean(text)
        with pytest.raises(ValidationError) as error:
            HeaderTextField().clean(text)
        assert [e.code for e in error.value.error_list] == ["line_break"]


def test_the_functions_raise_invalid_message_and_return_the_addr_spec():
    assert check_address("Ann <ann@example.com>") == "ann@example.com"
    with pytest.raises(InvalidMessage):
        check_address("a@exa\u2028mple.com")
    check_header_text("One line")
    with pytest.raises(InvalidMessage):
        check_header_text("two\u2028lines")
    validate_address("ann@example.com")
    validate_header_text("One line")


# Addresses shaped to get past Django's EmailValidator, with the characters that put
# parsers to the test inside: quotes and escapes, every line break, NUL, non-ASCII
# (composed and decomposed), IDNA labels.
_ODD = ["\\", " ", "@", "ü", "\t", "\x00", "\x7f", *LINE_BREAKS]
_ATOM = st.lists(st.sampled_from(["a", "B", "9", "+", "-", "'", "ü", *_ODD]), min_size=1,
                 max_size=5).map("".join)
_QUOTED = st.lists(st.sampled_from(["a", " ", '\\"', "\\\\", "\\ ", *_ODD]), max_size=5).map(
    lambda parts: '"' + "".join(parts) + '"')
_LABEL = st.lists(st.sampled_from(["a", "b", "1", "-", "ü", "u\u0308", "xn--bcher-kva", *_ODD]),
                  min_size=1, max_size=4).map("".join)
_DOMAIN = st.lists(_LABEL, min_size=2, max_size=3).map(".".join)
_NAME = st.lists(st.sampled_from(["Ann", " ", '"', "<", "ü", *_ODD]), max_size=6).map("".join)


@hypothesis.settings(max_examples=500, deadline=None,
                     suppress_health_check=[hypothesis.HealthCheck.function_scoped_fixture])
@hypothesis.given(local=st.one_of(_ATOM, _QUOTED), domain=_DOMAIN, name=_NAME)
def test_whatever_the_form_accepts_kipekee_sends(queue_only, local, domain, name):
    form = Form({"name": name or "x", "email": f"{local}@{domain}"})
    if form.is_valid():
        assert sends(form.cleaned_data["email"], f"From {form.cleaned_data['name']}")
