"""Bad input: a clear exception at the call site and no row written."""

from __future__ import annotations

import django
import hypothesis
import pytest
from django.core.mail import EmailMessage
from django.db import transaction

import kipekee
from kipekee import dispatch
from kipekee.exceptions import InvalidMessage, TemplateError, UnknownProvider

from .conftest import rows

pytestmark = pytest.mark.django_db(transaction=True)

GOOD = {"subject": "Hi", "text": "body", "to": ["ann@example.com"]}


@pytest.mark.parametrize(
    "override, match",
    [
        ({"subject": "Hi\r\nBcc: victim@example.com"}, "subject contains a line break"),
        ({"subject": "Hi\nthere"}, "subject contains a line break"),
        ({"to": ["Ann\r\nBcc: x@example.com <ann@example.com>"]}, "to: Invalid .*line break"),
        ({"to": ["not an address"]}, "to: Invalid address 'not an address'"),
        ({"to": ["ann@@example.com"]}, "to: Invalid address"),
        ({"to": ["a@example.com, b@example.com"]}, "must be a single address"),
        ({"to": ["to@other.com <to@example.com>"]}, "to: Invalid address"),
        ({"to": ["x@"]}, "to: Invalid address 'x@'"),
        ({"to": [42]}, "an address must be a string, not int"),
        ({"cc": ["bad address@example.com"]}, "cc: Invalid address"),
        ({"reply_to": ["x@"]}, "reply_to"),
        ({"from_email": "Shop <shop@example.com>\r\nX-Evil: 1"}, "from_email: Invalid .*line break"),
        ({"headers": {"X-Tag": "a\r\nBcc: x@example.com"}}, "header X-Tag contains a line break"),
        ({"headers": {"Bad Name": "x"}}, "Invalid header name"),
        ({"headers": {"Reply-To": "@"}}, "header Reply-To"),
        ({"to": []}, "no recipients"),
        ({"mode": "later"}, "mode must be one of"),
    ],
)
def test_bad_input_raises_and_writes_nothing(sink_provider, override, match):
    with pytest.raises(InvalidMessage, match=match):
        kipekee.send(**{**GOOD, **override})
    assert rows() == 0


def test_attachment_filename_with_crlf(sink_provider):
    email = kipekee.Email(**GOOD).attach("cv.pdf\r\nContent-Type: text/html", b"x", "application/pdf")
    with pytest.raises(InvalidMessage, match="attachment filename contains a line break"):
        email.send()
    assert rows() == 0


def test_crlf_smuggled_through_template_context(sink_provider):
    with pytest.raises(InvalidMessage, match="subject contains a line break"):
        kipekee.send("emails/welcome", to=["a@example.com"],
                     context={"name": "Ann\r\nBcc: victim@example.com", "order": 1})
    assert rows() == 0


def test_unknown_provider(sink_provider):
    with pytest.raises(UnknownProvider, match="Unknown Kipekee provider 'nope'.*'primary'"):
        kipekee.send(**GOOD, provider="nope")
    assert rows() == 0


def test_naive_send_at(sink_provider):
    import datetime

    with pytest.raises(InvalidMessage, match="aware"):
        kipekee.send(**GOOD, send_at=datetime.datetime(2030, 1, 1))
    assert rows() == 0


def test_bad_input_inside_a_transaction_leaves_earlier_work_alone(sink_provider):
    # The caller's transaction goes on: the good email before the bad one is kept.
    with transaction.atomic():
        kipekee.send(**GOOD)
        with pytest.raises(TemplateError):
            kipekee.send("emails/welcome", to=["a@example.com"], context={})
    assert rows() == 1
    assert len(sink_provider.wait_for(1)) == 1


def test_message_without_any_body_or_template():
    with pytest.raises(InvalidMessage, match="template name, or a subject"):
        kipekee.Email(to=["a@example.com"])
    with pytest.raises(InvalidMessage, match="text and/or html"):
        kipekee.Email(subject="x", to=["a@example.com"])


