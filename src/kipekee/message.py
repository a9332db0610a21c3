"""A Django ``EmailMessage`` checked, and turned into an outbox row and back.

Every path into the outbox — ``kipekee.send``, the ``Email`` builder and the drop-in
``EMAIL_BACKEND`` — ends in :func:`validate` and :func:`to_fields`, so bad input is refused
the same way everywhere, before anything is written. Delivery rebuilds the message with
:func:`from_row`.

Two public checks, for forms and other code that wants to know before sending:

- :func:`check_address`: one address, as Kipekee will accept it;
- :func:`check_header_text`: text that goes into a header (a subject, a name).

Addresses follow Django's SMTP backend (``prep_address`` of Django 6.x), on every Django
version: ``a@example.com``, ``Name <a@example.com>``, quoted local parts
(``"a b"@example.com``), internationalised domains, a local mailbox without a domain
(``webmaster``, Django #15042), lazy translation strings. Kipekee also accepts a non-ASCII
local part (``nø@example.dk``): it needs SMTPUTF8 on the way out, and the SMTP backend
refuses it before ``MAIL FROM`` when the server does not offer it. Anything else — two
addresses in one string, ``to@other.com <to@example.com>``, a line break — is refused.
"""

from __future__ import annotations

import copy
import email.message
import email.policy
import functools
import mimetypes
import re
from dataclasses import dataclass
from email import encoders
from email.errors import HeaderParseError, NonASCIILocalPartDefect
from email.headerregistry import Address, AddressHeader
from email.mime.base import MIMEBase
from email.utils import make_msgid
from typing import TYPE_CHECKING, Any

import django
from django.conf import settings
from django.core.mail import EmailMessage, EmailMultiAlternatives
from django.core.mail.utils import DNS_NAME
from django.utils.encoding import force_str, punycode
from django.utils.functional import Promise

from .exceptions import InvalidMessage

if django.VERSION < (6, 0):
    # Django 5.2's email.mime class (deprecated on Django 6, to be removed).
    from django.core.mail.message import SafeMIMEMultipart

if TYPE_CHECKING:
    from .models import OutboxEmail

# RFC 5322 field name: printable US-ASCII except colon.
_HEADER_NAME = re.compile(r"^[!-9;-~]+$")
# RFC 2045 type/subtype: tokens of printable ASCII without specials or spaces.
_MIMETYPE = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`{|}~-]+/[A-Za-z0-9!#$%&'*+.^_`{|}~-]+$")
_ADDRESS_HEADERS = {"to", "cc", "reply-to", "from", "sender"}


@dataclass(frozen=True, kw_only=True)
class StoredAttachment:
    filename: str
    mimetype: str
    content: bytes
    content_id: str = ""


def validate(message: EmailMessage) -> None:
    """Raise ``InvalidMessage`` naming the first problem; return quietly if there is none."""
    check_header_text("subject", message.subject)
    from_email = message.from_email or settings.DEFAULT_FROM_EMAIL
    check_address("from_email", from_email)
    for field in ("to", "cc", "bcc", "reply_to"):
        value = getattr(message, field, [])
        if isinstance(value, (str, Promise)):
            raise InvalidMessage(f"{field} must be a list of addresses, not a string.")
        for address in value:
            if address in ("", None):
                continue  # Django leaves empty entries out (EmailMessage.recipients())
            check_address(field, address)
    if not message.recipients():
        raise InvalidMessage("The message has no recipients (to, cc and bcc are empty).")
    for name, value in (message.extra_headers or {}).items():
        if not isinstance(name, str) or not _HEADER_NAME.match(name):
            raise InvalidMessage(f"Invalid header name {name!r}.")
        if name.lower() == "bcc":
            # Django 6.1's words and type (a ValueError from message()); 5.2 and 6.0
            # wrote the header where every recipient sees it, and its address got nothing.
            raise InvalidMessage('Bcc is not a valid email header. Use the "bcc" argument '
                                 "to specify blind carbon copy recipients.")
        if name.lower() in _ADDRESS_HEADERS:
            for address in _split_addresses(force_str(value)):
                check_address(f"header {name}", address)
        else:
            check_header_text(f"header {name}", value)
    for attachment in message.attachments:
        if isinstance(attachment, (MIMEBase, email.message.Message)):
            filename = attachment.get_filename() or ""
        else:
            filename = attachment[0] or ""
            mimetype = attachment[2]
            # Without this, "text/plain\r\nBcc: …" or "a b/c" was stored and only failed
            # (or went out malformed) at delivery.
            if mimetype and not _MIMETYPE.match(force_str(mimetype)):
                raise InvalidMessage(
                    f"Attachment {filename!r}: invalid MIME type {mimetype!r} (want type/subtype)."
                )
        check_header_text("attachment filename", filename)


