"""A Django email message as it goes on the wire, without holding its attachments twice.

Django builds a message's bytes through the stdlib's ``email`` package, which keeps
several copies of every attachment on the way: the bytes decoded to a str, base64 bytes,
a base64 str, the generator's lines, then the whole message (about 8 times a 20 MB
attachment, measured in ``bench/delivery_memory.py``). Here Django still builds every
header, part and boundary, but of a stand-in: each large binary attachment is replaced
by a 57-byte token whose base64 line marks its place. The real content is then
base64-encoded into that place piece by piece. The bytes are the same as Django's
(``tests/test_wire.py`` compares them on every supported Django version); should a token
not be found exactly once, Django's own result is used.

- :func:`message_size`: the exact size on the wire, without encoding the attachments;
- :func:`message_bytes`: the bytes;
- :func:`message_chunks`: the bytes in pieces, for a transport that streams.

Line ends are CRLF; dot-stuffing (SMTP ``DATA``) is the transport's job.
"""

from __future__ import annotations

import base64
import email.policy
import os
from collections.abc import Iterator
from typing import Any

import django
from django.core.mail import EmailMessage

__all__ = ["message_bytes", "message_chunks", "message_size"]

#: Attachments smaller than this are left to Django: nothing to gain.
STREAM_MIN = 64 * 1024
# Bytes per base64 line: 76 characters, as Django writes them on every version.
_LINE = 57
# Lines encoded at a time.
_LINES_PER_PIECE = 1024


def _django_bytes(message: EmailMessage) -> bytes:
    """The message's bytes as Django builds them (CRLF line ends)."""
    built: Any
    if django.VERSION >= (6, 0):
        # Django 6 builds a modern email.message.EmailMessage under a policy.
        built = message.message(policy=email.policy.SMTP)  # type: ignore[call-arg]
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


def _encoded_size(n: int) -> int:
    """Bytes of ``n`` bytes as base64 lines, each ending with CRLF."""
    return 4 * -(-n // 3) + 2 * -(-n // _LINE)


def _encoded_pieces(content: bytes | bytearray | memoryview) -> Iterator[bytes]:
    view = memoryview(content)
    step = _LINE * _LINES_PER_PIECE
    for start in range(0, len(view), step):
        yield base64.encodebytes(view[start:start + step]).replace(b"\n", b"\r\n")


class _Skeleton:
    """The message built by Django with tokens in place of its large attachments."""

    def __init__(self, message: EmailMessage) -> None:
        originals = message.attachments
        swapped = list(originals)
        self.contents: dict[bytes, bytes | bytearray | memoryview] = {}
        for index, attachment in enumerate(originals):
            if _streamable(attachment):
                token = os.urandom(_LINE)
                self.contents[base64.b64encode(token)] = attachment[1]
                # Django 6 keeps EmailAttachment namedtuples: the same type back.
                swapped[index] = type(attachment)(attachment[0], token, attachment[2]) \
                    if hasattr(attachment, "_fields") else (attachment[0], token, attachment[2])
        if not self.contents:
            self.data = b""
            self.places: list[tuple[int, bytes]] = []
            return
        message.attachments = swapped
        try:
            self.data = _django_bytes(message)
        finally:
            message.attachments = originals
        places = []
        for token in self.contents:
            at = self.data.find(b"\n" + token + b"\r\n")
            if at < 0 or self.data.find(b"\n" + token + b"\r\n", at + 1) >= 0:
                self.places = []  # not exactly once: do not guess
                self.contents = {}
                return
            places.append((at + 1, token))
        self.places = sorted(places)

    @property
    def usable(self) -> bool:
        return bool(self.places)

    def size(self) -> int:
        return len(self.data) + sum(_encoded_size(len(self.contents[token])) - len(token) - 2
                                    for _, token in self.places)

    def chunks(self) -> Iterator[bytes | memoryview]:
        view = memoryview(self.data)
        position = 0
        for at, token in self.places:
            yield view[position:at]  # up to the token's line
            yield from _encoded_pieces(self.contents[token])  # its lines, each with CRLF
            position = at + len(token) + 2  # after the token's CRLF
        yield view[position:]


def message_size(message: EmailMessage) -> int:
    """The size in bytes of ``message`` on the wire (CRLF line ends, attachments in
    base64), computed without encoding its large attachments."""
    skeleton = _Skeleton(message)
    return skeleton.size() if skeleton.usable else len(_django_bytes(message))


def message_chunks(message: EmailMessage) -> Iterator[bytes | memoryview]:
    """The bytes of ``message`` in pieces (about 78 KB each for a large attachment);
    joined, they are what Django would build. Every piece but the last ends with a
    CRLF, so a transport may dot-stuff (RFC 5321 4.5.2) piece by piece."""
    skeleton = _Skeleton(message)
    if not skeleton.usable:
        yield _django_bytes(message)
        return
    yield from skeleton.chunks()


def message_bytes(message: EmailMessage) -> bytes:
    """The bytes of ``message`` (while they are joined, the pieces are held too: about
    twice the encoded attachments at the peak, against some eight times in Django's
    build). A transport that can send pieces should use :func:`message_chunks`."""
    return b"".join(message_chunks(message))