def test_submit_rejects_non_list_recipients(sink_provider):
    message = EmailMessage("s", "b", "from@example.com", ["to@example.com"])
    message.to = "to@example.com"  # a string sneaked in after construction
    with pytest.raises(InvalidMessage, match="to must be a list"):
        dispatch.submit(message)
    assert rows() == 0


# --- the fast path for plain addresses ------------------------------------------------

_ATOM = "abcXYZ019!#$%&'*+/=?^_`{|}~-"


@hypothesis.settings(max_examples=400, deadline=None)
@hypothesis.given(hypothesis.strategies.text(alphabet=_ATOM + ".@-é \"<>()[]\\,;:", max_size=30))
def test_a_plain_address_is_what_the_header_parser_makes_of_it(address):
    """Whatever the fast path lets through, the stdlib parser (the slow path) reads as
    exactly one mailbox, without defects, whose addr-spec is the address itself; and the
    envelope address the SMTP backend derives is the same."""
    from email.headerregistry import AddressHeader

    from kipekee.message import is_plain_addr_spec, parse_address

    if not is_plain_addr_spec(address):
        return
    parsed = AddressHeader.value_parser(address)
    assert not parsed.all_defects and [m.addr_spec for m in parsed.all_mailboxes] == [address]
    assert parse_address(address) == address


if django.VERSION >= (6, 0):
    # Django 6's SMTP backend has prep_address (5.2 formats addresses another way).

    @hypothesis.settings(max_examples=400, deadline=None)
    @hypothesis.given(hypothesis.strategies.text(alphabet=_ATOM + ".@-éø \"<>()[]\\,;:\r\n",
                                                 max_size=30))
    def test_kipekee_reads_addresses_as_djangos_smtp_backend(address):
        """Kipekee's address check (Django 5.2 included) accepts what Django 6's SMTP backend
        accepts, with the same envelope address; it refuses what Django refuses (and, beyond
        Django, a line break the parser would accept in a quoted local part)."""
        from django.core.mail.backends.smtp import EmailBackend as DjangoSMTP

        from kipekee.message import parse_address

        backend = DjangoSMTP.__new__(DjangoSMTP)  # prep_address reads no attribute
        for force_ascii in (True, False):
            try:
                expected = backend.prep_address(address, force_ascii=force_ascii)
            except (ValueError, IndexError, AttributeError):
                # Django lets the stdlib parser's IndexError ("x@") and AttributeError
                # ("0@[") out; Kipekee says ValueError("Invalid address ...").
                expected = None
            try:
                got = parse_address(address, force_ascii=force_ascii)
            except ValueError:
                got = None
            if got != expected:
                assert got is None and ("\r" in address or "\n" in address), (address, got, expected)


@pytest.mark.parametrize("address", ["0@[", "x@", "a@[1.2"])
def test_what_trips_the_stdlib_parser_is_an_invalid_address(address):
    """The stdlib's header parser raises IndexError or AttributeError on some input (and
    Django's prep_address lets them out): Kipekee says "Invalid address", everywhere."""
    from kipekee.message import check_address, parse_address, validate

    with pytest.raises(ValueError, match="Invalid address"):
        parse_address(address)
    with pytest.raises(InvalidMessage, match="Invalid address"):
        check_address("to", address)
    message = kipekee.Email(**{**GOOD, "headers": {"Reply-To": address}}).build()
    with pytest.raises(InvalidMessage, match="header Reply-To: Invalid address"):
        validate(message)


@pytest.mark.parametrize("address, addr_spec", [
    ("ann@example.com", "ann@example.com"),
    ("Ann <ann@example.com>", "ann@example.com"),
    ('"x y"@example.com', '"x y"@example.com'),  # refused before: a valid quoted local part
    ("ann@exämple.com", "ann@exämple.com"),
    ("nø@example.dk", "nø@example.dk"),  # sent with SMTPUTF8
    ("webmaster", "webmaster"),  # a local mailbox, as Django allows (#15042)
    ('"to@other.com" <to@example.com>', "to@example.com"),
])
def test_check_address(address, addr_spec):
    from django.utils.translation import gettext_lazy

    from kipekee.message import check_address

    assert check_address("to", address) == addr_spec
    assert check_address("to", gettext_lazy(address)) == addr_spec  # refused before