# Every character str.splitlines() breaks on: the email package (Django 6's modern policy,
# and its header parser on Django 5.2) treats them as line ends too, so a value holding
# one would be accepted into the outbox and then refused at delivery, or worse.
_LINE_BREAKS = re.compile("[\r\n\v\f\x1c\x1d\x1e\x85\u2028\u2029]")


def check_header_text(field: str, value: Any) -> str:
    """Check text meant for a header (a subject, a display name, a header's value).

    Return it as ``str`` (lazy translation strings are fine); raise ``InvalidMessage``
    (a ``ValueError``) if it holds a line break or a NUL: a CR/LF in user data would
    otherwise let it add headers (``Bcc:``) to the email.
    """
    text = force_str(value)
    if _LINE_BREAKS.search(text):
        raise InvalidMessage(f"{field} contains a line break (CR/LF), refused: {text!r}")
    if "\x00" in text:
        raise InvalidMessage(f"{field} contains a NUL character, refused: {text!r}")
    return text


# The name of this check before it was public (kept for code that calls it).
_check_text = check_header_text


# What the stdlib's header parser raises on some malformed input, besides its own
# HeaderParseError: IndexError ("x@"), AttributeError ("0@[", Python 3.11 to 3.13).
_PARSER_ERRORS = (HeaderParseError, IndexError, ValueError, AttributeError)


def _split_addresses(value: str) -> list[str]:
    try:
        parsed = AddressHeader.value_parser(value)
    except _PARSER_ERRORS:
        return [value]  # check_address reports it
    return [str(mb) for mb in parsed.all_mailboxes] or [value]


# A bare ASCII addr-spec: a dot-atom local part (RFC 5322 3.4.1) and a hostname. The
# header parser returns such an address unchanged, at some 30 times the cost of this
# match (most addresses an app sends to look like this, each one new to the caches).
_PLAIN_ADDR_SPEC = re.compile(
    r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
    r"@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)+"
)


def is_plain_addr_spec(address: str) -> bool:
    """True for ``local@example.com`` forms that need no parsing (no name, no quoting,
    no comments, ASCII only): they are their own addr-spec and envelope address."""
    return _PLAIN_ADDR_SPEC.fullmatch(address) is not None


def check_address(field: str, address: Any) -> str:
    """Check one address as Kipekee will accept it for sending; return its addr-spec.

    ``a@example.com``, ``Name <a@example.com>``, ``"a b"@example.com``, ``a@exämple.com``,
    ``nø@example.dk`` (sent with SMTPUTF8), ``webmaster`` (a local mailbox, as Django
    allows) and lazy translation strings pass. Raise ``InvalidMessage`` (a ``ValueError``)
    for anything else: not one address, a line break, a malformed address. The addr-spec
    returned keeps a Unicode domain as given (the SMTP envelope punycodes it).

    A form that wants a full address with a domain checks ``"@" in`` the result (or uses
    Django's ``EmailField``, which is stricter than email itself).
    """
    if not isinstance(address, (str, Promise)):
        raise InvalidMessage(
            f"{field}: an address must be a string, not {type(address).__name__}.")
    try:
        return parse_address(force_str(address), force_ascii=False)
    except ValueError as exc:
        raise InvalidMessage(f"{field}: {exc}") from None


