"""A real local SMTP server for tests and demos, with switchable misbehaviour.

Install with the ``kipekee[testing]`` extra (it needs ``aiosmtpd``)::

    from kipekee.testing import Faults, LocalSMTPServer

    with LocalSMTPServer() as server:            # 127.0.0.1, a free port
        send_something(host=server.host, port=server.port)
        [msg] = server.wait_for(1)
        assert msg.subject == "Welcome"

The server speaks real SMTP over real sockets (aiosmtpd) in a background thread, so the
code under test runs its own, unmodified ``smtplib`` client against it. Plain, STARTTLS
and implicit TLS, AUTH PLAIN/LOGIN, PIPELINING (RFC 2920), CHUNKING (RFC 3030), SMTPUTF8
(RFC 6531), a per-transaction recipient limit, a queue id in each DATA reply, and the faults of
:class:`Faults` (busy banner, refused sender or recipients, temporary DATA failures, a
connection dropped mid-message, stalls, trickled replies, slow reads, network latency)
can be switched on per server and changed while it runs. :attr:`LocalSMTPServer.command_groups`
shows whether a client pipelined its commands.

Run ``python -m kipekee.testing [--host H] [--port N]`` for a capture server in the
foreground that prints one line per received message.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import datetime
import email.message
import email.policy
import functools
import hmac
import ipaddress
import secrets
import socket
import ssl
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

from aiosmtpd.smtp import (
    MISSING,
    SMTP,
    AuthResult,
    Envelope,
    LoginPassword,
    Session,
    syntax,
)

from .serving import LocalServer

__all__ = [
    "Faults",
    "LocalSMTPServer",
    "ReceivedMessage",
    "TLSMode",
    "self_signed_context",
]

TLSMode = Literal["none", "starttls", "ssl"]

# Seconds stop() gives cancelled sessions to unwind before it gives up on them. Sessions
# are aborted (not closed gracefully), so this is only ever reached if asyncio misbehaves.
_SHUTDOWN_GRACE = 2.0
# A client that opens TCP to the implicit-TLS port and never handshakes is dropped after
# this long (asyncio's default is 60 s, far too long for a test server).
_SSL_HANDSHAKE_TIMEOUT = 10.0


@dataclass(frozen=True)
class ReceivedMessage:
    """One message the server accepted (the DATA reply it sent, or will send, is 2xx)."""

    mail_from: str
    rcpt_tos: tuple[str, ...]
    data: bytes
    """The message exactly as received, after dot-unstuffing, with CRLF line endings."""
    peer: tuple[str | int, ...]
    """The client's socket address: ``(host, port)``, or the 4-tuple for IPv6."""
    tls: bool
    """Whether the session was encrypted (STARTTLS or implicit TLS) when DATA ended."""
    auth_user: str | None
    """The user the session authenticated as, or ``None``."""
    queue_id: str = ""
    """The id the server gave the message in its DATA reply (``250 2.0.0 Ok: queued as
    <queue_id>``), or ``""`` when a :attr:`Faults.data_replies` entry replaced it."""
    tls_resumed: bool = False
    """Whether the session's TLS handshake resumed an earlier TLS session."""
    mail_options: tuple[str, ...] = ()
    """The ``MAIL FROM`` parameters, upper-cased (``SIZE=…``, ``SMTPUTF8``, ``BODY=…``)."""

    @property
    def message(self) -> email.message.EmailMessage:
        """The parsed message (a fresh object on every access).

        Parsed with ``\\n`` line endings, undoing the CRLF of the wire as smtplib's
        sending did the reverse, so ``get_content()`` gives back the text that was sent.
        """
        return email.message_from_bytes(
            self.data.replace(b"\r\n", b"\n"), policy=email.policy.default
        )

    @property
    def subject(self) -> str | None:
        value = self.message["Subject"]
        return None if value is None else str(value)

    @property
    def message_id(self) -> str | None:
        value = self.message["Message-ID"]
        return None if value is None else str(value)


