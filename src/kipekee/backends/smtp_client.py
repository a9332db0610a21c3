"""The SMTP client under Kipekee's SMTP backend: ``smtplib.SMTP`` with the transaction
rewritten, so that a message on a warm connection costs two round trips and no wait can
outlast its deadline.

What it changes, and why:

- **PIPELINING** (RFC 2920), when the server offers it: ``MAIL FROM``, every ``RCPT TO``
  and ``DATA`` go in one write and their replies are read together; then the content and
  its reply. smtplib waits for each reply (four round trips with the content).
- **CHUNKING** (RFC 3030), when offered: ``BDAT`` instead of ``DATA`` (no dot-stuffing,
  no 354 to wait for); with PIPELINING, a message of up to 64 KiB goes with its envelope
  in one write, one round trip in all.
- **The recipient limit of a transaction** (RFC 5321 4.5.3.1.10): recipients refused with
  ``452`` (or ``452``/``552`` with enhanced code ``x.5.3``, "too many recipients") go out
  in further transactions on the same connection, as long as each one delivers to some.
- **An inactivity timeout**: each read and each write waits at most ``timeout`` for
  progress. smtplib hands the whole message to ``socket.sendall``, whose timeout bounds
  the entire transfer, so a large message to a slow reader can never be sent.
- **The reply after the final dot** has a wait of its own, ``final_reply_timeout``
  (RFC 5321 4.5.3.2.6: 10 minutes), longer than ``timeout``: the server has the whole
  message by then and may still be reading what the socket buffers held, checking it, or
  writing it to disk; a client that gives up sooner sends the message again although the
  server took it. Without it (``None``), ``timeout`` plus the time a slow server needs to
  read what the socket buffers may still hold (at most the whole content), up to the 10
  minutes.
- **Deadlines** (:mod:`kipekee.deadlines`): every wait (connect, TLS handshake, each
  reply, each write) is bounded by the time left, so neither a server that trickles
  bytes nor a caller's budget is ever overrun by more than one scheduling slice.
- **TLS session resumption**: the last TLS session per (provider, host, port) is kept in
  the process and offered to the next handshake (a shared ``SSLContext`` is needed: a
  session only resumes with the context that made it).
- **SMTPUTF8** (RFC 6531): commands are encoded before the first byte is sent, so an
  address that needs SMTPUTF8 is refused before ``MAIL FROM``, never half-way through.
- **The queue id** of the reply after the content ("250 2.0.0 Ok: queued as 4ABC123").

Why not a library: aiosmtplib (5.1) sends ``MAIL``, each ``RCPT`` and ``DATA`` one round
trip at a time, as smtplib does, and is asyncio-only while Django's email backend API (and
Kipekee's engines) are synchronous. No maintained synchronous client pipelines. smtplib
stays the base: connection, EHLO parsing, STARTTLS negotiation, AUTH and every exception
type are its own; this class overrides the I/O underneath and adds the transaction.
"""

from __future__ import annotations

import re
import smtplib
import socket
import ssl
import threading
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

from .. import deadlines

__all__ = [
    "SMTP",
    "SMTP_SSL",
    "Delivery",
    "SMTPDeadlineExceeded",
    "SMTPTimeoutError",
    "Transaction",
    "is_recipient_limit",
    "queue_id",
]

_CRLF = b"\r\n"
_MAXLINE = 8192  # smtplib's limit on a reply line
# Commands per write when pipelining: their replies must fit the server's send buffer
# while the client is still writing (RFC 2920 section 4: no deadlock on full buffers).
_GROUP = 100
# Message content goes to the socket in pieces of this size, each with its own timeout.
_PIECE = 64 * 1024
# The slowest rate (bytes per second) at which a server may read the content that the
# socket buffers still held when the last byte was handed to them, before its reply to
# the final dot counts as late. The client cannot see how much that is (its own buffer
# and the server's, which the kernel grows as it sees fit: megabytes on a fast link), so
# it allows for all of the content: 4 MB gives the server 32 s more than ``timeout``.
_SLOWEST_READER = 128 * 1024
# RFC 5321 4.5.3.2.6: a client should wait 10 minutes for the reply after the final dot.
_DATA_TERMINATION = 600.0


