"""Kipekee's SMTP backend: Django's, with the defaults a production sender needs.

Differences from ``django.core.mail.backends.smtp.EmailBackend``:

- a default ``timeout`` (Django's is none: a stalled server hangs the worker forever);
- TLS verified against certifi's CA bundle by default, or the ``ca_file`` you trust;
- ``ipv4_only`` for hosts whose IPv6 route is broken (the payments seed forced this by
  patching ``socket.getaddrinfo`` for the whole process; here it is per provider);
- per-recipient refusals are kept on the message as ``message.refused_recipients``
  (Django's backend drops what ``smtplib.sendmail`` returns), and the server's queue id
  ("250 2.0.0 Ok: queued as 4ABC123") as ``message.provider_message_ids``;
- the wire transaction is :mod:`kipekee.backends.smtp_client`'s: PIPELINING when the
  server offers it (a message on a warm connection costs two round trips), recipients
  past the server's per-transaction limit sent in further transactions, ``timeout`` as an
  inactivity timeout (a large message to a slow server is not cut off), SMTPUTF8 for
  non-ASCII local parts when offered (refused before ``MAIL FROM`` when not), TLS
  sessions resumed on reconnect;
- deadlines: each exchange (opening the session; one message) ends within
  ``exchange_time_limit`` seconds, however slowly the server trickles, and within the
  caller's deadline (:mod:`kipekee.deadlines`, e.g. the in-request ``NOW_TIME_BUDGET``);
- options are checked: an unknown option is an error, not silently ignored, on every
  Django version;
- it never fails silently.

The connection is reused across ``send_messages`` calls while it is open (``open()`` …
``close()``), as with Django's backend.
"""

from __future__ import annotations

import email.policy
import functools
import smtplib
import ssl
from email.headerregistry import AddressHeader
from typing import Any

import certifi
import django
from django.core.mail import EmailMessage
from django.core.mail.backends.smtp import EmailBackend as DjangoSMTPBackend
from django.utils.encoding import punycode
from django.utils.functional import cached_property

from .. import deadlines, wire
from ..exceptions import ConfigurationError
from ..message import is_plain_addr_spec
from .smtp_client import SMTP, SMTP_SSL

DEFAULT_TIMEOUT = 15.0
_STDLIB_CLIENTS = {False: smtplib.SMTP, True: smtplib.SMTP_SSL}
#: Seconds one exchange with the server may take in all: opening the session, or one
#: message. RFC 5321's longest single wait is the 10 minutes for the reply after the
#: final dot (4.5.3.2.6).
DEFAULT_EXCHANGE_TIME_LIMIT = 600.0


def _wire_bytes(email_message: EmailMessage, *, utf8: bool = False) -> bytes:
    """The message as bytes with CRLF line ends, as each Django version builds it, with
    large attachments encoded once (:mod:`kipekee.wire`).

    ``utf8``: for a server that took ``SMTPUTF8``, headers in UTF-8 (RFC 6532) where
    Django's modern message allows (6.0 and later), built by Django whole; Django 5.2
    encodes its headers as it builds them, so they stay as they are.
    """
    if utf8 and django.VERSION >= (6, 0):
        return email_message.message(  # type: ignore[call-arg,no-any-return]
            policy=email.policy.SMTPUTF8).as_bytes()
    return wire.message_bytes(email_message)


@functools.lru_cache(maxsize=32)
def _shared_ssl_context(ca_file: str | None, certfile: str | None,
                        keyfile: str | None) -> ssl.SSLContext:
    # One context per trust configuration for the whole process: a TLS session only
    # resumes with the context that made it, and loading certifi's bundle costs a few
    # milliseconds a connection. Verified TLS (hostname and chain) against certifi's
    # bundle, or the CA file the user chose to trust (a private relay with its own CA or
    # a self-signed cert). A file changed on disk is read again after a restart.
    context = ssl.create_default_context(cafile=ca_file or certifi.where())
    if certfile or keyfile:
        context.load_cert_chain(certfile, keyfile)  # type: ignore[arg-type]
    return context