@dataclass
class Faults:
    """Misbehaviour for a :class:`LocalSMTPServer`; all off by default.

    The server reads these fields at the moment each command is handled, so a test may
    change them while the server runs (and while a client is connected). Replies are
    full SMTP reply lines: ``"NNN text"``, e.g. ``"451 4.3.0 try again later"``.
    """

    greeting: str | None = None
    """Sent instead of the ``220`` banner, after which the server closes the connection
    (e.g. ``"421 4.3.2 busy, try later"``). With implicit TLS it comes after the TLS
    handshake, as on a real server."""

    mail_reply: str | None = None
    """The reply to every ``MAIL FROM`` instead of ``250``. A non-2xx reply leaves the
    transaction without a sender, as a real refusal does."""

    mail_replies: list[str] = field(default_factory=list)
    """Replies used first-in first-out, one per ``MAIL FROM``, before ``mail_reply``. A
    ``421`` reply closes the connection after it is sent, as RFC 5321 says."""

    refuse_recipients: dict[str, str] = field(default_factory=dict)
    """Recipient address (matched case-insensitively) -> reply to its ``RCPT TO``, e.g.
    ``{"nobody@example.com": "550 5.1.1 no such user"}``. Other recipients get 250."""

    data_replies: list[str] = field(default_factory=list)
    """Replies used first-in first-out, one per message (after its final dot), instead
    of ``250``. ``["451 4.3.0 try again"] * 3`` fails the next three messages."""

    drop_mid_data: bool = False
    """After ``354``, read the first line of message data, then abort the connection
    without a reply (the client sees it closed or reset, depending on what it had
    sent that the server never read)."""

    stall_before_data_reply: float = 0.0
    """Seconds to wait after the final dot before replying: a client with a shorter
    timeout times out *after* the server has taken the message (which is recorded as
    received if the reply it would have sent is 2xx, as on a real server whose reply
    got lost: the case that causes duplicates when the sender retries)."""

    stall_greeting: float = 0.0
    """Seconds to accept the TCP connection (and TLS handshake, with implicit TLS) but
    say nothing before the banner."""

    trickle_replies: float = 0.0
    """Seconds between the bytes of every reply (banner included): a server that answers,
    but one byte at a time. Each byte comes sooner than a client's read timeout, so only
    a deadline on the whole exchange would notice."""

    read_rate: float = 0.0
    """Bytes per second the server reads from the connection (0: as fast as it can). The
    rest waits in the socket buffers, so a client sending a large message finds them full
    and its writes wait, as against a server on a slow link or under load."""

    reply_latency: float = 0.0
    """Seconds every reply spends "on the wire" before the client can read it, without
    holding up the server: network latency (the round-trip time, since requests arrive at
    once). A client that pipelines its commands waits one latency for all their replies;
    one that waits for each reply pays it per command. Not applied to the ``220`` that
    starts STARTTLS (the handshake follows at once); for TLS, prefer a delay proxy."""


def _is_positive(reply: str) -> bool:
    return reply.startswith("2")


def _is_encrypted(smtp: SMTP) -> bool:
    # Covers both STARTTLS (aiosmtpd swaps self.transport for the TLS app transport) and
    # implicit TLS (the transport asyncio created is a TLS one from the start).
    transport = smtp.transport
    return transport is not None and transport.get_extra_info("ssl_object") is not None


class _Session(Session):
    """aiosmtpd's Session without the deprecation warning on ``login_data``.

    aiosmtpd 1.4's own smtp_AUTH sets the deprecated ``login_data`` on every successful
    AUTH, which logs "Session.login_data is deprecated" each time (to stderr, in a demo
    without logging configured). Nothing here reads it.
    """

    @property
    def login_data(self) -> Any:
        return self._login_data

    @login_data.setter
    def login_data(self, value: Any) -> None:
        self._login_data = value


def _complete_lines(reader: Any) -> int:
    """Complete lines the client has sent that the server has not read yet."""
    # asyncio.StreamReader keeps what arrived in ``_buffer``; there is no public way to
    # peek at it, and this is a test server, so the private name is acceptable here.
    buffer = getattr(reader, "_buffer", b"")
    return bytes(buffer).count(b"\n")


class _PacedReader:
    """A session's StreamReader, read no faster than :attr:`Faults.read_rate`.

    While the server sleeps here, what the client sends piles up in asyncio's buffer
    (which then stops reading the socket) and in the kernel's socket buffers, until the
    client's writes wait: the same back-pressure as from a slow server.
    """

    def __init__(self, reader: asyncio.StreamReader, faults: Callable[[], Faults]) -> None:
        self._reader = reader
        self._faults = faults
        self._due = 0.0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reader, name)

    async def readuntil(self, separator: bytes = b"\n") -> bytes:
        data = await self._reader.readuntil(separator)
        await self._pace(len(data))
        return data

    async def read(self, n: int = -1) -> bytes:
        data = await self._reader.read(n)
        await self._pace(len(data))
        return data

    async def readexactly(self, n: int) -> bytes:
        data = await self._reader.readexactly(n)
        await self._pace(len(data))
        return data

    async def _pace(self, size: int) -> None:
        rate = self._faults().read_rate
        if rate <= 0:
            return
        now = asyncio.get_running_loop().time()
        self._due = max(self._due, now) + size / rate
        # Sleep in steps of at least 5 ms: a sleep per 78-byte line would cost more in
        # event-loop overhead than the rate it models.
        if self._due - now >= 0.005:
            await asyncio.sleep(self._due - now)


