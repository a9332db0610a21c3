"""A Django ``EmailMessage`` checked, and turned into an outbox row and back.

Every path into the outbox — ``kipekee.send``, the ``Email`` builder and the drop-in
``EMAIL_BACKEND`` — ends in :func:`validate` and :func:`to_fields`, so bad input is refused
the same way everywhere, before anything is written. Delivery rebuilds the message with
:func:`from_row`.
"""

from __future__ import annotations

import email.message
import functools
import re
from dataclasses import dataclass
from email.errors import HeaderParseError
from email.headerregistry import AddressHeader
from email.mime.base import MIMEBase
from email.utils import make_msgid
from typing import TYPE_CHECKING, Any

import django
from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.mail import EmailMessage, EmailMultiAlternatives
from django.core.mail.utils import DNS_NAME
from django.core.validators import EmailValidator
from django.utils.encoding import force_str, punycode

from . import wire
from .exceptions import InvalidMessage

if TYPE_CHECKING:
    from .models import OutboxEmail

# RFC 5322 field name: printable US-ASCII except colon.
_HEADER_NAME = re.compile(r"^[!-9;-~]+$")
_validate_addr_spec = EmailValidator()
# RFC 2045 type/subtype: tokens of printable ASCII without specials or spaces.
_MIMETYPE = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`{|}~-]+/[A-Za-z0-9!#$%&'*+.^_`{|}~-]+$")


@dataclass(frozen=True, kw_only=True)
class StoredAttachment:
    filename: str
    mimetype: str
    content: bytes
    content_id: str = ""


def validate(message: EmailMessage) -> None:
    """Raise ``InvalidMessage`` naming the first problem; return quietly if there is none."""
    _check_text("subject", force_str(message.subject))
    from_email = message.from_email or settings.DEFAULT_FROM_EMAIL
    check_address("from_email", from_email)
    for field in ("to", "cc", "bcc", "reply_to"):
        value = getattr(message, field, [])
        if isinstance(value, str):
            raise InvalidMessage(f"{field} must be a list of addresses, not a string.")
        for address in value:
            check_address(field, address)
    if not message.recipients():
        raise InvalidMessage("The message has no recipients (to, cc and bcc are empty).")
    for name, value in (message.extra_headers or {}).items():
        if not isinstance(name, str) or not _HEADER_NAME.match(name):
            raise InvalidMessage(f"Invalid header name {name!r}.")
        if name.lower() in {"to", "cc", "reply-to", "from", "sender"}:
            for address in _split_addresses(force_str(value)):
                check_address(f"header {name}", address)
        else:
            _check_text(f"header {name}", force_str(value))
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
        _check_text("attachment filename", force_str(filename))


# Every character str.splitlines() breaks on: the email package (Django 6's modern policy,
# and its header parser on Django 5.2) treats them as line ends too, so a value holding
# one would be accepted into the outbox and then refused at delivery, or worse.
_LINE_BREAKS = re.compile("[\r\n\v\f\x1c\x1d\x1e\x85\u2028\u2029]")


def _check_text(field: str, value: str) -> None:
    if _LINE_BREAKS.search(value):
        raise InvalidMessage(f"{field} contains a line break (CR/LF), refused: {value!r}")
    if "\x00" in value:
        raise InvalidMessage(f"{field} contains a NUL character, refused: {value!r}")


def _split_addresses(value: str) -> list[str]:
    try:
        parsed = AddressHeader.value_parser(value)
    except (HeaderParseError, IndexError, ValueError):
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
    """Validate one address (``a@b.c`` or ``Name <a@b.c>``); return its addr-spec."""
    if not isinstance(address, str):
        raise InvalidMessage(f"{field}: an address must be a string, not {type(address).__name__}.")
    return _check_address(field, address)


@functools.lru_cache(maxsize=4096)
def _check_address(field: str, address: str) -> str:
    # Cached: the same From (and often the same To) on every message of an app, and the
    # header parser costs about 0.1 ms a call. Refusals raise, and are not cached.
    if is_plain_addr_spec(address):
        try:
            _validate_addr_spec(address)
        except ValidationError:
            raise InvalidMessage(f"{field}: invalid address {address!r}.") from None
        return address
    _check_text(field, address)
    try:
        parsed = AddressHeader.value_parser(address)
    except (HeaderParseError, IndexError, ValueError) as exc:
        # The stdlib parser raises (even IndexError, for "x@") on some malformed input.
        raise InvalidMessage(f"{field}: invalid address {address!r}: {exc or 'unparsable'}") from None
    defects = [str(d) for d in parsed.all_defects]
    mailboxes = parsed.all_mailboxes
    if len(mailboxes) == 1 and not (mailboxes[0].local_part or "").isascii():
        # Deliberate: an internationalised local part needs SMTPUTF8 end to end (RFC
        # 6531), which Kipekee does not send. Refused here, not at delivery.
        raise InvalidMessage(
            f"{field}: address {address!r} has a non-ASCII local part (before the @), which "
            "needs SMTPUTF8; Kipekee does not send SMTPUTF8. Non-ASCII domains are fine."
        )
    if defects or len(mailboxes) != 1:
        problem = "; ".join(defects) or "must be exactly one address"
        raise InvalidMessage(f"{field}: invalid address {address!r}: {problem}")
    mailbox = mailboxes[0]
    if not mailbox.domain:
        raise InvalidMessage(f"{field}: address {address!r} has no domain.")
    addr_spec = f"{mailbox.local_part}@{punycode(mailbox.domain)}"
    try:
        _validate_addr_spec(addr_spec)
    except ValidationError:
        raise InvalidMessage(f"{field}: invalid address {address!r}.") from None
    return str(mailbox.addr_spec)