class SMTPTimeoutError(smtplib.SMTPException, TimeoutError):
    """The server made no progress for ``timeout`` seconds; the connection is closed.

    An ``SMTPException`` (so Django's ``fail_silently`` covers it, as it covers smtplib's
    "Connection unexpectedly closed: timed out") and a ``TimeoutError``.
    """


class SMTPDeadlineExceeded(SMTPTimeoutError, deadlines.DeadlineExceeded):
    """The deadline (:mod:`kipekee.deadlines`) came first; the connection is closed."""


def is_recipient_limit(code: int, text: bytes) -> bool:
    """Whether a reply to ``RCPT TO`` says the transaction has all the recipients it can
    take (RFC 5321 4.5.3.1.10), rather than something about this recipient.

    ``452`` is the reply for it; some servers answer ``552``, which the RFC says to treat
    the same. An enhanced status code decides when there is one (``x.5.3``: too many
    recipients; ``4.2.2``, a full mailbox, is about the recipient).
    """
    if code not in (452, 552):
        return False
    enhanced = _ENHANCED.match(text)
    if enhanced:
        return enhanced.group(2, 3) == (b"5", b"3")
    return code == 452 or b"too many" in text.lower()


_ENHANCED = re.compile(rb"([245])\.(\d{1,3})\.(\d{1,3})\b")
_QUEUE_ID = (
    re.compile(rb"\bqueued as ([^\s;,()\[\]]+)", re.I),  # Postfix, SendGrid, many others
    re.compile(rb"\bid=([^\s;,()\[\]]+)", re.I),  # Exim: "250 OK id=1tXyzA-000AbC-Q1"
    re.compile(rb"^(?:2\.\d{1,3}\.\d{1,3} )?ok:? ([0-9a-f][0-9a-f-]{15,})$", re.I),  # SES
)


def queue_id(reply: bytes) -> str:
    """The id a server gave the message in its reply to the content, or ``""``."""
    for pattern in _QUEUE_ID:
        found = pattern.search(reply.strip())
        if found:
            return found.group(1).rstrip(b".").decode("ascii", "replace")
    return ""


@dataclass
class Transaction:
    """What one SMTP transaction did (a message to some recipients)."""

    accepted: list[str]
    """Recipients the server accepted, and took the message for."""
    refused: dict[str, tuple[int, bytes]]
    """Recipient -> the server's reply to its ``RCPT TO``."""
    unsent: list[str]
    """Recipients not offered to the server: it had already said the transaction was full."""
    reply: tuple[int, bytes]
    """The reply to the content (2xx)."""


@dataclass
class Delivery:
    """What :meth:`SMTP.deliver` did, over one or more transactions."""

    refused: dict[str, tuple[int, bytes]] = field(default_factory=dict)
    """Recipient -> why it does not have the message (the server's reply, or for a
    recipient left over when a later transaction failed, that failure's)."""
    queue_ids: dict[str, str] = field(default_factory=dict)
    """Recipient -> the queue id of the transaction that delivered to it (if given)."""
    transactions: int = 0


