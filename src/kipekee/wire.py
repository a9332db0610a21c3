"""A Django email message as it goes on the wire: its bytes, built directly, and its size.

Django builds a message's bytes through the stdlib's ``email`` package: a tree of message
objects in which (on Django 6) every header is parsed into an object when it is set and
folded again by the generator, and which holds a large attachment some eight times over.
For a 5.8 KB text + HTML message that is about 2 ms of CPU on Django 6.1, more than the
SMTP transaction that sends it. This module builds the same bytes without that tree:

- the parts, their order and each part's headers in their order follow what Django does
  with the email package, step by step (``_Django6``: ``email.message.EmailMessage``
  under the SMTP policy; ``_Django5``: the ``email.mime`` classes and ``compat32``);
- a header is folded by the email package itself, once per distinct value (cached); a
  short header of printable ASCII (and plain ``local@domain`` addresses) is folded as it
  is, which is what the email package does with it;
- the headers of each kind of part (Content-Type, Content-Transfer-Encoding,
  Content-Disposition, MIME-Version…) come from a part the email package builds, once;
- bodies are encoded as the email package encodes them (its choice of 7bit, 8bit,
  quoted-printable or base64; quoted-printable with its line breaking);
- a large binary attachment is kept as it is and base64-encoded piece by piece on the way
  out, so it is held once, encoded, at most.

``tests/test_wire.py`` holds the result to Django's own ``message().as_bytes()`` for every
message shape, with a Hypothesis property over generated messages, on each supported
Django version. What the builder does not cover (a message class that builds its own
message, ``message/*`` attachments, a charset other than UTF-8, text with lone surrogates,
values Django would refuse) is built by Django, with large attachments swapped for tokens
(:class:`_Tokens`). Headers are set (parsed) first and folded as the generator writes
them, so a message Django refuses is refused with Django's error.

Three deliberate differences, where Django's output breaks an RFC:

- on Django 6 an unstructured header of printable ASCII is never RFC 2047-encoded to fold
  it (:class:`_SMTPPolicy`): the email package encodes any word longer than a line, so a
  List-Unsubscribe URL became encoded-words, no RFC 2369 ``<URI>`` (RFC 2047 section 5
  allows them only for text that is not ASCII; providers then drop the RFC 8058 one-click
  unsubscribe), and long Message-IDs in References no longer thread. Such a header is
  folded at whitespace, as Django 5.2 folds it;
- on Django 6 every message carries ``MIME-Version: 1.0`` at the top. Django 6 leaves it
  out when the body is empty and there are alternatives or attachments (the stdlib's
  ``make_mixed`` moves it nowhere; CPython issues 91297, 120946), which RFC 2045 section 4
  does not allow; :class:`~kipekee.message.RelatedMessage` adds it, and so does this
  module (after the other top-level headers, where ``msg[...] = ...`` puts it);
- a header whose folded form has a line break that does not continue it (on Django 5.2:
  an attachment's file name with a CR or LF, sent straight through Kipekee's SMTP
  backend; the outbox refuses it at the call site) is refused with ``HeaderWriteError``,
  as the email package itself does from gh-144125 on, where older releases write a line
  that is no header (RFC 5322 2.2.3).

- :func:`build`: one build, as a :class:`Wire` (its ``size`` and its ``chunks()``);
- :func:`message_bytes`, :func:`message_size`, :func:`message_chunks`: the same, one call;
- :func:`check_size`: ``KIPEKEE["MAX_MESSAGE_SIZE"]``, measured here.

Line ends are CRLF; dot-stuffing (SMTP ``DATA``) is the transport's job.
"""

from __future__ import annotations

import base64
import binascii
import email.message
import email.policy
import functools
import os
import random
import re
import sys
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from email import encoders
from email import errors as email_errors
from email.generator import BytesGenerator
from email.headerregistry import Address, AddressHeader, MessageIDHeader, UnstructuredHeader
from email.mime.base import MIMEBase
from email.utils import format_datetime, formatdate, make_msgid
from io import BytesIO
from typing import Any

import django
from django.conf import settings
from django.core.mail import EmailMessage, EmailMultiAlternatives
from django.core.mail.utils import DNS_NAME
from django.utils.encoding import force_bytes, force_str, punycode
from django.utils.functional import Promise
from django.utils.timezone import get_current_timezone

from .exceptions import InvalidMessage
from .message import RelatedMessage, is_plain_addr_spec

__all__ = ["Wire", "build", "check_size", "message_bytes", "message_chunks", "message_size"]

#: Binary attachments at least this large are encoded piece by piece on the way out.
STREAM_MIN = 64 * 1024
# Bytes per base64 line: 76 characters, as the email package writes them.
_LINE = 57
# Lines encoded at a time.
_LINES_PER_PIECE = 1024
_CRLF = b"\r\n"
_DJANGO6 = django.VERSION >= (6, 0)
if not _DJANGO6:
    # Django 5.2's email.mime helpers (deprecated on Django 6, to be removed).
    from django.core.mail.message import SafeMIMEText, forbid_multi_line_headers

_HeaderWriteError: type[Exception] = getattr(email_errors, "HeaderWriteError",
                                             email_errors.MessageError)


class _HeaderRefused(_HeaderWriteError, ValueError):  # type: ignore[misc, valid-type]
    """A header that would write a line of its own: the email package's HeaderWriteError
    (Python 3.13 on), and a ValueError, as Django's refusals of bad headers are (delivery
    takes it for a permanent failure: the message will not get better)."""
# Django 6.1 raises ValueError for a Bcc extra header; 5.2 and 6.0 write it.
_REFUSES_BCC_HEADER = django.VERSION >= (6, 1)


# --- the result -----------------------------------------------------------------------