def to_fields(message: EmailMessage) -> tuple[dict[str, Any], list[StoredAttachment]]:
    """The outbox row's fields (without status) and attachments for a validated message."""
    alternatives = [
        {"content": force_str(content), "mimetype": mimetype}
        for content, mimetype in getattr(message, "alternatives", [])
    ]
    headers = {str(k): force_str(v) for k, v in (message.extra_headers or {}).items()}
    fields = {
        "from_email": message.from_email or settings.DEFAULT_FROM_EMAIL,
        "to": list(message.to),
        "cc": list(message.cc),
        "bcc": list(message.bcc),
        "reply_to": list(message.reply_to),
        "subject": force_str(message.subject),
        "body": force_str(message.body),
        "content_subtype": message.content_subtype,
        "alternatives": alternatives,
        "headers": headers,
    }
    return fields, [_store_attachment(a) for a in message.attachments]


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
        import mimetypes

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
    from email import encoders

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

    The inline parts stay in ``attachments`` (MIME parts with a Content-ID), so HTTP-API
    backends such as django-anymail find them there and send them as inline images.
    """

    attachments: list[Any]
    _inline: list[Any]

    def message(self, **kwargs: Any) -> Any:
        inline = [a for a in self.attachments if is_inline(a)]
        if not inline:
            return super().message(**kwargs)
        everything: list[Any] = self.attachments
        self.attachments = [a for a in everything if not is_inline(a)]
        self._inline = inline
        try:
            return super().message(**kwargs)
        finally:
            self.attachments = everything
            del self._inline

    # Django 6: the modern email API builds the tree in place.
    def _add_bodies(self, msg: Any) -> Any:
        result = super()._add_bodies(msg)  # type: ignore[misc]
        inline = getattr(self, "_inline", None)
        if inline:
            html = msg.get_body(("html",))
            # The HTML part (or, with no HTML, the body itself) becomes multipart/related.
            target = html if html is not None else msg
            target.make_related()
            for part in inline:
                target.attach(part)
        return result

    # Django 5.2: the legacy email.mime classes, one layer returned at a time.
    def _create_alternatives(self, msg: Any) -> Any:
        msg = super()._create_alternatives(msg)  # type: ignore[misc]
        inline = getattr(self, "_inline", None)
        if not inline:
            return msg
        from django.core.mail.message import SafeMIMEMultipart

        encoding = self.encoding or settings.DEFAULT_CHARSET

        def related(html: Any) -> Any:
            wrapper = SafeMIMEMultipart(_subtype="related", encoding=encoding)
            wrapper.attach(html)
            for part in inline:
                wrapper.attach(part)
            return wrapper

        if msg.get_content_type() == "multipart/alternative":
            parts = msg.get_payload()
            for index, part in enumerate(parts):
                if part.get_content_type() == "text/html":
                    parts[index] = related(part)
                    return msg
        return related(msg)


def check_size(message: EmailMessage, limit: int | None) -> None:
    """Raise ``InvalidMessage`` if ``message`` takes more than ``limit`` bytes on the wire
    (``KIPEKEE["MAX_MESSAGE_SIZE"]``; ``None``: no cap).

    Measured as Kipekee's SMTP backend will send it: attachments base64-encoded, CRLF
    line ends (:func:`kipekee.wire.message_size`, exact without encoding them). Most
    messages are far below the limit: an upper bound from the raw sizes (every part
    quoted-printable at worst, attachments base64) clears them without building the
    message; only the others are measured exactly.
    """
    if limit is None or _size_bound(message) <= limit:
        return
    size = wire.message_size(message)
    if size > limit:
        raise InvalidMessage(
            f"The message is {size:,} bytes ({size / 1e6:.1f} MB) as it goes on the wire "
            f'(attachments base64-encoded), over KIPEKEE["MAX_MESSAGE_SIZE"] = {limit:,} bytes '
            f"({limit / 1e6:.1f} MB). Send a link to large files instead, or raise the "
            "limit if every provider takes more."
        )


def _size_bound(message: EmailMessage) -> int:
    """At least the message's size on the wire (a quick upper bound)."""
    text = [force_str(message.subject), force_str(message.body),
            *(force_str(a) for a in [*message.to, *message.cc, *message.reply_to]),
            *(force_str(v) for v in (message.extra_headers or {}).values()),
            *(force_str(content) for content, _ in getattr(message, "alternatives", []))]
    # Quoted-printable of UTF-8 is at most 3 characters a byte, plus soft line breaks.
    bound = 8192 + sum(4 * len(t.encode("utf-8", "surrogatepass")) for t in text)
    for attachment in message.attachments:
        if isinstance(attachment, (MIMEBase, email.message.Message)):
            payload = attachment.get_payload()
            bound += 1024 + 4 * len(payload if isinstance(payload, (str, bytes)) else str(attachment))
            continue
        filename, content, _ = attachment
        size = len(content.encode("utf-8", "surrogatepass") if isinstance(content, str)
                   else content if isinstance(content, (bytes, bytearray, memoryview))
                   else force_str(content).encode("utf-8"))
        bound += 1024 + 4 * len(force_str(filename or "")) + 4 * size
    return bound