@pytest.mark.parametrize("text, ok", [("Ann O'Brien", True), ("Ann\r\nBcc: x@example.com", False),
                                      ("a\u2028b", False), ("nul\x00", False)])
def test_check_header_text(text, ok):
    from kipekee.message import check_header_text

    if ok:
        assert check_header_text("name", text) == text
    else:
        with pytest.raises(InvalidMessage, match="^name contains"):
            check_header_text("name", text)


def test_an_unusual_but_valid_address_is_accepted_and_sent(sink_provider):
    receipt = kipekee.send(**{**GOOD, "to": ['"x y"@example.com', "webmaster"]})
    assert receipt.sent
    assert sink_provider.wait_for(1)[0].rcpt_tos == ('"x y"@example.com', "webmaster")


@pytest.mark.parametrize("address", ["ann@example.com", "a.b+tag@mail.example.org",
                                     "O'Brien@Example.COM", "x_y-z@sub-1.example.io"])
def test_plain_addresses_take_the_fast_path(address):
    from kipekee.message import check_address, is_plain_addr_spec

    assert is_plain_addr_spec(address) and check_address("to", address) == address


@pytest.mark.parametrize("address", ["a..b@example.com", "a.@example.com", "a@example",
                                     "a@-x.example.com", "Ann <ann@example.com>",
                                     "ann@exämple.com", "ann@example.com.", "\"a b\"@example.com"])
def test_anything_else_goes_to_the_parser(address):
    from kipekee.message import is_plain_addr_spec

    assert not is_plain_addr_spec(address)


@pytest.mark.postgres
def test_a_refused_insert_inside_the_callers_transaction_leaves_it_usable(sink_provider):
    """Inside the caller's transaction the row is written under a savepoint: the database
    refusing it (a Message-ID longer than its column, on PostgreSQL) raises at the call
    site and the caller's own work goes on. In autocommit (no savepoint: the transaction
    is the enqueue's own) it raises too and writes nothing."""
    from django.db import DataError

    too_long = {"Message-ID": f"<{'x' * 300}@example.com>"}
    with transaction.atomic():
        first = kipekee.send(**GOOD, mode="queue")
        with pytest.raises(DataError):
            kipekee.send(**GOOD, headers=too_long, mode="queue")
        second = kipekee.send(**GOOD, mode="queue")
    assert rows() == 2 and first.id != second.id
    with pytest.raises(DataError):
        kipekee.send(**GOOD, headers=too_long, mode="queue")
    assert rows() == 2


# --- Bcc as a header (issue 17, loose end d) ----------------------------------------------

BCC_REFUSED = ('Bcc is not a valid email header. Use the "bcc" argument to specify blind '
               "carbon copy recipients.")


@pytest.mark.parametrize("name", ["Bcc", "bcc", "BCC"])
def test_a_bcc_header_is_refused_at_the_call_site(sink_provider, name):
    """As Django 6.1 does (``EmailMessage.message()`` raises this ValueError): a Bcc
    header would be written into the message every recipient sees, and its address would
    get nothing (the envelope takes ``bcc=``). Django 5.2 and 6.0 sent it that way; Kipekee
    refuses it on every version, when the message is written, with Django 6.1's words."""
    with pytest.raises(InvalidMessage) as raised:
        kipekee.send(**GOOD, headers={name: "hidden@example.com"})
    assert str(raised.value) == BCC_REFUSED and isinstance(raised.value, ValueError)
    assert rows() == 0


def test_a_bcc_header_through_the_drop_in_backend_is_refused(sink_provider, settings):
    from django.core.mail import EmailMessage

    settings.EMAIL_BACKEND = "kipekee.backend.EmailBackend"
    message = EmailMessage("Hi", "body", "shop@example.com", ["ann@example.com"],
                           headers={"Bcc": "hidden@example.com"})
    with pytest.raises(ValueError, match="Bcc is not a valid email header"):
        message.send()
    assert rows() == 0 and sink_provider.messages == []