@functools.lru_cache(maxsize=4096)
def parse_address(address: str, *, force_ascii: bool = True) -> str:
    """The addr-spec of one address, as Django 6's SMTP backend reads it (``prep_address``).

    Raise ``ValueError("Invalid address ...")`` for invalid addresses, line breaks, and
    anything that is not exactly one mailbox. A local mailbox without a domain is valid.
    With ``force_ascii`` (the SMTP envelope without SMTPUTF8) a non-ASCII domain is
    IDNA-encoded and a non-ASCII local part is invalid; without it both stay Unicode.

    Cached: the same sender (and often the same recipients) on every message, and the
    header parser costs about 0.1 ms a call. Invalid addresses raise, and are not cached.
    """
    if is_plain_addr_spec(address):
        return address  # each recipient is new to the cache: skip the parser
    if _LINE_BREAKS.search(address) or "\x00" in address:
        raise ValueError(f"Invalid address {address!r}: contains a line break or a NUL")
    try:
        parsed = AddressHeader.value_parser(address)
    except _PARSER_ERRORS as exc:
        raise ValueError(f"Invalid address {address!r}: {exc or 'unparsable'}") from None
    defects = sorted({
        str(defect) for defect in parsed.all_defects
        # Django allows local mailboxes like "From: webmaster" (#15042).
        if str(defect) != "addr-spec local part with no domain"
        # Valid with SMTPUTF8; decided below.
        and not isinstance(defect, NonASCIILocalPartDefect)
    })
    if defects:
        raise ValueError(f"Invalid address {address!r}: {'; '.join(defects)}")
    mailboxes = parsed.all_mailboxes
    if len(mailboxes) != 1:
        raise ValueError(f"Invalid address {address!r}: must be a single address")
    mailbox = mailboxes[0]
    local_part = mailbox.local_part or ""
    if not local_part:
        raise ValueError(f"Invalid address {address!r}: no local part")
    if not force_ascii:
        return str(mailbox.addr_spec)
    if not local_part.isascii():
        raise ValueError(f"Invalid address {address!r}: local-part contains non-ASCII characters")
    if mailbox.domain and not mailbox.domain.isascii():
        return str(Address(username=local_part, domain=punycode(mailbox.domain)))
    return str(mailbox.addr_spec)


def to_fields(message: EmailMessage) -> tuple[dict[str, Any], list[StoredAttachment]]:
    """The outbox row's fields (without status) and attachments for a validated message."""
    alternatives = [
        {"content": force_str(content), "mimetype": mimetype}
        for content, mimetype in getattr(message, "alternatives", [])
    ]
    headers = {str(k): force_str(v) for k, v in (message.extra_headers or {}).items()}
    fields = {
        # force_str: lazy translation strings are valid addresses (Django #24416).
        "from_email": force_str(message.from_email or settings.DEFAULT_FROM_EMAIL),
        "to": _address_list(message.to),
        "cc": _address_list(message.cc),
        "bcc": _address_list(message.bcc),
        "reply_to": _address_list(message.reply_to),
        "subject": force_str(message.subject),
        "body": force_str(message.body),
        "content_subtype": message.content_subtype,
        "alternatives": alternatives,
        "headers": headers,
    }
    return fields, [_store_attachment(a) for a in message.attachments]


def _address_list(addresses: Any) -> list[str]:
    # Django leaves empty entries out of the recipients (EmailMessage.recipients()).
    return [force_str(address) for address in addresses if address not in ("", None)]


def _store_attachment(attachment: Any) -> StoredAttachment:
    if isinstance(attachment, (MIMEBase, email.message.Message)):
        payload = attachment.get_payload(decode=True)
        if not isinstance(payload, bytes):
            raise InvalidMessage("Multipart MIME attachments are not supported; attach files.")
        cid = (attachment.get("Content-ID") or "").strip("<> ")
        return StoredAttachment(
            filename=attachment.get_filename() or "",
            mimetype=attachment.get_content_type(),
            content=payload,
            content_id=cid,
        )
    filename, content, mimetype = attachment
    if isinstance(content, str):
        content = content.encode("utf-8")
    if not isinstance(content, bytes):
        raise InvalidMessage(f"Attachment {filename!r}: content must be bytes or str.")
    if not mimetype:
        mimetype = mimetypes.guess_type(filename or "")[0] or "application/octet-stream"
    return StoredAttachment(filename=filename or "", mimetype=mimetype, content=content)


def make_message_id(from_email: str, domain: str | None = None) -> str:
    """A new Message-ID in the sender's domain (or ``domain``), as RFC 5322 asks."""
    return make_msgid(domain=domain or _sender_domain(from_email))


@functools.lru_cache(maxsize=256)
def _sender_domain(from_email: str) -> str:
    # Cached: an app sends from a handful of addresses, and parsing one costs some
    # 45 µs, a tenth of an enqueue.
    parsed = AddressHeader.value_parser(from_email).all_mailboxes
    return punycode(parsed[0].domain) if parsed and parsed[0].domain else DNS_NAME.get_fqdn()


def from_row(row: OutboxEmail) -> RelatedMessage:
    """Rebuild the Django message that was enqueued, ready for any email backend."""
    message = RelatedMessage(
        subject=row.subject,
        body=row.body,
        from_email=row.from_email,
        to=row.to,
        cc=row.cc,
        bcc=row.bcc,
        reply_to=row.reply_to,
        headers={**row.headers, "Message-ID": row.message_id},
    )
    message.content_subtype = row.content_subtype
    for alternative in row.alternatives:
        message.attach_alternative(alternative["content"], alternative["mimetype"])
    for attachment in row.attachments.all():
        content = bytes(attachment.content)
        if attachment.content_id:
            message.attach(inline_part(attachment.filename, content, attachment.mimetype,
                                       attachment.content_id))
        else:
            message.attach(attachment.filename or None, content, attachment.mimetype)
    return message