class _TLSSessions:
    """The last TLS session per key, with the context it belongs to (process-wide)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sessions: dict[Hashable, tuple[ssl.SSLContext, ssl.SSLSession]] = {}

    def get(self, key: Hashable, context: ssl.SSLContext) -> ssl.SSLSession | None:
        with self._lock:
            kept = self._sessions.get(key)
        return kept[1] if kept is not None and kept[0] is context else None

    def put(self, key: Hashable, context: ssl.SSLContext, session: ssl.SSLSession) -> None:
        with self._lock:
            self._sessions[key] = (context, session)

    def clear(self) -> None:
        with self._lock:
            self._sessions.clear()


tls_sessions = _TLSSessions()


def _stuffed(content: bytes) -> Iterator[bytes]:
    """The content dot-stuffed (RFC 5321 4.5.2), in pieces of about ``_PIECE`` bytes cut
    at line ends, so a large message is never copied whole."""
    start, size = 0, len(content)
    while start < size:
        end = content.rfind(b"\n", start, start + _PIECE) + 1 if start + _PIECE < size else size
        if end <= start:  # a line longer than a piece
            end = content.find(b"\n", start + _PIECE) + 1 or size
        yield re.sub(rb"(?m)^\.", b"..", content[start:end])
        start = end


class SMTP(smtplib.SMTP):
    """smtplib's client with pipelined transactions, inactivity timeouts, deadlines and
    TLS session resumption (see the module's docstring). A drop-in for ``smtplib.SMTP``:
    ``sendmail`` keeps its arguments, results and exceptions, and leaves what it cannot
    return (the queue ids) on :attr:`last_delivery`.

    ``tls_session_key`` names the TLS sessions this connection may resume and store
    (with the host and port): Kipekee's backend passes the provider's alias.
    ``ipv4_only`` resolves and connects over IPv4 only. ``final_reply_timeout``: seconds
    to wait for the reply after the end of a message's content (at least ``timeout``; see
    the module's docstring), or ``None`` for ``timeout`` and the time the socket buffers
    may need.
    """

    def __init__(
        self,
        host: str = "",
        port: int = 0,
        local_hostname: str | None = None,
        timeout: float | object | None = socket._GLOBAL_DEFAULT_TIMEOUT,  # type: ignore[attr-defined]
        source_address: tuple[str, int] | None = None,
        *,
        ipv4_only: bool = False,
        tls_session_key: Hashable | None = None,
        final_reply_timeout: float | None = None,
    ) -> None:
        self.ipv4_only = ipv4_only
        self.final_reply_timeout = final_reply_timeout
        self.tls_session_key = tls_session_key
        self._port = port
        self._pending = bytearray()  # what was read past the end of the last reply
        self.last_delivery: Delivery | None = None
        super().__init__(host, port, local_hostname, timeout, source_address)  # type: ignore[arg-type]

    def _debug(self, *args: Any) -> None:
        smtplib.SMTP._print_debug(self, *args)  # type: ignore[attr-defined]

    # -- waits: the inactivity timeout and the deadline --------------------------------

    def _inactivity(self) -> float | None:
        timeout: Any = self.timeout
        if timeout is socket._GLOBAL_DEFAULT_TIMEOUT:  # type: ignore[attr-defined]
            return socket.getdefaulttimeout()
        return float(timeout) if timeout is not None else None

    def _wait(self, doing: str, inactivity: float | None = None) -> tuple[float | None, bool]:
        """The timeout for one wait and whether the deadline (not inactivity) sets it."""
        idle = self._inactivity() if inactivity is None else inactivity
        left = deadlines.remaining()
        if left is None:
            return idle, False
        if left <= 0:
            self.close()
            raise SMTPDeadlineExceeded(f"deadline reached {doing}")
        if idle is None or left < idle:
            return left, True
        return idle, False

    def _timed_out(self, doing: str, wait: float | None, by_deadline: bool) -> SMTPTimeoutError:
        self.close()
        if by_deadline:
            return SMTPDeadlineExceeded(f"deadline reached {doing}")
        return SMTPTimeoutError(f"no progress for {wait:g} s {doing}")

    # -- connecting, TLS ---------------------------------------------------------------

    def _get_socket(self, host: str, port: int, timeout: Any) -> socket.socket:
        if self.debuglevel > 0:
            self._debug("connect: to", (host, port), self.source_address)
        self._port = port
        wait, by_deadline = self._wait("connecting")
        family = socket.AF_INET if self.ipv4_only else socket.AF_UNSPEC
        try:
            sock = self._connect(host, port, family, wait)
        except TimeoutError as exc:
            raise self._timed_out(f"connecting to {host}:{port}", wait, by_deadline) from exc
        # Commands and content are written whole: nothing is gained by Nagle's
        # algorithm, and it can hold a reply-less tail behind a delayed ACK.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def _connect(self, host: str, port: int, family: int, wait: float | None) -> socket.socket:
        if family == socket.AF_UNSPEC:
            return socket.create_connection((host, port), wait, self.source_address)
        last_error: OSError | None = None
        for fam, type_, proto, _, address in socket.getaddrinfo(
                host, port, family, socket.SOCK_STREAM):
            sock = socket.socket(fam, type_, proto)
            try:
                sock.settimeout(wait)
                if self.source_address:
                    sock.bind(self.source_address)
                sock.connect(address)
                return sock
            except OSError as exc:
                sock.close()
                last_error = exc
        raise last_error or OSError(f"no IPv4 address for {host}")

    def _wrap(self, sock: socket.socket, context: ssl.SSLContext) -> ssl.SSLSocket:
        """The TLS handshake, offering the last session of this key for resumption."""
        key = self._session_key()
        session = tls_sessions.get(key, context) if key is not None else None
        wait, by_deadline = self._wait("in the TLS handshake")
        sock.settimeout(wait)
        try:
            return context.wrap_socket(sock, server_hostname=self._host,  # type: ignore[attr-defined]
                                       session=session)
        except TimeoutError as exc:
            sock.close()
            raise self._timed_out("in the TLS handshake", wait, by_deadline) from exc

    def _session_key(self) -> Hashable | None:
        if self.tls_session_key is None:
            return None
        return (self.tls_session_key, self._host, self._port)  # type: ignore[attr-defined]

    def _keep_tls_session(self) -> None:
        sock, key = self.sock, self._session_key()
        if key is None or not isinstance(sock, ssl.SSLSocket):
            return
        session = sock.session
        # TLS 1.3 tickets arrive after the handshake; by the EHLO reply they have.
        if session is not None and (session.has_ticket or session.id):
            tls_sessions.put(key, sock.context, session)

    def connect(self, host: str = "localhost", port: int = 0,
                source_address: Any = None) -> tuple[int, bytes]:
        self._pending.clear()
        return super().connect(host, port, source_address)

    def starttls(self, *, context: ssl.SSLContext | None = None) -> tuple[int, bytes]:  # type: ignore[override]
        """smtplib's STARTTLS, with the deadline and TLS session resumption."""
        self.ehlo_or_helo_if_needed()
        if not self.has_extn("starttls"):
            raise smtplib.SMTPNotSupportedError("STARTTLS extension not supported by server.")
        resp, reply = self.docmd("STARTTLS")
        if resp != 220:
            raise smtplib.SMTPResponseException(resp, reply)
        if context is None:
            context = ssl.create_default_context()
        assert self.sock is not None
        self.sock = self._wrap(self.sock, context)
        # RFC 3207: forget what was learnt before TLS, including bytes that came after
        # the 220 (they could be an injected reply).
        self._pending.clear()
        self.file = None
        self.helo_resp = None
        self.ehlo_resp = None
        self.esmtp_features = {}
        self.does_esmtp = False
        return resp, reply

    def ehlo(self, name: str = "") -> tuple[int, bytes]:
        reply = super().ehlo(name)
        self._keep_tls_session()
        return reply

    def quit(self) -> tuple[int, bytes]:
        try:
            return super().quit()
        except SMTPTimeoutError:
            # Leaving anyway: a server slow to say goodbye is no error.
            return -1, b""

    def close(self) -> None:
        self._pending.clear()
        super().close()

    # -- reading and writing ------------------------------------------------------------

    def getreply(self) -> tuple[int, bytes]:
        """smtplib's reply reader, with the inactivity timeout and the deadline."""
        return self._reply()

    def _reply(self, inactivity: float | None = None) -> tuple[int, bytes]:
        lines = []
        while True:
            line = self._line(inactivity)
            if self.debuglevel > 0:
                self._debug("reply:", repr(line))
            lines.append(line[4:].strip(b" \t\r\n"))
            try:
                code = int(line[:3])
            except ValueError:
                code = -1
                break
            if line[3:4] != b"-":
                break
        message = b"\n".join(lines)
        if self.debuglevel > 0:
            self._debug(f"reply: retcode ({code}); Msg: {message!r}")
        return code, message

    def _line(self, inactivity: float | None) -> bytes:
        while True:
            end = self._pending.find(b"\n")
            if end >= 0:
                line = bytes(self._pending[: end + 1])
                del self._pending[: end + 1]
                break
            if len(self._pending) > _MAXLINE:
                break
            self._receive(inactivity)
        if len(line) > _MAXLINE:
            self.close()
            raise smtplib.SMTPResponseException(500, "Line too long.")
        return line

    def _receive(self, inactivity: float | None) -> None:
        if self.sock is None:
            raise smtplib.SMTPServerDisconnected("please run connect() first")
        wait, by_deadline = self._wait("waiting for a reply", inactivity)
        self.sock.settimeout(wait)
        try:
            chunk = self.sock.recv(65536)
        except TimeoutError as exc:
            raise self._timed_out("waiting for a reply", wait, by_deadline) from exc
        except OSError as exc:
            self.close()
            raise smtplib.SMTPServerDisconnected(f"Connection unexpectedly closed: {exc}") from exc
        if not chunk:
            self.close()
            raise smtplib.SMTPServerDisconnected("Connection unexpectedly closed")
        self._pending += chunk

    def send(self, s: str | bytes) -> None:  # type: ignore[override]
        """smtplib's write of one command, with the inactivity timeout and the deadline."""
        if self.debuglevel > 0:
            self._debug("send:", repr(s))
        if self.sock is None:
            raise smtplib.SMTPServerDisconnected("please run connect() first")
        self._write(s.encode(self.command_encoding) if isinstance(s, str) else s)

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if self.sock is None:
                raise smtplib.SMTPServerDisconnected("please run connect() first")
            wait, by_deadline = self._wait("sending")
            self.sock.settimeout(wait)
            try:
                sent = self.sock.send(view[:_PIECE])
            except TimeoutError as exc:
                raise self._timed_out("sending", wait, by_deadline) from exc
            except OSError as exc:
                self.close()
                raise smtplib.SMTPServerDisconnected(f"Server not connected: {exc}") from exc
            view = view[sent:]

    def _send_group(self, commands: Sequence[bytes]) -> None:
        if self.debuglevel > 0:
            for command in commands:
                self._debug("send:", repr(command))
        self._write(b"".join(commands))

    def _final_wait(self, size: int) -> float | None:
        """The inactivity timeout for the reply to the end of a message of ``size`` bytes:
        also the time a slow server needs for what the socket buffers may still hold."""
        idle = self._inactivity()
        if idle is None:
            return None
        if self.final_reply_timeout is not None:
            return max(idle, self.final_reply_timeout)
        return min(idle + size / _SLOWEST_READER, max(idle, _DATA_TERMINATION))

    def _send_content(self, content: bytes) -> tuple[int, bytes]:
        """After DATA's 354: the content and its final dot; the reply to them."""
        end = (b"" if content.endswith(_CRLF) else _CRLF) + b"." + _CRLF
        if len(content) <= _PIECE:  # one write (one TCP segment) for most messages
            self._write(b"".join(_stuffed(content)) + end)
        else:
            for piece in _stuffed(content):
                self._write(piece)
            self._write(end)
        return self._reply(self._final_wait(len(content)))

    def _send_chunk(self, content: bytes) -> tuple[int, bytes]:
        """CHUNKING (RFC 3030): ``BDAT <size> LAST`` and the content as it is (no
        dot-stuffing); the reply to them."""
        self._write(_bdat(content))
        for start in range(0, len(content), _PIECE):
            self._write(content[start: start + _PIECE])
        return self._reply(self._final_wait(len(content)))

    def _reset(self) -> None:
        """RSET after a failed transaction; a connection that fails it is closed."""
        try:
            self.rset()
        except smtplib.SMTPException:
            self.close()

    # -- the transaction -------------------------------------------------------------

    def sendmail(self, from_addr: str, to_addrs: str | Sequence[str], msg: str | bytes,  # type: ignore[override]
                 mail_options: Sequence[str] = (),
                 rcpt_options: Sequence[str] = ()) -> dict[str, tuple[int, bytes]]:
        """smtplib's ``sendmail``: the same arguments, results and exceptions, pipelined
        when the server offers it, and with the recipients a server turns away for its
        per-transaction limit sent in further transactions (:meth:`deliver`) instead of
        being returned as refused. :attr:`last_delivery` has the queue ids."""
        self.last_delivery = None
        if isinstance(to_addrs, str):
            to_addrs = [to_addrs]
        if isinstance(msg, str):
            content = smtplib._fix_eols(msg).encode("ascii")  # type: ignore[attr-defined]
        else:
            content = msg
        self.last_delivery = self.deliver(from_addr, to_addrs, content, mail_options,
                                          rcpt_options)
        return self.last_delivery.refused

    def deliver(self, from_addr: str, to_addrs: Sequence[str], content: bytes,
                mail_options: Sequence[str] = (),
                rcpt_options: Sequence[str] = ()) -> Delivery:
        """Send ``content`` to every recipient, in further transactions on this
        connection when the server says a transaction is full (RFC 5321 4.5.3.1.10).

        The first transaction raises as ``sendmail`` does. Once one has delivered, the
        message must not be sent again to its recipients, so a later transaction's
        failure is not raised: its recipients are in :attr:`Delivery.refused` with the
        failure's reply (or, without one, as a ``421`` Kipekee writes, naming the error).
        Each further transaction goes only to recipients the server turned away for the
        limit and has delivered to at least one recipient, so this ends.
        """
        delivery = Delivery()
        # Each address once: a transaction would name it twice (some servers then deliver
        # twice), and a second round must not resend to one that has the message.
        pending = list(dict.fromkeys(to_addrs))
        while pending:
            try:
                done = self.transaction(from_addr, pending, content, mail_options, rcpt_options)
            except smtplib.SMTPException as exc:
                if not delivery.transactions:
                    raise
                replies = getattr(exc, "recipients", None) or {}
                for address in pending:
                    delivery.refused[address] = replies.get(address) or _reply_of(exc)
                return delivery
            delivery.transactions += 1
            given = queue_id(done.reply[1])
            for address in done.accepted:
                if given:
                    delivery.queue_ids[address] = given
            again = set(done.unsent)
            for address, (code, text) in done.refused.items():
                if is_recipient_limit(code, text):
                    again.add(address)
                else:
                    delivery.refused[address] = (code, text)
            pending = [address for address in pending if address in again]
        return delivery

    def transaction(self, from_addr: str, to_addrs: Sequence[str], content: bytes,
                    mail_options: Sequence[str] = (),
                    rcpt_options: Sequence[str] = ()) -> Transaction:
        """One transaction: ``content`` to as many of ``to_addrs`` as the server takes.

        Raises as smtplib's ``sendmail`` does: ``SMTPSenderRefused``,
        ``SMTPRecipientsRefused`` (none accepted), ``SMTPDataError``; after a refusal the
        transaction is reset (RSET), or the connection closed if the server said 421.
        Every command is encoded before the first is sent, so an address that cannot be
        encoded (non-ASCII without ``SMTPUTF8`` in ``mail_options``) raises
        ``UnicodeEncodeError`` with nothing sent.
        """
        self.ehlo_or_helo_if_needed()
        if not content.endswith(_CRLF):
            content += _CRLF  # as DATA's final dot needs; the same for BDAT
        options = list(mail_options) if self.does_esmtp else []
        if self.does_esmtp and self.has_extn("size"):
            options.insert(0, f"SIZE={len(content)}")
        utf8 = any(option.upper() == "SMTPUTF8" for option in options)
        if utf8 and not self.has_extn("smtputf8"):
            raise smtplib.SMTPNotSupportedError("SMTPUTF8 is not offered by the server")
        encoding = "utf-8" if utf8 else "ascii"
        rcpt_tail = (" " + " ".join(rcpt_options)) if rcpt_options and self.does_esmtp else ""
        mail = _command(f"MAIL FROM:{quoteaddr(from_addr)}", options, encoding)
        rcpts = [_command(f"RCPT TO:{quoteaddr(address)}{rcpt_tail}", (), encoding)
                 for address in to_addrs]
        chunking = self.has_extn("chunking")
        if self.has_extn("pipelining"):
            return self._pipelined(from_addr, list(to_addrs), mail, rcpts, content, chunking)
        return self._one_by_one(from_addr, list(to_addrs), mail, rcpts, content, chunking)

    def _pipelined(self, from_addr: str, to_addrs: list[str], mail: bytes, rcpts: list[bytes],
                   content: bytes, chunking: bool) -> Transaction:
        accepted: list[str] = []
        refused: dict[str, tuple[int, bytes]] = {}
        sender_reply: tuple[int, bytes] | None = None
        # What ends the envelope's last group: DATA; or with CHUNKING, BDAT and the whole
        # content of a small message (one round trip for all), RFC 3030 section 4.2.
        ending = ([b"DATA\r\n"] if not chunking
                  else [_bdat(content), content] if len(content) <= _PIECE else [])
        end_reply: tuple[int, bytes] | None = None
        full = False
        next_rcpt = 0
        while next_rcpt < len(rcpts) and not full:
            group = rcpts[next_rcpt: next_rcpt + _GROUP - 1]
            first = next_rcpt == 0
            last = next_rcpt + len(group) == len(rcpts)
            self._send_group(([mail] if first else []) + group + (ending if last else []))
            if first:
                sender_reply = self._reply()
                if sender_reply[0] == 421:
                    self.close()
                    raise smtplib.SMTPSenderRefused(*sender_reply, from_addr)
            for address in to_addrs[next_rcpt: next_rcpt + len(group)]:
                refusal = self._rcpt_reply(address, accepted, refused)
                full = full or (refusal is not None and is_recipient_limit(*refusal))
            next_rcpt += len(group)
            if last and ending:
                end_reply = self._reply(self._final_wait(len(content)) if chunking else None)
            assert sender_reply is not None
            if sender_reply[0] != 250:
                break  # no transaction: offer no more recipients
        assert sender_reply is not None
        if not chunking and end_reply is not None and end_reply[0] == 354 and (
                sender_reply[0] != 250 or not accepted):
            # A server that said 354 to a DATA it should have refused: end it empty.
            self._send_group([b".\r\n"])
            self._reply()
        if sender_reply[0] != 250:
            self._reset()
            raise smtplib.SMTPSenderRefused(*sender_reply, from_addr)
        if not accepted:
            self._reset()
            raise smtplib.SMTPRecipientsRefused(refused)
        unsent = to_addrs[next_rcpt:]
        if chunking:
            # Not sent with the envelope: a large message (not sent before the envelope is
            # known to be accepted), or recipients cut by the server's limit.
            reply = end_reply if end_reply is not None else self._send_chunk(content)
            return self._accepted(unsent, accepted, refused, reply)
        if end_reply is None:  # the server's limit cut the recipients before DATA was sent
            self._send_group([b"DATA\r\n"])
            end_reply = self._reply()
        return self._content(unsent, accepted, refused, end_reply, content)

    def _one_by_one(self, from_addr: str, to_addrs: list[str], mail: bytes,
                    rcpts: list[bytes], content: bytes, chunking: bool) -> Transaction:
        self._send_group([mail])
        code, text = self._reply()
        if code != 250:
            if code == 421:
                self.close()
            else:
                self._reset()
            raise smtplib.SMTPSenderRefused(code, text, from_addr)
        accepted: list[str] = []
        refused: dict[str, tuple[int, bytes]] = {}
        offered = 0
        for address, command in zip(to_addrs, rcpts, strict=True):
            self._send_group([command])
            offered += 1
            refusal = self._rcpt_reply(address, accepted, refused)
            if refusal is not None and is_recipient_limit(*refusal):
                break
        if not accepted:
            self._reset()
            raise smtplib.SMTPRecipientsRefused(refused)
        if chunking:
            return self._accepted(to_addrs[offered:], accepted, refused,
                                  self._send_chunk(content))
        self._send_group([b"DATA\r\n"])
        return self._content(to_addrs[offered:], accepted, refused, self._reply(), content)

    def _content(self, unsent: list[str], accepted: list[str],
                 refused: dict[str, tuple[int, bytes]], data_reply: tuple[int, bytes],
                 content: bytes) -> Transaction:
        """After DATA: the content, if the server said 354."""
        if data_reply[0] != 354:
            self._refused_content(data_reply)
        return self._accepted(unsent, accepted, refused, self._send_content(content))

    def _accepted(self, unsent: list[str], accepted: list[str],
                  refused: dict[str, tuple[int, bytes]], reply: tuple[int, bytes],
                  ) -> Transaction:
        """The transaction, if the server took the message (``reply`` to its end)."""
        if reply[0] != 250:
            self._refused_content(reply)
        return Transaction(accepted=accepted, refused=refused, unsent=unsent, reply=reply)

    def _refused_content(self, reply: tuple[int, bytes]) -> NoReturn:
        if reply[0] == 421:
            self.close()
        else:
            self._reset()
        raise smtplib.SMTPDataError(*reply)


    def _rcpt_reply(self, address: str, accepted: list[str],
                    refused: dict[str, tuple[int, bytes]]) -> tuple[int, bytes] | None:
        """Read the reply to ``RCPT TO:<address>``: the address goes to ``accepted`` (and
        ``None`` is returned) or to ``refused`` with the reply, which is returned. A 421
        closes the connection and raises, as smtplib does."""
        code, text = self._reply()
        if code in (250, 251):
            accepted.append(address)
            return None
        refused[address] = (code, text)
        if code == 421:
            self.close()
            raise smtplib.SMTPRecipientsRefused(refused)
        return code, text


class SMTP_SSL(SMTP):  # noqa: N801 - smtplib's name
    """:class:`SMTP` over implicit TLS (port 465), resuming TLS sessions."""

    default_port = smtplib.SMTP_SSL_PORT

    def __init__(self, host: str = "", port: int = 0, local_hostname: str | None = None,
                 timeout: float | object | None = socket._GLOBAL_DEFAULT_TIMEOUT,  # type: ignore[attr-defined]
                 source_address: tuple[str, int] | None = None, *,
                 context: ssl.SSLContext | None = None, ipv4_only: bool = False,
                 tls_session_key: Hashable | None = None,
                 final_reply_timeout: float | None = None) -> None:
        self.context = context if context is not None else ssl.create_default_context()
        super().__init__(host, port, local_hostname, timeout, source_address,
                         ipv4_only=ipv4_only, tls_session_key=tls_session_key,
                         final_reply_timeout=final_reply_timeout)

    def _get_socket(self, host: str, port: int, timeout: Any) -> socket.socket:
        return self._wrap(super()._get_socket(host, port, timeout), self.context)


def _bdat(content: bytes) -> bytes:
    return b"BDAT %d LAST\r\n" % len(content)


#: An ASCII dot-atom at a host name: what an envelope address almost always is.
_PLAIN_ADDRESS = re.compile(
    r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
    r"@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*"
)


def quoteaddr(address: str) -> str:
    """``smtplib.quoteaddr(address)``: a plain address in angle brackets without asking
    the stdlib's address parser (a quarter of the SMTP client's CPU per message, twice a
    message); anything else through it."""
    if type(address) is str and _PLAIN_ADDRESS.fullmatch(address):
        return f"<{address}>"
    return smtplib.quoteaddr(address)


def _command(line: str, options: Sequence[str], encoding: str) -> bytes:
    if options:
        line = f"{line} {' '.join(options)}"
    if "\r" in line or "\n" in line:
        shown = line.replace("\n", "\\n").replace("\r", "\\r")
        raise ValueError(f"command and arguments contain prohibited newline characters: {shown}")
    return line.encode(encoding) + _CRLF


def _reply_of(exc: BaseException) -> tuple[int, bytes]:
    """A reply standing for an exception that ended a later transaction of a message."""
    code = getattr(exc, "smtp_code", None)
    if isinstance(code, int) and code > 0:
        return code, getattr(exc, "smtp_error", b"") or b""
    # No reply from the server (a disconnect, a timeout): 421 is what a server says when it
    # closes the session, so the recipients are retried as after any 4xx.
    return 421, f"(no reply; written by Kipekee) {type(exc).__name__}: {exc}".encode()