class _Base64:
    """A large attachment's content, base64-encoded only as it is sent."""

    __slots__ = ("content",)

    def __init__(self, content: bytes | bytearray | memoryview) -> None:
        self.content = content

    def __len__(self) -> int:
        n = len(self.content)
        return 4 * -(-n // 3) + 2 * -(-n // _LINE)  # 76-character lines, each with CRLF

    def pieces(self) -> Iterator[bytes]:
        view = memoryview(self.content)
        step = _LINE * _LINES_PER_PIECE
        for start in range(0, len(view), step):
            yield _base64_lines(view[start:start + step])


_Piece = bytes | _Base64


class Wire:
    """One build of a message: its exact ``size`` on the wire, and its bytes.

    ``chunks()`` yields them in pieces (the whole message in one piece unless it has large
    attachments, whose base64 comes about 78 KB at a time); every piece but the last ends
    with CRLF, so a transport may dot-stuff (RFC 5321 4.5.2) piece by piece. Build once and
    use both: a message without a Message-ID gets a new one on every build.
    """

    __slots__ = ("_pieces", "size")

    def __init__(self, pieces: Sequence[_Piece]) -> None:
        self._pieces = [p for p in pieces if len(p)]
        self.size = sum(len(p) for p in self._pieces)

    def chunks(self) -> Iterator[bytes | memoryview]:
        for piece in self._pieces:
            if isinstance(piece, bytes):
                yield piece
            else:
                yield from piece.pieces()

    def tobytes(self) -> bytes:
        """The whole message, held once: written piece by piece into one buffer that
        ``getvalue()`` hands over without a copy. (``b"".join(self.chunks())`` first lists
        every piece, a large attachment's base64 whole, then copies them: twice the
        message at its peak, 2.7 times a 20 MiB attachment.)"""
        if len(self._pieces) == 1 and isinstance(self._pieces[0], bytes):
            return self._pieces[0]
        buffer = BytesIO()
        for chunk in self.chunks():
            buffer.write(chunk)
        return buffer.getvalue()


def build(message: EmailMessage) -> Wire:
    """``message`` as it goes on the wire: the bytes Django would build, built directly."""
    builder = _Django6 if _DJANGO6 else _Django5
    try:
        return Wire(builder(message).pieces())
    except _Unsupported:
        return _Tokens(message).wire()


def message_bytes(message: EmailMessage) -> bytes:
    """The bytes of ``message``, CRLF line ends, as Django would build them."""
    return build(message).tobytes()


def message_size(message: EmailMessage) -> int:
    """The size of ``message`` on the wire, without encoding its large attachments."""
    return build(message).size


def message_chunks(message: EmailMessage) -> Iterator[bytes | memoryview]:
    """The bytes of ``message`` in pieces, each but the last ending with CRLF."""
    return build(message).chunks()


def check_size(message: EmailMessage, limit: int | None) -> None:
    """Raise ``InvalidMessage`` if ``message`` takes more than ``limit`` bytes on the wire
    (``KIPEKEE["MAX_MESSAGE_SIZE"]``; ``None``: no cap).

    Most messages are far below the limit: an upper bound from the raw sizes (every part
    quoted-printable at worst, attachments base64) clears them without building the
    message; only the others are measured exactly (:func:`message_size`).
    """
    if limit is None or _size_bound(message, limit) <= limit:
        return
    size = message_size(message)
    if size > limit:
        raise InvalidMessage(
            f"The message is {size:,} bytes ({size / 1e6:.1f} MB) as it goes on the wire "
            f'(attachments base64-encoded), over KIPEKEE["MAX_MESSAGE_SIZE"] = {limit:,} bytes '
            f"({limit / 1e6:.1f} MB). Send a link to large files instead, or raise the "
            "limit if every provider takes more."
        )


def _size_bound(message: EmailMessage, limit: int | None = None) -> int:
    """At least the message's size on the wire (a quick upper bound; tighter, and a
    little slower to find, when the quick one is over ``limit``)."""
    text = [force_str(message.subject), force_str(message.body),
            *(force_str(a) for a in [*message.to, *message.cc, *message.reply_to]),
            *(force_str(v) for v in (message.extra_headers or {}).values()),
            *(force_str(content) for content, _ in getattr(message, "alternatives", []))]
    # Quoted-printable of UTF-8 is at most 3 characters a byte, plus soft line breaks;
    # a character is at most 4 bytes of UTF-8. Counted in characters first (16 each),
    # in encoded bytes (4 each) only if that is over ``limit``: encoding every text of
    # a message to count its bytes was 5 % of a queued send's profiled CPU.
    bound = 8192 + 16 * sum(len(t) for t in text)
    if limit is not None and bound > limit:
        bound = 8192 + sum(4 * len(t.encode("utf-8", "surrogatepass")) for t in text)
    for attachment in message.attachments:
        if isinstance(attachment, (MIMEBase, email.message.Message)):
            payload = attachment.get_payload()
            data = payload if isinstance(payload, (str, bytes)) else str(attachment)
            bound += 1024 + 4 * len(data)
            continue
        filename, content, _ = attachment
        size = len(content.encode("utf-8", "surrogatepass") if isinstance(content, str)
                   else content if isinstance(content, (bytes, bytearray, memoryview))
                   else force_str(content).encode("utf-8"))
        bound += 1024 + 4 * len(force_str(filename or "")) + 4 * size
    return bound


# --- the parts ------------------------------------------------------------------------

class _Unsupported(Exception):
    """A message shape the direct builder does not cover: Django builds it."""


def _attachment_triple(attachment: Any) -> tuple[Any, Any, str, str]:
    """A Django ``(filename, content, mimetype)`` attachment, checked as Django checks it:
    ``(filename, content, maintype, subtype)``."""
    if not isinstance(attachment, tuple) or len(attachment) != 3:
        raise _Unsupported("an attachment Django does not take")
    filename, content, mimetype = attachment
    if not isinstance(mimetype, str) or "/" not in mimetype or not (
            filename is None or type(filename) is str):
        raise _Unsupported("an attachment Django does not take")
    maintype, subtype = mimetype.split("/", 1)
    return filename, content, maintype, subtype


class _Fold:
    """A header set (parsed, as Django sets it) and folded when the part is written, as
    the generator folds it: Django refuses bad values in that order too (``ValueError``
    when a header is set, the email package's errors when it is folded)."""

    __slots__ = ("fold", "name", "value")

    def __init__(self, fold: Callable[[str, Any], bytes], name: str, value: Any) -> None:
        self.fold, self.name, self.value = fold, name, value

    def __call__(self) -> bytes:
        return self.fold(self.name, self.value)


_Line = bytes | _Fold | None


class _Part:
    """A MIME part as the email package would hold it: headers in order (folded, to be
    folded, or ``None`` for a multipart's Content-Type, which waits for its boundary),
    and a body (bytes, CRLF line ends) or sub-parts. A sub-part that is not a ``_Part`` is
    a MIME part object (an inline image), written by the email package's generator."""

    __slots__ = ("body", "ctype", "headers", "parts", "subtype")

    def __init__(self, headers: list[tuple[str, _Line]], body: _Piece | None = None,
                 *, ctype: str = "", parts: list[Any] | None = None,
                 subtype: str = "") -> None:
        self.headers = headers
        self.body = body
        self.ctype = ctype  # a leaf's content type, lower case
        self.parts = parts
        self.subtype = subtype  # a multipart's subtype


def _base64_lines(data: bytes | bytearray | memoryview) -> bytes:
    """``base64.encodebytes(data)`` with CRLF line ends (76 characters a line), encoded
    in one call: encodebytes makes one call per 57-byte line. 57 is a multiple of 3, so
    the lines of the whole are the lines of each piece."""
    encoded = binascii.b2a_base64(data, newline=False)
    if not encoded:
        return b""
    width = 4 * _LINE // 3
    return _CRLF.join([encoded[i:i + width] for i in range(0, len(encoded), width)]) + _CRLF


def _base64_body(content: bytes | bytearray | memoryview) -> _Piece:
    if len(content) >= STREAM_MIN:
        return _Base64(content)
    return _base64_lines(content)


_BOUNDARY_WIDTH = len(repr(sys.maxsize - 1))
# Any boundary the generator makes has this length and these characters: Content-Type
# headers are folded once with it in place, and the real boundary is put where it was.
_BOUNDARY_TEMPLATE = "=" * 15 + "0" * _BOUNDARY_WIDTH + "=="


def _boundary(texts: list[list[_Piece]]) -> str:
    """A boundary as the email generator makes it (``Generator._make_boundary``: a random
    token, checked against the parts' text)."""
    boundary = "=" * 15 + f"{random.randrange(sys.maxsize):0{_BOUNDARY_WIDTH}d}" + "=="
    needle = b"--" + boundary.encode("ascii")
    # Base64 never holds "--", and pieces split only around base64, at line ends.
    if any(needle in piece for text in texts for piece in text if isinstance(piece, bytes)):
        raise _Unsupported("the boundary occurs in the text: the generator picks another")
    return boundary


class _Builder(ABC):
    """The bytes of one Django message, built as Django builds them (one subclass per
    version of Django's ``message()``)."""

    policy: Any
    # How this version folds a multipart's Content-Type (boundary included).
    fold_content_type: Callable[[str, Any], bytes]

    def __init__(self, message: EmailMessage) -> None:
        if type(message) not in (EmailMessage, EmailMultiAlternatives, RelatedMessage):
            raise _Unsupported("a message class of its own")
        if (message.encoding or settings.DEFAULT_CHARSET) != "utf-8":
            raise _Unsupported("a charset other than utf-8")
        self.message = message
        self.inline: list[Any] = []
        self.attachments = list(message.attachments)
        if isinstance(message, RelatedMessage):
            self.inline, self.attachments = message.related_parts()
        self.alternatives = list(getattr(message, "alternatives", []))
        self.extra = dict(message.extra_headers or {})
        body = message.body
        if isinstance(body, Promise):
            body = str(body)
        if not isinstance(body, str):
            raise _Unsupported("a body that is not text")
        self.body = body

    def pieces(self) -> list[_Piece]:
        out: list[_Piece] = []
        self._flatten(self.root(), out)
        joined: list[_Piece] = []
        for piece in out:
            if isinstance(piece, bytes) and joined and isinstance(joined[-1], bytes):
                joined[-1] += piece
            else:
                joined.append(piece)
        return joined

    @abstractmethod
    def root(self) -> _Part:
        """The message's MIME tree, as this Django version lays it out."""

    def _flatten(self, part: Any, out: list[_Piece]) -> None:
        """As ``BytesGenerator.flatten`` writes a part (``mangle_from_=False``): sub-parts
        first, then the part's headers (its boundary is known only then)."""
        if not isinstance(part, _Part):
            out.append(self.raw(part))
            return
        if part.parts is None:
            out.extend(line if isinstance(line, bytes) else line()
                       for _, line in part.headers if line is not None)
            out.append(_CRLF)
            if part.body is not None:
                out.append(part.body)
            return
        texts: list[list[_Piece]] = []
        for sub in part.parts:
            text: list[_Piece] = []
            self._flatten(sub, text)
            texts.append(text)
        boundary = _boundary(texts)
        for _, line in part.headers:
            out.append(line if isinstance(line, bytes) else
                       self._content_type(part.subtype, boundary) if line is None else line())
        out.append(_CRLF)
        delimiter = b"--" + boundary.encode("ascii")
        out.append(delimiter + _CRLF)
        for index, text in enumerate(texts):
            if index:
                out.append(_CRLF + delimiter + _CRLF)
            out.extend(text)
        out.append(_CRLF + delimiter + b"--" + _CRLF)

    def _content_type(self, subtype: str, boundary: str) -> bytes:
        template = _multipart_header(self.fold_content_type, subtype)
        if template is None or len(boundary) != len(_BOUNDARY_TEMPLATE):
            value = f'multipart/{subtype}; boundary="{boundary}"'  # as Message.set_boundary
            return self.fold_content_type("Content-Type", value)
        before, after = template
        return before + boundary.encode("ascii") + after

    def raw(self, part: Any) -> bytes:
        """A MIME part object as the generator writes it inside the message."""
        out = BytesIO()
        BytesGenerator(out, mangle_from_=False, policy=self.policy).flatten(part, linesep="\r\n")
        return out.getvalue()

    # The top-level headers, in the order Django's message() sets them.
    def message_headers(self) -> list[tuple[str, Any]]:
        m, extra = self.message, self.extra
        headers: list[tuple[str, Any]] = [
            ("Subject", str(m.subject)),
            ("From", str(extra.get("From", m.from_email))),
        ]
        for name, values in (("To", m.to), ("Cc", m.cc), ("Reply-To", m.reply_to)):
            if name in extra:
                headers.append((name, self.extra_value(extra[name], address=True)))
            elif values:
                headers.append((name, ", ".join(str(v) for v in values)))
        names = {name.lower() for name in extra}
        if "date" not in names:
            headers.append(("Date", self.date()))
        if "message-id" not in names:
            headers.append(("Message-ID", make_msgid(domain=DNS_NAME)))
        for name, value in extra.items():
            if not isinstance(name, str):
                raise _Unsupported("a header name that is not text")
            if name.lower() == "content-type":
                # Django 6 refuses it; on 5.2 the generator writes a multipart's boundary
                # into every Content-Type header.
                raise _Unsupported("a Content-Type header")
            if name.lower() not in {"from", "to", "cc", "reply-to"}:
                headers.append((name, self.extra_value(value)))
        return headers

    @abstractmethod
    def extra_value(self, value: Any, *, address: bool = False) -> str:
        """An extra header's value as Django sets it (``address``: To, Cc or Reply-To)."""

    @abstractmethod
    def date(self) -> Any:
        """The Date header's value, as this Django version sets it."""


@functools.lru_cache(maxsize=64)
def _multipart_header(fold: Callable[[str, Any], bytes], subtype: str,
                      ) -> tuple[bytes, bytes] | None:
    """A multipart Content-Type folded with the boundary template: what comes before and
    after the boundary (``None``: not written in one piece, fold each one)."""
    template = _BOUNDARY_TEMPLATE.encode("ascii")
    folded = fold("Content-Type", f'multipart/{subtype}; boundary="{_BOUNDARY_TEMPLATE}"')
    before, found, after = folded.partition(template)
    if not found or template in after:
        return None
    return before, after


_Headers = tuple[tuple[str, bytes], ...]
# A file name made of these is written as filename="…" whatever its letters: no quoting,
# no RFC 2231 encoding, and the folding depends on its length only.
_PLAIN_FILENAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def _named(headers: Callable[..., _Headers], *key: Any, filename: str | None) -> _Headers:
    """``headers(*key, filename)``, which is cached: a plain file name, new on most
    messages (``ticket-1042.pdf``), takes the headers made for a stand-in of its length,
    with the name put in the stand-in's place."""
    if filename and _PLAIN_FILENAME.fullmatch(filename):
        place = _stand_in(headers, key, len(filename))
        if place is not None:
            block, index, before, after = place
            line = before + filename.encode("ascii") + after
            return (*block[:index], (block[index][0], line), *block[index + 1:])
    return headers(*key, filename)


@functools.lru_cache(maxsize=256)
def _stand_in(headers: Callable[..., _Headers], key: tuple[Any, ...], length: int,
              ) -> tuple[_Headers, int, bytes, bytes] | None:
    stand_in = "x" * length
    block = headers(*key, stand_in)
    mark = f'filename="{stand_in}"'.encode("ascii")
    found = [i for i, (_, line) in enumerate(block) if mark in line]
    if len(found) != 1 or block[found[0]][1].count(mark) != 1:
        return None  # written some other way (folded into RFC 2231 pieces): not used
    before, _, after = block[found[0]][1].partition(mark)
    return block, found[0], before + b'filename="', b'"' + after


def _headers_of(part: Any, policy: Any) -> tuple[tuple[str, bytes], ...]:
    """A part's headers as the generator writes them, with their names in lower case."""
    return tuple((name.lower(), _checked(policy.fold_binary(name, value), policy))
                 for name, value in part.raw_items())


_NEWLINE_WITHOUT_FWSP = re.compile(rb"\r\n[^ \t]|\r[^ \n\t]|\n[^ \t]")


def _checked(folded: bytes, policy: Any) -> bytes:
    """A folded header, refused if a line break in it does not continue it (RFC 5322
    2.2.3: a fold is CRLF before whitespace): it would start a header of its own. The
    email package's generators check this from Python 3.13 (``Generator``) and gh-144125
    (``BytesGenerator``, which Django uses) on; here it is checked on every Python."""
    linesep = policy.linesep.encode()
    if not folded.endswith(linesep) or _NEWLINE_WITHOUT_FWSP.search(folded[:-len(linesep)]):
        raise _HeaderRefused(f"folded header contains newline: {folded!r}")
    return folded


# A header value the email package folds as it is, on either Django: printable ASCII words
# separated by single spaces, no encoded-word marker, short enough for one line.
_SIMPLE = re.compile(r"[!-~]+(?: [!-~]+)*")
_SHORT = 76


def _simple(name: str, value: str) -> bool:
    return (len(name) + 2 + len(value) <= _SHORT and _SIMPLE.fullmatch(value) is not None
            and "=?" not in value)


# --- quoted-printable ---------------------------------------------------------------------

# Characters quoted-printable body encoding leaves as they are: printable ASCII but "=",
# space, tab, CR and LF (email.quoprimime's body map).
_QP_QUOTE = re.compile(r"[^\t\n\r !-<>-~]")
_QP_PRINTABLE = re.compile(r"[\t\n\r -~]*")


def _qp_quote(match: re.Match[str]) -> str:
    return f"={ord(match.group()):02X}"


def _qp(body: str, maxlinelen: int) -> str:
    """``email.quoprimime.body_encode(body, maxlinelen)``, the same result (held to it by
    tests/test_wire.py), at a third of its cost: its per-character ``str.translate`` is
    most of it, and printable ASCII (most HTML) needs only its "=" quoted."""
    if not body:
        return body
    if body.isascii() and _QP_PRINTABLE.fullmatch(body):
        body = body.replace("=", "=3D")
    else:
        body = _QP_QUOTE.sub(_qp_quote, body)
    out: list[str] = []
    width = maxlinelen - 1  # room for the soft break's "="
    for line in body.splitlines():
        start = 0
        last = len(line) - 1 - maxlinelen
        # Soft line breaks, never inside an "=XX".
        while start <= last:
            stop = start + width
            if line[stop - 2] == "=":
                out.append(line[start:stop - 1])
                start = stop - 2
            elif line[stop - 1] == "=":
                out.append(line[start:stop])
                start = stop - 1
            else:
                out.append(line[start:stop] + "=")
                start = stop
        if line and line[-1] in " \t":
            # Whitespace at a line's end is quoted, with a soft break if there is no room.
            room = start - last
            quoted = f"={ord(line[-1]):02X}"
            if room >= 3:
                tail = quoted
            elif room == 2:
                tail = line[-1] + "=\n"
            else:
                tail = "=\n" + quoted
            out.append(line[start:-1] + tail)
        else:
            out.append(line[start:])
    if body[-1] in "\r\n":
        out.append("")
    return "\n".join(out)


_NEWLINES = re.compile(rb"\r\n|\r|\n")  # the generator's line ends (NLCRE)


def _utf8(text: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        # Lone surrogates: the email package raises, or (Python 3.13) writes them as
        # bytes with surrogateescape. Django builds it, whatever this Python does.
        raise _Unsupported("text with lone surrogates") from None


def _crlf(data: bytes) -> bytes:
    if b"\r" not in data:
        return data.replace(b"\n", _CRLF)  # the same, ten times faster
    return _NEWLINES.sub(_CRLF, data)


# --- Django 6: email.message.EmailMessage under the SMTP policy --------------------------

_COMPAT32 = email.policy.compat32.clone(linesep="\r\n")
_PRINTABLE = re.compile(r"[ \t!-~]*")


class _SMTPPolicy(email.policy.EmailPolicy):
    """``email.policy.SMTP``, except that an unstructured header of printable ASCII is never
    RFC 2047-encoded to fold it: it is folded at whitespace, as Django 5.2 (``compat32``)
    folds it, a word longer than a line kept whole (RFC 5322 2.1.1: 998 characters at
    most). The email package encodes any word longer than a line (a URL, a long
    Message-ID) into encoded-words, which RFC 2047 section 5 allows only for text that is
    not ASCII: an encoded List-Unsubscribe is no RFC 2369 list of <URI>s (providers then
    drop the RFC 8058 one-click unsubscribe), an encoded References or In-Reply-To breaks
    threading."""

    def fold_binary(self, name: str, value: Any) -> bytes:
        folded: bytes = super().fold_binary(name, value)
        if b"=?" in folded:
            text = str(value)
            if ("=?" not in text and _PRINTABLE.fullmatch(text)
                    and issubclass(_header_class6(name.lower()), UnstructuredHeader)):
                return _COMPAT32.fold_binary(name, text)
        return folded


_SMTP = _SMTPPolicy(linesep="\r\n")  # email.policy.SMTP is default.clone(linesep="\r\n")
# <local@domain>, both dot-atoms: what make_msgid and most senders make.
_PLAIN_MSGID = re.compile(r"<[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
                          r"@[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*>")


@functools.lru_cache(maxsize=1024)
def _parsed6(name: str, value: Any) -> Any:
    """A header as Django 6 sets it (``msg[name] = value``; address domains in IDNA, as
    its ``_idna_encode_address_header_domains`` does): a header object."""
    _, header = _SMTP.header_store_parse(name, value)
    if isinstance(header, AddressHeader) and any(not a.domain.isascii() for a in header.addresses):
        _, header = _SMTP.header_store_parse(name, [
            Address(display_name=a.display_name, username=a.username, domain=punycode(a.domain))
            for a in header.addresses])
    return header


@functools.lru_cache(maxsize=1024)
def _fold6(name: str, value: Any) -> bytes:
    """That header as the generator writes it."""
    return _checked(_SMTP.fold_binary(name, _parsed6(name, value)), _SMTP)


def _header6(name: str, value: Any) -> bytes | _Fold:
    if type(value) is str and _simple(name, value):
        kind = _header_class6(name.lower())
        if issubclass(kind, UnstructuredHeader) or (
                issubclass(kind, AddressHeader)
                and all(is_plain_addr_spec(a) for a in value.split(", "))) or (
                issubclass(kind, MessageIDHeader) and _PLAIN_MSGID.fullmatch(value)):
            return f"{name}: {value}\r\n".encode("ascii")
        # Other headers reformat their value (Date, MIME-Version, Content-*…).
    elif isinstance(value, datetime) and name == "Date":
        # What the date header holds (and folds, being short): the formatted date.
        return f"Date: {format_datetime(value)}\r\n".encode("ascii")
    _parsed6(name, value)  # refused now if Django refuses to set it
    return _Fold(_fold6, name, value)


@functools.lru_cache(maxsize=256)
def _max_count6(name: str) -> int | None:
    # The policy's header_max_count makes a header class on every call.
    return _SMTP.header_max_count(name)


@functools.lru_cache(maxsize=256)
def _header_class6(name: str) -> type:
    """The class the SMTP policy's header factory uses for header ``name``."""
    factory: Any = email.policy.SMTP.header_factory  # a HeaderRegistry
    kind: type = factory.registry.get(name, factory.default_class)
    return kind


def _text6(text: str) -> tuple[str, bytes]:
    """``(cte, body)`` as ``email.contentmanager`` encodes a str under the SMTP policy."""
    lines = _utf8(text).splitlines()
    if max(map(len, lines), default=0) <= 78:
        body = b"\r\n".join(lines) + _CRLF
        return ("7bit" if body.isascii() else "8bit"), body
    sniff = b"\r\n".join(lines[:10]) + _CRLF
    sniff_qp = _qp(sniff.decode("latin-1"), 78)
    if len(sniff_qp) > len(binascii.b2a_base64(sniff)):
        return "base64", _base64_lines(b"\r\n".join(lines) + _CRLF)
    if len(lines) > 10:
        sniff_qp = _qp((b"\n".join(lines) + b"\n").decode("latin-1"), 78)
    return "quoted-printable", sniff_qp.encode("ascii").replace(b"\n", _CRLF)


@functools.lru_cache(maxsize=256)
def _text_headers6(subtype: str, cte: str, attachment: bool, filename: str | None,
                   ) -> tuple[tuple[str, bytes], ...]:
    part = email.message.EmailMessage(policy=_SMTP)
    if attachment:  # EmailMessage.add_attachment
        part.set_content("", subtype=subtype, charset="utf-8", cte=cte, filename=filename)
        if "content-disposition" not in part:
            part["Content-Disposition"] = "attachment"
    else:  # EmailMessage.set_content and add_alternative
        part.set_content("", subtype=subtype, charset="utf-8", cte=cte)
    return _headers_of(part, _SMTP)


@functools.lru_cache(maxsize=256)
def _bytes_headers6(maintype: str, subtype: str, filename: str | None,
                    ) -> tuple[tuple[str, bytes], ...]:
    part = email.message.EmailMessage(policy=_SMTP)  # EmailMessage.add_attachment
    part.set_content(b"", maintype=maintype, subtype=subtype, filename=filename)
    if "content-disposition" not in part:
        part["Content-Disposition"] = "attachment"
    return _headers_of(part, _SMTP)


def _make_multipart6(part: _Part, subtype: str) -> None:
    """``MIMEPart.make_alternative/make_mixed/make_related``: the Content-* headers and
    the content move into a new first sub-part; a new Content-Type comes last."""
    moved = [h for h in part.headers if h[0].startswith("content-")]
    if moved:
        part.parts = [_Part(moved, part.body, ctype=part.ctype, parts=part.parts,
                            subtype=part.subtype)]
    else:
        part.parts = []
    part.headers = [h for h in part.headers if not h[0].startswith("content-")]
    part.headers.append(("content-type", None))
    part.body, part.ctype, part.subtype = None, "", subtype


class _Django6(_Builder):
    """Django 6.x ``EmailMessage.message(policy=email.policy.SMTP)``."""

    policy = _SMTP
    fold_content_type = staticmethod(_fold6)

    def __init__(self, message: EmailMessage) -> None:
        super().__init__(message)
        if hasattr(message, "mixed_subtype") or (
                self.alternatives and hasattr(message, "alternative_subtype")):
            raise _Unsupported("Django 6 refuses these attributes")

    def root(self) -> _Part:
        m = self.message
        root = _Part([])
        # _add_bodies
        if (m.body or not self.alternatives) and (m.body or not self.attachments):
            self._set_text(root, self.body, str(m.content_subtype))
        if self.alternatives:
            _make_multipart6(root, "alternative")
            for content, mimetype in self.alternatives:
                maintype, _, subtype = str(mimetype).partition("/")
                if isinstance(content, bytes):
                    content = content.decode()
                if maintype != "text" or not subtype or type(content) is not str:
                    raise _Unsupported("an alternative that is not text")
                assert root.parts is not None
                root.parts.append(self._set_text(_Part([]), content, subtype))
        # _add_attachments
        if self.attachments:
            _make_multipart6(root, "mixed")
            assert root.parts is not None
            for attachment in self.attachments:
                root.parts.append(self._attachment(attachment))
        names = [name.lower() for name, _ in root.headers]
        for name, value in self.message_headers():
            lower = name.lower()
            if lower == "bcc" and _REFUSES_BCC_HEADER:
                raise _Unsupported("Django 6.1 refuses a Bcc header")
            # The email package allows one of most headers (Subject, Content-Type…).
            limit = _max_count6(lower)
            if limit is not None and names.count(lower) >= limit:
                raise _Unsupported("a header the email package refuses twice")
            names.append(lower)
            root.headers.append((lower, _header6(name, value)))
        if self.inline:
            self._relate(root)
        if "mime-version" not in names:
            root.headers.append(("mime-version", _header6("MIME-Version", "1.0")))
        return root

    def extra_value(self, value: Any, *, address: bool = False) -> str:
        # To, Cc, Reply-To as they are; others through force_str(value, strings_only=True).
        if not address:
            value = force_str(value, strings_only=True)
        if type(value) is not str:
            raise _Unsupported("a header value that is not text")
        return value

    def date(self) -> datetime:
        tz = get_current_timezone() if settings.EMAIL_USE_LOCALTIME else UTC
        return datetime.now(tz)

    @staticmethod
    def _set_text(part: _Part, text: str, subtype: str, *, attachment: bool = False,
                  filename: str | None = None) -> _Part:
        cte, part.body = _text6(text)
        part.headers = list(_named(_text_headers6, subtype, cte, attachment, filename=filename))
        part.ctype = "text/" + subtype.lower()
        return part

    def _attachment(self, attachment: Any) -> Any:
        if isinstance(attachment, (email.message.MIMEPart, MIMEBase)):
            return attachment  # written by the generator
        filename, content, maintype, subtype = _attachment_triple(attachment)
        if maintype == "text" and isinstance(content, bytes):
            try:
                content = content.decode()
            except UnicodeDecodeError:
                maintype, subtype = "application", "octet-stream"
        if maintype == "text":
            if type(content) is not str:
                raise _Unsupported("text content that is not a str")
            return self._set_text(_Part([]), content, subtype, attachment=True, filename=filename)
        if maintype == "message":
            raise _Unsupported("a message/* attachment")
        if not isinstance(content, (bytes, bytearray, memoryview)):
            content = force_bytes(content)
        return _Part(list(_named(_bytes_headers6, maintype, subtype, filename=filename)),
                     _base64_body(content),
                     ctype=f"{maintype}/{subtype}".lower())

    def _relate(self, root: _Part) -> None:
        """RelatedMessage.message(): the HTML part (``get_body(("html",))``) becomes a
        multipart/related of itself and the inline parts."""
        html = _first_html(root)
        _make_multipart6(html, "related")
        if html is root:
            # The message's own Content-* headers go back up from the new sub-part.
            moved = html.parts[0] if html.parts else None
            assert isinstance(moved, _Part)
            for name in dict.fromkeys(n.lower() for n in self.extra):
                if name.startswith("content-"):
                    root.headers += [h for h in moved.headers if h[0] == name]
                    moved.headers = [h for h in moved.headers if h[0] != name]
        assert html.parts is not None
        html.parts.extend(self.inline)


def _first_html(part: _Part) -> _Part:
    """The first text/html part that is not an attachment, in document order."""
    if part.parts is None:
        if part.ctype == "text/html" and not any(h[0] == "content-disposition"
                                                 for h in part.headers):
            return part
        raise LookupError
    for sub in part.parts:
        if isinstance(sub, _Part):
            try:
                return _first_html(sub)
            except LookupError:
                continue
    raise LookupError


# --- Django 5.2: the email.mime classes, compat32 ------------------------------------------


@functools.lru_cache(maxsize=1024)
def _set5(name: str, value: str) -> str:
    """A header's value as Django 5.2 sets it (``SafeMIME*.__setitem__``: encoded words
    for non-ASCII, IDNA domains; newlines refused)."""
    return str(forbid_multi_line_headers(name, value, "utf-8")[1])


@functools.lru_cache(maxsize=1024)
def _fold5(name: str, value: str) -> bytes:
    """That header as the generator writes it."""
    return _checked(_COMPAT32.fold_binary(name, _set5(name, value)), _COMPAT32)


def _header5(name: str, value: str) -> bytes | _Fold:
    if _simple(name, value):
        return f"{name}: {value}\r\n".encode("ascii")
    _set5(name, value)  # refused now if Django refuses to set it
    return _Fold(_fold5, name, value)


def _raw_fold5(name: str, value: str) -> bytes:
    # A header set with add_header or set_boundary, not SafeMIME*.__setitem__.
    return _COMPAT32.fold_binary(name, value)


def _text5(text: str) -> tuple[str, bytes]:
    """``(cte, body)`` as Django 5.2's ``SafeMIMEText`` encodes a str: 8bit or 7bit, or
    quoted-printable when a line is longer than RFC 5322's 998 bytes."""
    data = _utf8(text)
    lines = text.splitlines()
    # No line can pass 998 bytes in 249 characters (4 bytes at most each).
    long_lines = max(map(len, lines), default=0) > 249 and any(
        len(line.encode()) > 998 for line in lines)
    if long_lines:
        return "quoted-printable", _crlf(_qp(data.decode("latin-1"), 76).encode("ascii"))
    return ("7bit" if data.isascii() else "8bit"), _crlf(data)


# A text that makes SafeMIMEText choose each encoding.
_CTE_SAMPLES = {"7bit": "", "8bit": "\xe9", "quoted-printable": "x" * 999}


@functools.lru_cache(maxsize=256)
def _text_headers5(subtype: str, cte: str, attachment: bool, filename: str | None,
                   ) -> tuple[tuple[str, bytes], ...]:
    part = SafeMIMEText(_CTE_SAMPLES[cte], subtype, "utf-8")
    if attachment and filename:  # EmailMessage._create_attachment
        part.add_header("Content-Disposition", "attachment", filename=_param5(filename))
    return _headers_of(part, _COMPAT32)


@functools.lru_cache(maxsize=256)
def _bytes_headers5(maintype: str, subtype: str, filename: str | None,
                    ) -> tuple[tuple[str, bytes], ...]:
    part = MIMEBase(maintype, subtype)  # EmailMessage._create_mime_attachment
    part.set_payload(b"")
    encoders.encode_base64(part)
    if filename:
        part.add_header("Content-Disposition", "attachment", filename=_param5(filename))
    return _headers_of(part, _COMPAT32)


def _param5(filename: str) -> Any:
    return filename if filename.isascii() else ("utf-8", "", filename)


class _Django5(_Builder):
    """Django 5.2 ``EmailMessage.message().as_bytes(linesep="\\r\\n")``."""

    policy = _COMPAT32
    fold_content_type = staticmethod(_raw_fold5)

    def __init__(self, message: EmailMessage) -> None:
        super().__init__(message)
        if getattr(message, "mixed_subtype", "mixed") != "mixed" or getattr(
                message, "alternative_subtype", "alternative") != "alternative":
            raise _Unsupported("a multipart subtype of its own")

    def root(self) -> _Part:
        m = self.message
        root = self._text(self.body, str(m.content_subtype))
        # _create_alternatives
        if self.alternatives:
            body, root = root, self._multipart("alternative")
            assert root.parts is not None
            if m.body:
                root.parts.append(body)
            for content, mimetype in self.alternatives:
                maintype, _, subtype = str(mimetype).partition("/")
                if maintype != "text" or not subtype or type(content) is not str:
                    raise _Unsupported("an alternative that is not text")
                root.parts.append(self._text(content, subtype))
        # _create_attachments
        if self.attachments:
            body, root = root, self._multipart("mixed")
            assert root.parts is not None
            if m.body or body.parts is not None:
                root.parts.append(body)
            for attachment in self.attachments:
                root.parts.append(self._attachment(attachment))
        for name, value in self.message_headers():
            root.headers.append((name.lower(), _header5(name, value)))
        if self.inline:
            root = self._relate(root)
        return root

    def extra_value(self, value: Any, *, address: bool = False) -> str:
        return str(value)  # as SafeMIME*.__setitem__ does

    def date(self) -> str:
        return formatdate(localtime=settings.EMAIL_USE_LOCALTIME)

    def _multipart(self, subtype: str) -> _Part:
        # SafeMIMEMultipart: Content-Type, then MIME-Version.
        return _Part([("content-type", None), ("mime-version", _header5("MIME-Version", "1.0"))],
                     parts=[], subtype=subtype)

    @staticmethod
    def _text(text: str, subtype: str, *, attachment: bool = False,
              filename: str | None = None) -> _Part:
        cte, body = _text5(text)
        headers: list[tuple[str, _Line]] = list(
            _named(_text_headers5, subtype, cte, attachment, filename=filename))
        return _Part(headers, body, ctype="text/" + subtype.lower())

    def _attachment(self, attachment: Any) -> Any:
        if isinstance(attachment, MIMEBase):
            return attachment  # written by the generator
        filename, content, maintype, subtype = _attachment_triple(attachment)
        if maintype == "text":
            if type(content) is not str:
                raise _Unsupported("text content that is not a str")
            return self._text(content, subtype, attachment=True, filename=filename)
        if maintype == "message" or not isinstance(content, (bytes, bytearray)):
            raise _Unsupported("a message/* attachment, or content that is not bytes")
        return _Part(list(_named(_bytes_headers5, maintype, subtype, filename=filename)),
                     _base64_body(content),
                     ctype=f"{maintype}/{subtype}".lower())

    def _relate(self, root: _Part) -> _Part:
        """RelatedMessage.message() on Django 5.2: the HTML part in a new
        multipart/related with the inline parts; the related part becomes the message,
        with its headers, when the HTML part was the message."""
        html = _first_html(root)
        related = self._multipart("related")
        related.parts = [html, *self.inline]
        if html is root:
            related.headers += root.headers[3:]
            root.headers = root.headers[:3]
            return related
        _replace(root, html, related)
        return root


def _replace(tree: _Part, old: _Part, new: _Part) -> None:
    assert tree.parts is not None
    for index, sub in enumerate(tree.parts):
        if sub is old:
            tree.parts[index] = new
            return
        if isinstance(sub, _Part) and sub.parts is not None and _contains(sub, old):
            _replace(sub, old, new)
            return
    raise LookupError


def _contains(tree: _Part, part: _Part) -> bool:
    return any(sub is part
               or (isinstance(sub, _Part) and sub.parts is not None and _contains(sub, part))
               for sub in tree.parts or ())


# --- Django's own build, for shapes the builder leaves to it ----------------------------------

def _django_bytes(message: EmailMessage) -> bytes:
    """The message's bytes as Django builds them (CRLF line ends)."""
    built: Any
    if _DJANGO6:
        # Django 6 builds a modern email.message.EmailMessage under a policy.
        built = message.message(policy=email.policy.SMTP)
        if "MIME-Version" not in built:
            built["MIME-Version"] = "1.0"  # RFC 2045 section 4; see the module docstring
        data: bytes = built.as_bytes()
    else:
        built = message.message()
        data = built.as_bytes(linesep="\r\n")
    return data


def _streamable(attachment: Any) -> bool:
    """A (filename, content, mimetype) attachment Django would base64-encode, large."""
    if not isinstance(attachment, tuple) or len(attachment) != 3:
        return False  # a MIME part (inline image): Django uses it as it is
    _, content, mimetype = attachment
    maintype = str(mimetype or "").partition("/")[0].lower()
    return (isinstance(content, (bytes, bytearray, memoryview)) and len(content) >= STREAM_MIN
            and maintype not in ("text", "message", ""))


class _Tokens:
    """Django's build, with each large binary attachment swapped for a 57-byte random
    token whose base64 line marks its place: the content is then encoded into that
    place piece by piece. Should a token not be found exactly once, Django's own result
    is used as it is."""

    def __init__(self, message: EmailMessage) -> None:
        self.message = message

    def wire(self) -> Wire:
        message = self.message
        originals = message.attachments
        swapped = list(originals)
        contents: dict[bytes, bytes | bytearray | memoryview] = {}
        for index, attachment in enumerate(originals):
            if _streamable(attachment):
                token = os.urandom(_LINE)
                contents[base64.b64encode(token)] = attachment[1]
                # Django 6 keeps EmailAttachment namedtuples: the same type back.
                swapped[index] = type(attachment)(attachment[0], token, attachment[2]) \
                    if hasattr(attachment, "_fields") else (attachment[0], token, attachment[2])
        if not contents:
            return Wire([_django_bytes(message)])
        message.attachments = swapped
        try:
            data = _django_bytes(message)
        finally:
            message.attachments = originals
        places = []
        for token in contents:
            line = b"\n" + token + _CRLF
            at = data.find(line)
            if at < 0 or data.find(line, at + 1) >= 0:
                return Wire([_django_bytes(message)])  # not exactly once: do not guess
            places.append((at + 1, token))
        pieces: list[_Piece] = []
        position = 0
        for at, token in sorted(places):
            pieces.append(data[position:at])  # up to the token's line
            pieces.append(_Base64(contents[token]))  # its lines, each with CRLF
            position = at + len(token) + 2  # after the token's CRLF
        pieces.append(data[position:])
        return Wire(pieces)