def inline_part(filename: str, content: bytes, mimetype: str, content_id: str) -> Any:
    """A MIME part for ``<img src="cid:{content_id}">``, in the form this Django takes."""
    maintype, _, subtype = mimetype.partition("/")
    if django.VERSION >= (6, 0):
        # Django 6 takes modern MIMEPart attachments (MIMEBase ones are deprecated).
        part = email.message.MIMEPart()
        part.set_content(content, maintype=maintype, subtype=subtype or "octet-stream",
                         disposition="inline", filename=filename or None, cid=f"<{content_id}>")
        return part
    legacy = MIMEBase(maintype, subtype or "octet-stream")
    legacy.set_payload(content)
    encoders.encode_base64(legacy)
    legacy.add_header("Content-ID", f"<{content_id}>")
    if filename:
        legacy.add_header("Content-Disposition", "inline", filename=filename)
    else:
        legacy.add_header("Content-Disposition", "inline")
    return legacy


def is_inline(attachment: Any) -> bool:
    """An attachment that is a MIME part with a Content-ID: an inline image of the HTML."""
    return isinstance(attachment, (MIMEBase, email.message.Message)) and bool(
        attachment.get("Content-ID")
    )


#: Headers whose values are lists of <URI>s (RFC 2369, 8058, 2919).
URI_LIST_HEADERS = frozenset({"list-unsubscribe", "list-unsubscribe-post", "list-id",
                              "list-help", "list-subscribe", "list-post", "list-owner",
                              "list-archive"})
_BETWEEN_URIS = re.compile(r",\s*(?=<)")


class _URIListPolicy(email.policy.EmailPolicy):
    """Django 6's email policy, except that list headers are folded only between their
    ``<URI>``s and never as encoded words.

    The modern policy folds an unstructured header at 78 characters and, finding a word
    longer than that (a one-click unsubscribe URL with its signed token), writes it as
    ``=?utf-8?q?…?=`` words: valid MIME, but no mail client reads that as a link, and
    Gmail shows no unsubscribe button. RFC 5322 lets a line run to 998 characters; the
    legacy policy of Django 5.2 already leaves such a word whole.
    """

    def fold(self, name: str, value: Any) -> str:
        folded = self._fold_uris(name, str(value))
        return super().fold(name, value) if folded is None else folded

    def fold_binary(self, name: str, value: Any) -> bytes:
        folded = self._fold_uris(name, str(value))
        return super().fold_binary(name, value) if folded is None else folded.encode("ascii")

    def _fold_uris(self, name: str, value: str) -> str | None:
        if name.lower() not in URI_LIST_HEADERS or not value.isascii():
            return None
        parts = _BETWEEN_URIS.split(" ".join(value.split()))
        lines = [f"{name}: {parts[0]}"]
        for part in parts[1:]:
            lines[-1] += ","
            if len(lines[-1]) + 1 + len(part) <= (self.max_line_length or 998):
                lines[-1] += " " + part
            else:
                lines.append(" " + part)
        if any(len(line) > 998 for line in lines):
            return None  # too long for any line: the email package's own folding
        return self.linesep.join(lines) + self.linesep


def _keep_uri_lists(policy: Any) -> Any:
    """``policy`` (Django 6's ``message(policy=…)``) as a :class:`_URIListPolicy`."""
    if isinstance(policy, _URIListPolicy) or not isinstance(policy, email.policy.EmailPolicy):
        return policy
    return _URIListPolicy(**vars(policy))