class _SessionProtocol(SMTP):
    """aiosmtpd's SMTP protocol with the faults that must act outside handler hooks
    (before the banner, in the middle of DATA, on the wire) and Kipekee's AUTH policy."""

    def __init__(self, owner: LocalSMTPServer, **kwargs: Any) -> None:
        self._owner = owner
        self._chunks: list[bytes] = []  # BDAT chunks of the current transaction
        super().__init__(_Handler(owner), **kwargs)
        self.tls_resumed = False
        # Pipelining, as the server sees it: the commands that were already waiting
        # when the server began on the first of them (see LocalSMTPServer.command_groups).
        self._group: list[str] = []
        self._group_left = 0
        methods: dict[str, Any] = vars(self)["_smtp_methods"]  # aiosmtpd: verb -> handler
        self._smtp_methods = {verb: self._grouped(verb, method) for verb, method in methods.items()}
        # Replies in flight under Faults.reply_latency: (due time, bytes), in order.
        self._in_flight: collections.deque[tuple[float, bytes]] = collections.deque()
        self._in_flight_task: asyncio.Task[None] | None = None
        self._starting_tls = False

    @property
    def encrypted(self) -> bool:
        return _is_encrypted(self)

    def _create_session(self) -> Session:
        return _Session(self.loop)

    def _set_post_data_state(self) -> None:
        # A new transaction (after a message, RSET, EHLO) starts without BDAT chunks.
        super()._set_post_data_state()  # type: ignore[no-untyped-call]  # aiosmtpd's, untyped
        self._chunks = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # aiosmtpd calls this again after STARTTLS with the TLS transport; only the
        # first call is a new session.
        is_new_session = self._original_transport is None
        super().connection_made(transport)
        if is_new_session:
            ssl_object = transport.get_extra_info("ssl_object")  # implicit TLS
            self.tls_resumed = bool(ssl_object is not None and ssl_object.session_reused)
            self._owner._session_opened(self)

    def connection_lost(self, error: Exception | None) -> None:
        self._owner._session_closed(self)
        super().connection_lost(error)

    def _cb_client_connected(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        super()._cb_client_connected(reader, writer)
        self._reader = cast(Any, _PacedReader(reader, lambda: self._owner.faults))

    def abort(self) -> None:
        """Drop the connection at once (no TLS close_notify, no buffered data)."""
        if self.transport is not None:
            self.transport.abort()  # type: ignore[attr-defined]
        if self._original_transport is not None:
            self._original_transport.abort()  # type: ignore[attr-defined]

    def _grouped(self, verb: str, method: Callable[[str], Any]) -> Callable[[str], Any]:
        @functools.wraps(method)
        async def handle(arg: str) -> None:
            if self._group_left > 0:
                self._group_left -= 1
                self._owner._join_group(self._group, verb)
            else:
                self._group = [verb]
                self._group_left = _complete_lines(self._reader)
                self._owner._add_group(self._group)
            await method(arg)

        return handle

    async def push(self, status: Any) -> None:
        faults = self._owner.faults
        data = status.encode("utf-8" if self.enable_SMTPUTF8 else "ascii") if isinstance(
            status, str) else status
        if faults.reply_latency > 0 and not self._starting_tls:
            loop = asyncio.get_running_loop()
            self._in_flight.append((loop.time() + faults.reply_latency, data + b"\r\n"))
            if self._in_flight_task is None or self._in_flight_task.done():
                self._in_flight_task = loop.create_task(self._deliver_in_flight())
            return
        if faults.trickle_replies <= 0:
            await super().push(data)
            return
        for byte in data + b"\r\n":
            self._writer.write(bytes([byte]))
            await self._writer.drain()
            await asyncio.sleep(faults.trickle_replies)

    async def _deliver_in_flight(self) -> None:
        loop = asyncio.get_running_loop()
        while self._in_flight:
            due, _ = self._in_flight[0]
            if due > loop.time():
                await asyncio.sleep(due - loop.time())
            ready = []
            while self._in_flight and self._in_flight[0][0] <= loop.time():
                ready.append(self._in_flight.popleft()[1])
            if self.transport is None or self.transport.is_closing():
                return
            self._writer.write(b"".join(ready))
            await self._writer.drain()

    async def _flush_in_flight(self) -> None:
        """Wait until every reply still in flight has been written."""
        if self._in_flight_task is not None:
            await self._in_flight_task

    async def _handle_client(self) -> None:
        # Overrides aiosmtpd's session loop only to misbehave before its banner; the
        # normal path is the unmodified loop.
        faults = self._owner.faults
        if faults.stall_greeting > 0:
            await asyncio.sleep(faults.stall_greeting)
        if faults.greeting is not None:
            await self.push(faults.greeting)
            await self._flush_in_flight()
            assert self.transport is not None
            self.transport.close()  # close() flushes the reply first, unlike abort()
            return
        await super()._handle_client()

    @syntax("QUIT")
    async def smtp_QUIT(self, arg: str) -> None:
        if arg or self._owner.faults.reply_latency <= 0:
            await super().smtp_QUIT(arg)
            return
        # aiosmtpd ends the session right after queueing "221": let it reach the client.
        await self.push("221 Bye")
        await self._flush_in_flight()
        assert self._handler_coroutine is not None
        self._handler_coroutine.cancel()
        assert self.transport is not None
        self.transport.close()

    @syntax("STARTTLS", when="tls_context")
    async def smtp_STARTTLS(self, arg: str) -> None:
        await self._flush_in_flight()
        self._starting_tls = True  # the 220 goes out at once: the handshake follows it
        try:
            await super().smtp_STARTTLS(arg)
        finally:
            self._starting_tls = False
        ssl_object = self.transport.get_extra_info("ssl_object") if self.transport else None
        if ssl_object is not None:
            self.tls_resumed = bool(ssl_object.session_reused)

    @syntax("AUTH <mechanism>")
    async def smtp_AUTH(self, arg: str) -> None:
        # aiosmtpd's own auth_require_tls only recognises STARTTLS, so it would refuse
        # AUTH on an implicit-TLS connection; the server runs aiosmtpd with it off and
        # enforces the policy here, where implicit TLS counts as encrypted.
        if self._owner.auth is None:
            await self.push("502 5.5.1 AUTH not available")
            return
        if self._owner.auth_require_tls and not self.encrypted:
            await self.push("538 5.7.11 Encryption required for requested authentication mechanism")
            return
        await super().smtp_AUTH(arg)

    async def smtp_DATA(self, arg: str) -> None:
        envelope = self.envelope
        if not self._owner.faults.drop_mid_data or arg or envelope is None or not envelope.rcpt_tos:
            # Normal DATA, and aiosmtpd's own replies to a DATA out of sequence.
            await super().smtp_DATA(arg)
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        await self._flush_in_flight()
        # A first line longer than the reader's limit raises LimitOverrunError: the
        # client has started sending data all the same, which is all this fault awaits.
        with contextlib.suppress(asyncio.LimitOverrunError):
            await self._reader.readuntil(b"\n")
        self.abort()


    @syntax("BDAT <size> [LAST]")
    async def smtp_BDAT(self, arg: str) -> None:
        # CHUNKING (RFC 3030), which aiosmtpd lacks: the message in chunks of a stated
        # size, no dot-stuffing. A chunk is always read, even when the transaction is
        # refused: the client may have pipelined it.
        if not self._owner.chunking:
            await self.push('500 Error: command "BDAT" not recognized')
            return
        words = (arg or "").split()
        if not words or not words[0].isdigit() or len(words) > 2 or (
                len(words) == 2 and words[1].upper() != "LAST"):
            await self.push("501 5.5.4 Syntax: BDAT <size> [LAST]")
            return
        size, last = int(words[0]), len(words) == 2
        try:
            chunk = await self._reader.readexactly(size)
        except asyncio.IncompleteReadError:
            return  # the client went away in the middle of the chunk
        # What follows the chunk, already here, was pipelined behind this command.
        self._group_left = _complete_lines(self._reader)
        if self._owner.faults.drop_mid_data:
            self.abort()
            return
        envelope = self.envelope
        assert envelope is not None
        if envelope.mail_from is None or not envelope.rcpt_tos:
            self._set_post_data_state()
            await self.push("554 5.5.1 Error: no valid recipients" if envelope.mail_from
                            else "503 5.5.1 Error: need MAIL command")
            return
        self._chunks.append(chunk)
        if not last:
            await self.push(f"250 2.0.0 {size} octets received")
            return
        content = b"".join(self._chunks)
        limit = self.data_size_limit
        if limit and len(content) > limit:
            self._set_post_data_state()
            await self.push("552 5.3.4 Error: message too big")
            return
        envelope.original_content = content
        envelope.content = content
        status = await self._call_handler_hook("DATA")
        self._set_post_data_state()
        await self.push(status)


class _Handler:
    """aiosmtpd handler hooks: recording, the per-command faults, AUTH advertising."""

    def __init__(self, owner: LocalSMTPServer) -> None:
        self._owner = owner

    async def handle_EHLO(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        # With an EHLO hook aiosmtpd leaves recording the client's name to the hook;
        # without it, MAIL would be answered "503 send HELO first".
        session.host_name = hostname
        owner = self._owner
        offer_auth = owner.auth is not None and (
            not owner.auth_require_tls or _is_encrypted(server)
        )
        if not offer_auth:
            # Like a real server: no AUTH keyword where AUTH can't succeed, so smtplib's
            # login() fails with SMTPNotSupportedError instead of trying.
            responses = [line for line in responses if not line[4:].startswith("AUTH")]
        if owner.pipelining:
            # aiosmtpd reads commands one by one from a buffer, so it honours pipelined
            # commands as they are; it only does not say so.
            responses = [*responses[:-1], "250-PIPELINING", responses[-1]]
        if owner.chunking:
            responses = [*responses[:-1], "250-CHUNKING", responses[-1]]
        return responses

    async def handle_MAIL(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> Any:
        owner = self._owner
        if owner.auth is not None and not session.authenticated:
            return "530 5.7.0 Authentication required"
        faults = owner.faults
        reply = faults.mail_replies.pop(0) if faults.mail_replies else faults.mail_reply
        if reply is not None and reply.startswith("421"):
            # Closed once the reply is out (close() flushes what was written first).
            assert server.transport is not None
            server.loop.call_soon(server.transport.close)
        if reply is None:
            return MISSING  # aiosmtpd's default: record the sender, reply 250
        if _is_positive(reply):
            envelope.mail_from = address
            envelope.mail_options.extend(mail_options)
        return reply

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> Any:
        limit = self._owner.max_recipients
        if limit is not None and len(envelope.rcpt_tos) >= limit:
            # RFC 5321 4.5.3.1.10: the reply to a RCPT past the server's limit.
            return "452 4.5.3 Error: too many recipients"
        refusals = {
            addr.lower(): reply for addr, reply in self._owner.faults.refuse_recipients.items()
        }
        reply = refusals.get(address.lower())
        if reply is None:
            return MISSING  # aiosmtpd's default: add the recipient, reply 250
        if _is_positive(reply):
            envelope.rcpt_tos.append(address)
            envelope.rcpt_options.extend(rcpt_options)
        return reply

    async def handle_NOOP(self, server: SMTP, session: Session, envelope: Envelope,
                          arg: str) -> Any:
        self._owner._count("NOOP")
        return MISSING

    async def handle_RSET(self, server: SMTP, session: Session, envelope: Envelope) -> Any:
        self._owner._count("RSET")
        return MISSING

    async def handle_QUIT(self, server: SMTP, session: Session, envelope: Envelope) -> Any:
        self._owner._count("QUIT")
        return MISSING

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        owner = self._owner
        faults = owner.faults
        reply = faults.data_replies.pop(0) if faults.data_replies else ""
        queue_id = ""
        if not reply:
            queue_id = secrets.token_hex(5).upper()
            reply = f"250 2.0.0 Ok: queued as {queue_id}"
        if _is_positive(reply):
            assert envelope.mail_from is not None
            assert isinstance(envelope.original_content, bytes)
            # aiosmtpd annotates peer as str; it is the socket's peername tuple.
            peer: tuple[str | int, ...] = tuple(cast(Any, session.peer))
            owner._record(
                ReceivedMessage(
                    mail_from=envelope.mail_from,
                    rcpt_tos=tuple(envelope.rcpt_tos),
                    data=envelope.original_content,
                    peer=peer,
                    tls=_is_encrypted(server),
                    auth_user=session.auth_data if session.authenticated else None,
                    queue_id=queue_id,
                    tls_resumed=getattr(server, "tls_resumed", False),
                    mail_options=tuple(envelope.mail_options),
                )
            )
        if faults.stall_before_data_reply > 0:
            await asyncio.sleep(faults.stall_before_data_reply)
        return reply


@dataclass(kw_only=True, eq=False)
class LocalSMTPServer(LocalServer):
    """A real SMTP server on a loopback address, run in a background thread.

    Use as a context manager, or call :meth:`start` and :meth:`stop`.

    ``port=0`` picks a free port; read :attr:`port` after start. Once started, the port
    is kept: ``stop()`` then ``start()`` comes back on the same one.

    ``tls``: ``"none"``; ``"starttls"`` (offered, or required before MAIL with
    ``require_starttls=True``); or ``"ssl"`` (implicit TLS from the first byte, as on
    port 465). Both need ``ssl_context``, a server-side context with a certificate
    (see :func:`self_signed_context`).

    ``auth``: username -> password; AUTH PLAIN and LOGIN are offered and AUTH is
    required before MAIL. By default AUTH is only offered and accepted on an encrypted
    connection, as on real submission servers; ``auth_require_tls=False`` allows it in
    clear.

    ``data_size_limit``: the ``SIZE`` the server advertises and enforces, in bytes
    (aiosmtpd's default, 32 MiB, when ``None``).

    ``pipelining``: advertise PIPELINING (RFC 2920); the server always reads pipelined
    commands correctly, as real servers do. ``smtputf8``: offer SMTPUTF8 (RFC 6531) and
    accept UTF-8 in commands; without it a non-ASCII command is answered ``500``.
    ``max_recipients``: recipients accepted per transaction; each ``RCPT TO`` past it is
    answered ``452 4.5.3`` (RFC 5321 4.5.3.1.10). ``chunking``: offer CHUNKING (RFC 3030,
    ``BDAT``; off by default, as aiosmtpd has none: the server implements it). These are
    read when used (at EHLO, at connection, at each command), so a test may change them
    between sessions.

    ``on_message`` is called, in the server's thread, with each accepted message before
    it is added to :attr:`messages`; if it raises, the client gets a ``500`` reply and
    the message is not recorded.
    """

    host: str = "127.0.0.1"
    port: int = 0
    tls: TLSMode = "none"
    ssl_context: ssl.SSLContext | None = None
    require_starttls: bool = False
    auth: dict[str, str] | None = None
    auth_require_tls: bool = True
    faults: Faults = field(default_factory=Faults)
    on_message: Callable[[ReceivedMessage], None] | None = None
    data_size_limit: int | None = None
    pipelining: bool = True
    smtputf8: bool = True
    max_recipients: int | None = None
    chunking: bool = False

    def __post_init__(self) -> None:
        if self.tls not in ("none", "starttls", "ssl"):
            raise ValueError(f"tls must be 'none', 'starttls' or 'ssl', not {self.tls!r}")
        if self.tls != "none" and self.ssl_context is None:
            raise ValueError(f"tls={self.tls!r} needs a server ssl_context")
        if self.require_starttls and self.tls != "starttls":
            raise ValueError("require_starttls=True needs tls='starttls'")
        if self.auth is not None:
            self.auth = dict(self.auth)  # the caller's dict may change; the server's not
        self.messages: list[ReceivedMessage] = []
        self._groups: list[list[str]] = []

        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)
        self._connections = 0
        self._peak_open = 0
        self._commands: dict[str, int] = {}
        self._auth_failures = 0
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_requested: asyncio.Event | None = None
        self._startup_error: BaseException | None = None
        # Open sessions: changed only in the server's thread, under _lock.
        self._sessions: set[_SessionProtocol] = set()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<LocalSMTPServer {self.host}:{self.port} tls={self.tls} {state}>"

    @property
    def running(self) -> bool:
        return self._thread is not None

    @property
    def connections(self) -> int:
        """TCP connections accepted so far (each is one SMTP session)."""
        with self._lock:
            return self._connections

    @property
    def open_connections(self) -> int:
        """Sessions open now."""
        with self._lock:
            return len(self._sessions)

    @property
    def peak_connections(self) -> int:
        """The most sessions that were open at the same time."""
        with self._lock:
            return self._peak_open

    @property
    def commands(self) -> dict[str, int]:
        """How many ``NOOP``, ``RSET`` and ``QUIT`` commands the server received."""
        with self._lock:
            return dict(self._commands)

    def drop_connections(self, reply: str | None = "421 4.4.2 Idle timeout, closing") -> int:
        """Close every open session, as a server does on its idle timeout or restart:
        ``reply`` first (``None``: without a word). Returns how many were closed."""
        loop = self._loop
        if loop is None or self._thread is None:
            return 0

        async def drop() -> int:
            sessions = list(self._sessions)
            for session in sessions:
                if reply is not None:
                    await session.push(reply)
                assert session.transport is not None
                session.transport.close()
            return len(sessions)

        return asyncio.run_coroutine_threadsafe(drop(), loop).result(timeout=5)

    @property
    def auth_failures(self) -> int:
        """AUTH attempts refused for a wrong username or password."""
        with self._lock:
            return self._auth_failures

    @property
    def command_groups(self) -> list[tuple[str, ...]]:
        """The commands received, in groups that arrived together, in order.

        A group is a command and those that were already waiting, unread, when the server
        began to handle it: the client sent them without waiting for a reply. A client
        that pipelines a transaction shows ``("MAIL", "RCPT", "RCPT", "DATA")``; one that
        waits for each reply shows ``("MAIL",), ("RCPT",), …``. Message data is not a
        command. Groups of all sessions are interleaved in the order they began.
        """
        with self._lock:
            return [tuple(group) for group in self._groups]

    def forget_messages(self) -> None:
        """Forget the received messages (their bodies), keeping the command groups and
        the counters: a long-running sink that counts what it saw in other ways."""
        with self._lock:
            self.messages.clear()

    def clear(self) -> None:
        """Forget the received messages and command groups and reset the counters."""
        with self._lock:
            self.messages.clear()
            self._groups.clear()
            self._connections = 0
            self._peak_open = len(self._sessions)
            self._commands.clear()
            self._auth_failures = 0

    def _startup_failure(self) -> BaseException | None:
        return self._startup_error

    def wait_for(self, count: int, timeout: float = 5.0) -> list[ReceivedMessage]:
        """Block until at least ``count`` messages have arrived; return them all.

        Raises :class:`TimeoutError` naming what did arrive if they don't within
        ``timeout`` seconds.
        """
        with self._arrived:
            if not self._arrived.wait_for(lambda: len(self.messages) >= count, timeout):
                got = [(m.mail_from, m.rcpt_tos, m.subject) for m in self.messages]
                raise TimeoutError(
                    f"{self!r}: expected at least {count} message(s) within "
                    f"{timeout} s, got {len(got)}: {got}"
                )
            return list(self.messages)

    def start(self) -> None:
        """Bind, start the server thread, and return once it accepts connections."""
        if self._thread is not None:
            raise RuntimeError(f"{self!r} is already running")
        # Bind here, in the caller's thread, so that port=0 resolves to a real port
        # before start() returns and a bind error is raised to the caller.
        family, _, _, _, address = socket.getaddrinfo(
            self.host, self.port, type=socket.SOCK_STREAM
        )[0]
        sock = socket.create_server(address[:2], family=family)
        self.port = sock.getsockname()[1]
        self._startup_error = None
        ready = threading.Event()
        thread = threading.Thread(
            target=self._thread_main,
            args=(sock, ready),
            name=f"LocalSMTPServer-{self.port}",
            daemon=True,  # a wedged server must never keep the test process alive
        )
        thread.start()
        ready.wait()
        # (Set by the server thread: read through a call, which mypy does not narrow.)
        if (error := self._startup_failure()) is not None:
            thread.join()
            raise error
        self._thread = thread

    def stop(self) -> None:
        """Close the listener and abort every open session; safe to call twice.

        Clients still connected see the connection drop; handlers that are sleeping
        (stall faults) are cancelled, so this returns promptly.
        """
        thread, loop, stop_requested = self._thread, self._loop, self._stop_requested
        if thread is None:
            return
        assert loop is not None and stop_requested is not None
        self._thread = None
        loop.call_soon_threadsafe(stop_requested.set)
        thread.join(_SHUTDOWN_GRACE + 3.0)
        if thread.is_alive():
            raise RuntimeError(f"{self!r}: the server thread did not stop")

    # -- the server's thread ---------------------------------------------------------

    def _thread_main(self, sock: socket.socket, ready: threading.Event) -> None:
        # A selector loop on every platform: stopping relies on loop.remove_reader(),
        # which Windows' default proactor loop lacks.
        loop = asyncio.SelectorEventLoop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._serve(sock, ready))
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            ready.set()  # never leave start() waiting, whatever happened
            asyncio.set_event_loop(None)
            loop.close()

    async def _serve(self, sock: socket.socket, ready: threading.Event) -> None:
        loop = asyncio.get_running_loop()
        self._stop_requested = asyncio.Event()
        implicit_tls = self.tls == "ssl"
        try:
            server = await loop.create_server(
                self._make_session,
                sock=sock,
                ssl=self.ssl_context if implicit_tls else None,
                ssl_handshake_timeout=_SSL_HANDSHAKE_TIMEOUT if implicit_tls else None,
            )
        except Exception as exc:  # noqa: BLE001
            # Reported to start()'s caller, in their thread.
            self._startup_error = exc
            sock.close()
            return
        ready.set()
        await self._stop_requested.wait()

        # Stop accepting, in two steps. A connection accepted just now has its setup
        # task (asyncio's _accept_connection2) scheduled but not started: cancelled
        # before its first step it would never close the accepted socket, and started
        # after server.close() it fails an assertion in asyncio and leaks the socket.
        # So: no more accepts, one loop iteration for those tasks to start, then close.
        loop.remove_reader(sock.fileno())
        await asyncio.sleep(0)
        server.close()
        await self._drop_all_connections(server)

    async def _drop_all_connections(self, server: asyncio.AbstractServer) -> None:
        """Abort every connection and cancel every task until nothing is left open."""
        loop = asyncio.get_running_loop()
        current = asyncio.current_task()
        deadline = loop.time() + _SHUTDOWN_GRACE
        quiet_rounds = rounds = 0
        # Closing takes several loop iterations (task cancelled -> transport closed ->
        # connection_lost -> session task cancelled), and a connection accepted just
        # before server.close() gets its session only on the way. So sweep again until
        # a few rounds in a row find nothing.
        while quiet_rounds < 3 and loop.time() < deadline:
            abort_clients = getattr(server, "abort_clients", None)  # Python 3.13+
            if abort_clients is not None:
                abort_clients()
            for session in list(self._sessions):
                session.abort()
            tasks = [task for task in asyncio.all_tasks() if task is not current]
            for task in tasks:
                task.cancel()
            # asyncio.Server counts its accepted sockets until their connection_lost(),
            # including those still in a TLS handshake that no session knows about. It
            # is private, so it only adds to the checks where it exists.
            open_sockets = getattr(server, "_active_count", 0)
            busy = bool(tasks or self._sessions or open_sockets)
            quiet_rounds = 0 if busy else quiet_rounds + 1
            rounds += 1
            # Each step is a call_soon() away; after many rounds, stop spinning the CPU.
            await asyncio.sleep(0 if rounds < 50 else 0.01)

    def _make_session(self) -> _SessionProtocol:
        # asyncio calls this once per accepted TCP connection (before any TLS
        # handshake), so it is the connection counter.
        with self._lock:
            self._connections += 1
        assert self._loop is not None
        return _SessionProtocol(
            self,
            loop=self._loop,
            # A fixed name: the default, socket.getfqdn(), can block on DNS.
            hostname="localhost",
            ident="Kipekee LocalSMTPServer",
            tls_context=self.ssl_context if self.tls == "starttls" else None,
            require_starttls=self.require_starttls,
            # Kipekee's _SessionProtocol/_Handler enforce AUTH (see smtp_AUTH), so
            # aiosmtpd's own checks stay off.
            auth_required=False,
            auth_require_tls=False,
            authenticator=self._authenticate,
            # Internationalised addresses (accepted by default, as aiosmtpd's Controller
            # does).
            enable_SMTPUTF8=self.smtputf8,
            # aiosmtpd's default (32 MiB) unless a test wants a small one.
            **({"data_size_limit": self.data_size_limit} if self.data_size_limit else {}),
        )

    def _session_opened(self, session: _SessionProtocol) -> None:
        # TCP_NODELAY: aiosmtpd writes a multi-line reply (EHLO) a line at a time, and
        # Nagle's algorithm with the client's delayed ACK would hold the second line for
        # 40 ms on every new connection, a delay of this server that no provider has.
        transport = getattr(session, "transport", None)
        sock = transport.get_extra_info("socket") if transport is not None else None
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._lock:
            self._sessions.add(session)
            self._peak_open = max(self._peak_open, len(self._sessions))

    def _session_closed(self, session: _SessionProtocol) -> None:
        with self._lock:
            self._sessions.discard(session)

    def _count(self, command: str) -> None:
        with self._lock:
            self._commands[command] = self._commands.get(command, 0) + 1

    def _add_group(self, group: list[str]) -> None:
        with self._lock:
            self._groups.append(group)

    def _join_group(self, group: list[str], verb: str) -> None:
        with self._lock:
            group.append(verb)

    def _authenticate(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        mechanism: str,
        auth_data: Any,
    ) -> AuthResult:
        if isinstance(auth_data, LoginPassword) and self.auth is not None:
            username = auth_data.login.decode("utf-8", "surrogateescape")
            expected = self.auth.get(username)
            if expected is not None and hmac.compare_digest(
                expected.encode("utf-8"), auth_data.password
            ):
                return AuthResult(success=True, auth_data=username)
        with self._lock:
            self._auth_failures += 1
        # handled=False: aiosmtpd replies "535 5.7.8 Authentication credentials invalid"
        return AuthResult(success=False, handled=False)

    def _record(self, message: ReceivedMessage) -> None:
        if self.on_message is not None:
            self.on_message(message)
        with self._arrived:
            self.messages.append(message)
            self._arrived.notify_all()


def self_signed_context(
    hostnames: Sequence[str] = ("localhost", "127.0.0.1", "::1"),
) -> tuple[ssl.SSLContext, bytes]:
    """A server SSLContext with a new, truly self-signed certificate, and its PEM.

    The certificate is its own issuer and a CA (so ``ssl.create_default_context(
    cadata=pem.decode())`` trusts it), valid for one day back and 30 days ahead, for
    each of ``hostnames`` (IP addresses become IP SANs, the rest DNS SANs). A client
    using the public CA bundle (certifi) rejects it, as it would a misconfigured server.
    """
    cert_pem, key_pem = _self_signed_certificate(hostnames)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    # load_cert_chain() only reads files; they are deleted as soon as it has read them.
    with tempfile.TemporaryDirectory(prefix="kipekee-tls-") as tmp:
        cert_path, key_path = Path(tmp, "cert.pem"), Path(tmp, "key.pem")
        cert_path.write_bytes(cert_pem)
        key_path.write_bytes(key_pem)
        context.load_cert_chain(cert_path, key_path)
    return context, cert_pem


def _self_signed_certificate(hostnames: Sequence[str]) -> tuple[bytes, bytes]:
    """The PEMs of a new self-signed CA certificate for ``hostnames`` and of its key."""
    # Lazy: cryptography is not a dependency of the "testing" extra (trustme, in the
    # "test" one, brings it); only this function needs it.
    from cryptography import x509  # noqa: PLC0415
    from cryptography.hazmat.primitives import hashes, serialization  # noqa: PLC0415
    from cryptography.hazmat.primitives.asymmetric import ec  # noqa: PLC0415
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID  # noqa: PLC0415

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Kipekee testing"),
            x509.NameAttribute(NameOID.COMMON_NAME, hostnames[0] if hostnames else "localhost"),
        ]
    )
    alt_names: list[x509.GeneralName] = []
    for hostname in hostnames:
        try:
            alt_names.append(x509.IPAddress(ipaddress.ip_address(hostname)))
        except ValueError:
            alt_names.append(x509.DNSName(hostname))
    now = datetime.datetime.now(datetime.UTC)
    public_key = key.public_key()
    # A CA's usages (sign certificates and CRLs) and a server's (sign the handshake);
    # everything else off.
    usage = x509.KeyUsage(**dict.fromkeys(_KEY_USAGES, False), digital_signature=True,
                          key_cert_sign=True, crl_sign=True)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(usage, critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        # Subject and authority key identifiers: OpenSSL's strict verification (the
        # default from Python 3.13) wants them on CA certificates.
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(public_key), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


#: The usages x509.KeyUsage takes besides the three a self-signed server CA needs.
_KEY_USAGES = ("content_commitment", "key_encipherment", "data_encipherment",
               "key_agreement", "encipher_only", "decipher_only")


def _print_message(message: ReceivedMessage) -> None:
    print(
        f"from={message.mail_from} to={','.join(message.rcpt_tos)} subject={message.subject!r}",
        flush=True,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run a capture server in the foreground until Ctrl-C."""
    parser = argparse.ArgumentParser(
        prog="python -m kipekee.testing",
        description="A local SMTP server that accepts every message and prints a line "
        "for each (plain SMTP, no AUTH).",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default %(default)s)")
    parser.add_argument(
        "--port", type=int, default=1025, help="port, 0 for any free one (default %(default)s)"
    )
    args = parser.parse_args(argv)
    with LocalSMTPServer(host=args.host, port=args.port, on_message=_print_message) as server:
        print(
            f"Kipekee test SMTP server listening on {server.host} port {server.port} "
            "(Ctrl-C to stop)",
            flush=True,
        )
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            print("stopping", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