class EmailBackend(DjangoSMTPBackend):
    """SMTP with STARTTLS (``use_tls``) or implicit TLS (``use_ssl``), AUTH and reuse."""

    def __init__(
        self,
        *,
        host: str | None = None,
        port: int | None = None,
        username: str | None = None,
        password: str | None = None,
        use_tls: bool = False,
        use_ssl: bool = False,
        timeout: float | None = DEFAULT_TIMEOUT,
        ssl_keyfile: str | None = None,
        ssl_certfile: str | None = None,
        ca_file: str | None = None,
        ipv4_only: bool = False,
        local_hostname: str | None = None,
        exchange_time_limit: float = DEFAULT_EXCHANGE_TIME_LIMIT,
        alias: str | None = None,
    ) -> None:
        where = f"provider {alias!r}" if alias else "kipekee SMTP backend"
        if not host:
            raise ConfigurationError(f"{where}: OPTIONS must define 'host'.")
        if use_tls and use_ssl:
            raise ConfigurationError(f"{where}: 'use_tls' (STARTTLS) and 'use_ssl' exclude each other.")
        if bool(username) != bool(password):
            raise ConfigurationError(f"{where}: set both 'username' and 'password', or neither.")
        if timeout is not None and timeout <= 0:
            raise ConfigurationError(f"{where}: 'timeout' must be > 0 seconds.")
        if not exchange_time_limit > 0:
            raise ConfigurationError(f"{where}: 'exchange_time_limit' must be > 0 seconds.")
        if port is None:
            port = 465 if use_ssl else 587 if use_tls else 25
        # Explicit values for everything, so Django 5.2 never falls back to EMAIL_* settings.
        super().__init__(
            host=host, port=port, username=username or "", password=password or "",
            use_tls=use_tls, use_ssl=use_ssl, timeout=timeout,
            ssl_keyfile=ssl_keyfile, ssl_certfile=ssl_certfile, alias=alias,
        )
        self.alias = alias
        self.ca_file = ca_file
        self.ipv4_only = ipv4_only
        self.local_hostname = local_hostname
        self.exchange_time_limit = exchange_time_limit

    @property
    def connection_class(self) -> Any:
        stdlib = smtplib.SMTP_SSL if self.use_ssl else smtplib.SMTP
        if stdlib is not _STDLIB_CLIENTS[self.use_ssl]:
            # smtplib's class has been replaced (a test double, as in Django's own tests,
            # or instrumentation): use it as Django's backend would.
            return stdlib
        client = SMTP_SSL if self.use_ssl else SMTP
        # TLS sessions are resumed per provider (and host and port).
        extra: dict[str, Any] = {"ipv4_only": self.ipv4_only,
                                 "tls_session_key": ("kipekee", self.alias or "")}
        if self.local_hostname:
            # Django passes its cached FQDN; a configured name wins (some relays check it).
            extra["local_hostname"] = self.local_hostname

        def connect(host: str, port: int, **params: Any) -> SMTP:
            return client(host, port, **{**params, **extra})

        return connect

    @cached_property
    def ssl_context(self) -> ssl.SSLContext:
        return _shared_ssl_context(None if self.ca_file is None else str(self.ca_file),
                                   self.ssl_certfile, self.ssl_keyfile)

    def open(self) -> bool | None:
        # Connect, TLS and AUTH together within the exchange time limit (and within any
        # deadline of the caller's).
        with deadlines.within(self.exchange_time_limit):
            return super().open()  # type: ignore[no-any-return]

    def close(self) -> None:
        # QUIT is a courtesy: never worth more than one timeout, however the server
        # trickles its goodbye (the client then just closes the socket).
        with deadlines.within(self.timeout):
            super().close()

    def _send(self, email_message: EmailMessage) -> bool:
        if not email_message.recipients():
            return False
        from_email = self._addr_spec(email_message.from_email)
        recipients = [self._addr_spec(addr) for addr in email_message.recipients()]
        connection = self.connection
        with deadlines.within(self.exchange_time_limit):
            connection.ehlo_or_helo_if_needed()  # a new connection has not said EHLO yet
            options = []
            needs_utf8 = [a for a in [from_email, *recipients] if not a.isascii()]
            if needs_utf8:
                # RFC 6531: only over SMTPUTF8; refused before MAIL FROM, so nothing of
                # this message is left on the connection for the next one.
                if not connection.has_extn("smtputf8"):
                    raise ValueError(
                        f"{needs_utf8[0]!r} has a non-ASCII local part: it needs SMTPUTF8 "
                        f"(RFC 6531), which {self.host} does not offer")
                options.append("SMTPUTF8")
            content = _wire_bytes(email_message, utf8=bool(needs_utf8))
            if not content.isascii() and connection.has_extn("8bitmime"):
                options.append("BODY=8BITMIME")
            # sendmail() (not deliver()), as Django's backend calls it: code that wraps or
            # replaces the connection's sendmail keeps working.
            refused = connection.sendmail(from_email, recipients, content, options)
        email_message.refused_recipients = {  # type: ignore[attr-defined]
            addr: f"{code} {text.decode('utf-8', 'replace')}" for addr, (code, text) in refused.items()
        }
        delivery = connection.last_delivery if isinstance(connection, SMTP) else None
        email_message.provider_message_ids = (  # type: ignore[attr-defined]
            dict(delivery.queue_ids) if delivery is not None else {})
        return True

    @staticmethod
    def _addr_spec(address: Any) -> str:
        """The envelope address: the addr-spec, IDNA-encoded domain. ValueError if invalid."""
        return _addr_spec(str(address))


@functools.lru_cache(maxsize=4096)
def _addr_spec(address: str) -> str:
    # Cached: the same sender (and often the same recipients) on every message, and the
    # header parser costs about 0.1 ms a call. Invalid addresses raise, and are not cached.
    if is_plain_addr_spec(address):
        return address  # each recipient is new to the cache: skip the parser
    parsed = AddressHeader.value_parser(address)
    mailboxes = parsed.all_mailboxes
    if len(mailboxes) != 1 or "\n" in address or "\r" in address:
        raise ValueError(f"Invalid address {address!r}")
    box = mailboxes[0]
    if box.domain and not box.domain.isascii():
        return f"{box.local_part}@{punycode(box.domain)}"
    return str(box.addr_spec)