class RelatedMessage(EmailMultiAlternatives):
    """An ``EmailMultiAlternatives`` that puts inline parts next to the HTML they illustrate.

    Django puts every attachment, inline or not, into one ``multipart/mixed`` (and Django 6
    refuses the old ``mixed_subtype = "related"`` trick, which also put the PDF tickets
    into the related part, where some clients hide them). This builds the tree that
    Thunderbird and Apple Mail send and the stdlib's email docs show::

        multipart/mixed                  (only when there are regular attachments)
          multipart/alternative
            text/plain
            multipart/related
              text/html                  <img src="cid:qr-1@kipekee">
              image/png                  Content-ID: <qr-1@kipekee>
          application/pdf                (regular attachments)

    :meth:`message` lets Django build the message without the inline parts, then moves
    its HTML part into a ``multipart/related`` with them, through the email package's
    public API: Django's private builders are not touched. With no HTML part (a text-only
    message, or an empty HTML body next to attachments), inline parts are attachments
    like any other, as Django sends them. The inline parts stay in ``attachments`` (MIME
    parts with a Content-ID), so HTTP-API backends such as django-anymail find them there
    and send them as inline images. ``kipekee.wire`` builds the same bytes directly.

    On Django 6, a message always carries ``MIME-Version: 1.0`` at the top: Django 6 (with
    the stdlib's modern email API, CPython issues 91297 and 120946) leaves it out when the
    body is empty and there are alternatives or attachments; RFC 2045 section 4 requires it.
    """

    attachments: list[Any]

    def related_parts(self) -> tuple[list[Any], list[Any]]:
        """``(inline, others)``: the inline parts that go next to the HTML part, and the
        attachments Django builds as it always does. ``inline`` is empty when the message
        has no HTML part for them."""
        inline = [a for a in self.attachments if is_inline(a)]
        if not inline:
            return [], self.attachments
        others = [a for a in self.attachments if not is_inline(a)]
        # Django builds the body part when there is a body, or neither alternatives nor
        # attachments (here: the attachments left without the inline parts).
        has_body = bool(self.body) or not (self.alternatives or others)
        html_body = has_body and str(self.content_subtype).lower() == "html"
        if html_body or any(str(m).lower() == "text/html" for _, m in self.alternatives):
            return inline, others
        return [], self.attachments

    def message(self, **kwargs: Any) -> Any:
        if django.VERSION >= (6, 0):
            # List-Unsubscribe's <URI>s folded between them, never RFC 2047-encoded.
            kwargs["policy"] = _keep_uri_lists(kwargs.get("policy", email.policy.default))
        inline, others = self.related_parts()
        if not inline:
            return _with_mime_version(super().message(**kwargs))
        bare = copy.copy(self)
        bare.attachments = others
        built = super(RelatedMessage, bare).message(**kwargs)
        if django.VERSION >= (6, 0):
            html = built.get_body(("html",))
            assert html is not None  # inline parts come with an HTML body (related_parts)
            # Content-* headers move down into a new part; the rest stay (on the top
            # part: MIME-Version, Subject…, with the new Content-Type after them).
            html.make_related()
            if html is built:
                # The message's own Content-* headers (Content-Language…) moved down
                # too: they go back up.
                moved: Any = built.get_payload(0)
                for name in dict.fromkeys(n.lower() for n in self.extra_headers):
                    if name.startswith("content-") and name in moved:
                        values = moved.get_all(name)
                        del moved[name]
                        for value in values:
                            built[value.name] = value
            for part in inline:
                html.attach(part)
            return _with_mime_version(built)
        return _related_legacy(built, inline, self.encoding or settings.DEFAULT_CHARSET)


def _with_mime_version(built: Any) -> Any:
    # Django 5.2's email.mime classes always set it.
    if "MIME-Version" not in built:
        built["MIME-Version"] = "1.0"
    return built


def _related_legacy(built: Any, inline: list[Any], encoding: str) -> Any:
    """Django 5.2: the HTML part of ``built`` (email.mime objects) in a multipart/related
    with the inline parts; the message itself when the HTML part is its root."""
    def related(html: Any) -> Any:
        wrapper = SafeMIMEMultipart(_subtype="related", encoding=encoding)
        wrapper.attach(html)
        for part in inline:
            wrapper.attach(part)
        return wrapper

    mixed = built.get_content_type() == "multipart/mixed"
    body = built.get_payload(0) if mixed else built
    if body.get_content_type() == "multipart/alternative":
        parts = body.get_payload()
        html_at = next(i for i, p in enumerate(parts) if p.get_content_type() == "text/html")
        parts[html_at] = related(parts[html_at])
    elif mixed:
        built.get_payload()[0] = related(body)
    else:
        # The HTML part is the message: the wrapper becomes the message, and takes the
        # headers Django set after building the part (Subject, From…). The part keeps
        # the three it was built with (Content-Type, MIME-Version,
        # Content-Transfer-Encoding). The values are already encoded (and folded): the
        # email package's own __setitem__ stores them as they are, where Django's
        # SafeMIME override would encode them again and refuse the folds.
        headers = built.items()
        for name in {name for name, _ in headers}:
            del built[name]
        for name, value in headers[:3]:
            email.message.Message.__setitem__(built, name, value)
        built = related(built)
        for name, value in headers[3:]:
            email.message.Message.__setitem__(built, name, value)
    return built
