"""Kipekee's SMTP backend: Django's, with what a production sender needs.

It is a drop-in for ``django.core.mail.backends.smtp.EmailBackend`` on Django 5.2, 6.0
and 6.1: the same keywords (``host``, ``port``, ``username``, ``password``, ``use_tls``,
``use_ssl``, ``timeout``, ``ssl_keyfile``, ``ssl_certfile``, ``fail_silently``), the same
``EMAIL_*`` settings as defaults when Django builds it (``EMAIL_BACKEND``,
``get_connection()``), the same address checks (``prep_address``: ``ValueError`` before
``MAIL FROM``), the same exceptions. Built with an ``alias`` — a ``MAILERS`` entry on
Django 6.1, or a Kipekee provider (``KIPEKEE["PROVIDERS"]``) on any version — it reads
its ``OPTIONS`` only, as Django 6.1 does: ``host`` is required, the port follows the
security (465 SSL, 587 STARTTLS, else 25), ``EMAIL_*`` settings are ignored, and an
unknown option is an error.

What it adds:

- TLS verified against certifi's CA bundle (or the ``ca_file`` you trust), where the OS
  CA store may be missing or stale;
- ``ipv4_only`` for hosts whose IPv6 route is broken (the payments seed forced this by
  patching ``socket.getaddrinfo`` for the whole process; here it is per provider);
- ``local_hostname``: the name sent in EHLO (some relays check it);
- per-recipient refusals kept on the message as ``message.refused_recipients`` (Django's
  backend drops what ``smtplib.sendmail`` returns), and the server's queue id
  ("250 2.0.0 Ok: queued as 4ABC123") as ``message.provider_message_ids``;
- as a Kipekee provider, a ``timeout`` of 15 s unless its OPTIONS set one
  (:attr:`EmailBackend.provider_defaults`; Django's default is none: a stalled server
  hangs the sender forever). Built by Django, it keeps Django's default;
- the wire transaction is :mod:`kipekee.backends.smtp_client`'s: PIPELINING when the
  server offers it (a message on a warm connection costs two round trips), recipients
  past the server's per-transaction limit sent in further transactions, ``timeout`` as an
  inactivity timeout (a large message to a slow server is not cut off), TLS sessions
  resumed on reconnect;
- ``smtputf8=True``: non-ASCII local parts (``jörg@example.com``) sent over SMTPUTF8
  (RFC 6531) when the server offers it (refused before ``MAIL FROM`` when not); off by
  default, where Django's ``ValueError`` refuses them as Django's backend does;
- ``final_reply_timeout`` (600 s, RFC 5321 4.5.3.2.6): the wait for the server's reply
  after the end of the message, longer than ``timeout``: by then the server has the
  message, and a client that gave up at ``timeout`` would send it again although it was
  taken (an engine renews the row's lease meanwhile, so no other engine takes it);
- deadlines: each exchange (opening the session; one message) ends within
  ``exchange_time_limit`` seconds, however slowly the server trickles, and within the
  caller's deadline (:mod:`kipekee.deadlines`, e.g. the in-request ``NOW_TIME_BUDGET``).

The connection is reused across ``send_messages`` calls while it is open (``open()`` …
``close()``), as with Django's backend.
"""

from __future__ import annotations

import email.policy
import functools
import os
import select
import smtplib
import socket
import ssl
import sys
import threading
from typing import Any, ClassVar

import certifi
import django
from django.conf import settings
from django.core.mail import EmailMessage
from django.core.mail.backends.base import BaseEmailBackend
from django.core.mail.backends.smtp import EmailBackend as DjangoSMTPBackend
from django.utils.encoding import force_str
from django.utils.functional import cached_property

from .. import deadlines, wire
from ..exceptions import InvalidMailer
from ..message import parse_address
from .smtp_client import SMTP, SMTP_SSL

if django.VERSION >= (6, 1):
    from django.core.mail import InvalidMailer as DjangoInvalidMailer
    from django.utils.deprecation import (  # type: ignore[attr-defined]  # not in django-stubs 6.1
        RemovedInDjango2028Warning,
        warn_about_external_use,
    )

#: Django 6.1 introduced MAILERS: an alias means "configured by OPTIONS only".
_MAILERS = django.VERSION >= (6, 1)

DEFAULT_TIMEOUT = 15.0
_STDLIB_CLIENTS = {False: smtplib.SMTP, True: smtplib.SMTP_SSL}
#: smtplib's methods as imported: one that differs now has been patched by someone.
_STDLIB_METHODS = {name: vars(smtplib.SMTP)[name]
                   for name in ("send", "putcmd", "getreply", "sendmail", "data")}


def _smtplib_replaced(stdlib: type[smtplib.SMTP], use_ssl: bool) -> bool:
    """Whether smtplib's client class, or one of its I/O methods, has been replaced (a
    test double, as in Django's own tests, or instrumentation that watches the wire)."""
    return stdlib is not _STDLIB_CLIENTS[use_ssl] or any(
        vars(smtplib.SMTP).get(name) is not method for name, method in _STDLIB_METHODS.items())


#: Seconds one exchange with the server may take in all: opening the session, or one
#: message. RFC 5321's longest single wait is the 10 minutes for the reply after the
#: final dot (4.5.3.2.6).
DEFAULT_EXCHANGE_TIME_LIMIT = 600.0

#: Seconds to wait for the reply after the end of a message (RFC 5321 4.5.3.2.6: a
#: client should wait 10 minutes for it), whatever the shorter ``timeout`` of the others.
DEFAULT_FINAL_REPLY_TIMEOUT = 600.0


def _wire_bytes(email_message: EmailMessage, *, utf8: bool = False) -> bytes:
    """The message as bytes with CRLF line ends, the bytes each Django version builds,
    built directly and with large attachments encoded once (:mod:`kipekee.wire`; a
    streaming DATA takes ``wire.build(message)``: its ``size`` and ``chunks()`` from one
    build).

    ``utf8``: for a server that took ``SMTPUTF8``, headers in UTF-8 (RFC 6532) where
    Django's modern message allows (6.0 and later), built by Django whole; Django 5.2
    encodes its headers as it builds them, so they stay as they are.
    """
    if utf8 and django.VERSION >= (6, 0):
        return email_message.message(
            policy=email.policy.SMTPUTF8).as_bytes()
    return wire.message_bytes(email_message)


#: What ``ssl_certfile``/``ssl_keyfile`` may be (Django's types, ssl.load_cert_chain's).
_Path = str | bytes | os.PathLike[str] | os.PathLike[bytes]


def _new_ssl_context(ca_file: str | None, certfile: _Path | None,
                     keyfile: _Path | None) -> ssl.SSLContext:
    # Verified TLS (hostname and chain: PROTOCOL_TLS_CLIENT's defaults) against certifi's
    # bundle, or the CA file the user chose to trust (a private relay with its own CA or
    # a self-signed certificate). Built as Django builds its context.
    context = ssl.SSLContext(protocol=ssl.PROTOCOL_TLS_CLIENT)
    if sys.version_info >= (3, 13):
        # As ssl.create_default_context() does from Python 3.13 on: strict X.509
        # checks, and a chain may end at a trusted intermediate.
        context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN | ssl.VERIFY_X509_STRICT
    context.load_verify_locations(cafile=ca_file or certifi.where())
    if certfile or keyfile:
        context.load_cert_chain(certfile, keyfile)  # type: ignore[arg-type]
    return context


@functools.lru_cache(maxsize=32)
def _shared_ssl_context(ca_file: str | None) -> ssl.SSLContext:
    # One context per trust configuration for the whole process: a TLS session only
    # resumes with the context that made it, and loading certifi's bundle costs a few
    # milliseconds a connection. A CA file changed on disk is read again after a restart.
    return _new_ssl_context(ca_file, None, None)


class EmailBackend(DjangoSMTPBackend):
    """SMTP with STARTTLS (``use_tls``) or implicit TLS (``use_ssl``), AUTH and reuse."""

    #: Options Kipekee gives this backend when it builds it as a provider and the
    #: provider's OPTIONS leave them out. (Built by Django it has Django's defaults.)
    provider_defaults: ClassVar[dict[str, Any]] = {"timeout": DEFAULT_TIMEOUT}

    # Django's keywords, in Django's order (they may be passed by position).
    def __init__(
        self,
        host: str | None = None,
        port: int | None = None,
        username: str | None = None,
        password: str | None = None,
        use_tls: bool | None = None,
        fail_silently: bool = False,
        use_ssl: bool | None = None,
        timeout: float | None = None,
        ssl_keyfile: str | None = None,
        ssl_certfile: str | None = None,
        *,
        ca_file: str | None = None,
        ipv4_only: bool = False,
        local_hostname: str | None = None,
        exchange_time_limit: float = DEFAULT_EXCHANGE_TIME_LIMIT,
        final_reply_timeout: float = DEFAULT_FINAL_REPLY_TIMEOUT,
        smtputf8: bool = False,
        **kwargs: Any,
    ) -> None:
        alias = kwargs.get("alias")
        if _MAILERS and alias is None:
            # Django 6.1's own warning, attributed (as Django's is) to the code that
            # built the backend, not to this subclass: get_connection() builds it quietly.
            warn_about_external_use(
                "Directly creating EmailBackend instances is deprecated. "
                "Use mail.mailers instead.",
                RemovedInDjango2028Warning, skip_name_prefixes=f"{__name__}.",
            )
        # Django's BaseEmailBackend, not Django's SMTP __init__: the settings and options
        # are read below, for every Django version the same way.
        if _MAILERS:
            # alias, and unknown keywords: InvalidMailer, or ignored with a warning.
            try:
                BaseEmailBackend.__init__(self, **kwargs)
            except DjangoInvalidMailer as exc:
                raise InvalidMailer(str(exc)) from None  # also a ConfigurationError
        else:
            BaseEmailBackend.__init__(self, fail_silently=fail_silently)
            self.alias = alias
            unknown = sorted(set(kwargs) - {"alias"})
            if unknown and alias is not None:
                self._invalid(f"Unknown options {', '.join(map(repr, unknown))}.")
            # Without an alias Django (before 6.1) ignores unknown keywords; so does this.
        self.fail_silently = fail_silently
        self.connection: Any = None
        self._partial_connection: Any = None
        self._lock = threading.RLock()
        self.ca_file = ca_file
        self.ipv4_only = ipv4_only
        self.local_hostname = local_hostname
        self.exchange_time_limit = exchange_time_limit
        self.final_reply_timeout = final_reply_timeout
        self.smtputf8 = smtputf8

        if self.alias is None:
            # Django's compatibility mode: EMAIL_* settings fill what is not given.
            self.host = host or settings.EMAIL_HOST
            self.port = port or settings.EMAIL_PORT
            self.username = settings.EMAIL_HOST_USER if username is None else username
            self.password = settings.EMAIL_HOST_PASSWORD if password is None else password
            self.use_tls = settings.EMAIL_USE_TLS if use_tls is None else use_tls
            self.use_ssl = settings.EMAIL_USE_SSL if use_ssl is None else use_ssl
            self.timeout = settings.EMAIL_TIMEOUT if timeout is None else timeout
            self.ssl_keyfile = settings.EMAIL_SSL_KEYFILE if ssl_keyfile is None else ssl_keyfile
            self.ssl_certfile = (
                settings.EMAIL_SSL_CERTFILE if ssl_certfile is None else ssl_certfile
            )
            if self.use_ssl and self.use_tls:
                raise ValueError(
                    "EMAIL_USE_TLS/EMAIL_USE_SSL are mutually exclusive, so only set "
                    "one of those settings to True."
                )
            return

        # Configured by OPTIONS alone (a MAILERS entry or a Kipekee provider).
        self.host = host  # type: ignore[assignment]
        self.username = username  # type: ignore[assignment]
        self.password = password  # type: ignore[assignment]
        self.use_tls = bool(use_tls)
        self.use_ssl = bool(use_ssl)
        self.timeout = timeout
        self.ssl_keyfile = ssl_keyfile
        self.ssl_certfile = ssl_certfile
        if not host:
            self._invalid("OPTIONS must define 'host'.")
        if self.use_ssl and self.use_tls:
            self._invalid("The 'use_ssl' and 'use_tls' OPTIONS are incompatible. "
                          "Set at most one of them to True.")
        self.port = port or (465 if self.use_ssl else 587 if self.use_tls else 25)
        # Kipekee's own checks of a configuration, which Django makes at the first send
        # at best (a lone username never logs in; the server then refuses with 530).
        if bool(username) != bool(password):
            self._invalid("Set both 'username' and 'password', or neither.")
        if timeout is not None and timeout <= 0:
            self._invalid("'timeout' must be > 0 seconds (or None: no timeout).")
        if not exchange_time_limit > 0:
            self._invalid("'exchange_time_limit' must be > 0 seconds.")
        if not final_reply_timeout > 0:
            self._invalid("'final_reply_timeout' must be > 0 seconds.")

    def _invalid(self, message: str) -> None:
        """Refuse this configuration, as Django 6.1 does a MAILERS entry's."""
        raise InvalidMailer(message, alias=self.alias)

    @property
    def connection_class(self) -> Any:
        stdlib = smtplib.SMTP_SSL if self.use_ssl else smtplib.SMTP
        if _smtplib_replaced(stdlib, self.use_ssl):
            # Whoever replaced it expects to see (or stand in for) the session: use
            # smtplib as Django's backend would, one command at a time.
            return stdlib
        client = SMTP_SSL if self.use_ssl else SMTP
        # TLS sessions are resumed per provider (and host and port).
        extra: dict[str, Any] = {"ipv4_only": self.ipv4_only,
                                 "tls_session_key": ("kipekee", self.alias or ""),
                                 "final_reply_timeout": self.final_reply_timeout}
        if self.local_hostname:
            # Django passes its cached FQDN; a configured name wins (some relays check it).
            extra["local_hostname"] = self.local_hostname

        def connect(host: str, port: int, **params: Any) -> SMTP:
            return client(host, port, **{**params, **extra})

        return connect

    @cached_property
    def ssl_context(self) -> ssl.SSLContext:
        if self.ssl_certfile or self.ssl_keyfile:
            # A client certificate: this backend's own context (Django's tests, and
            # instrumentation, watch load_cert_chain being called for it).
            return _new_ssl_context(self.ca_file, self.ssl_certfile, self.ssl_keyfile)
        return _shared_ssl_context(None if self.ca_file is None else str(self.ca_file))

    def open(self) -> bool | None:
        # Connect, TLS and AUTH together within the exchange time limit (and within any
        # deadline of the caller's).
        with deadlines.within(self.exchange_time_limit):
            return super().open()

    def close(self) -> None:
        # QUIT is a courtesy: never worth more than one timeout, however the server
        # trickles its goodbye (the client then just closes the socket).
        with deadlines.within(self.timeout):
            super().close()

    def prep_address(self, address: Any, force_ascii: bool = True) -> str:
        """The envelope address (addr-spec) of ``address``, as Django 6's backend makes it.

        ``ValueError`` for an invalid address (before any SMTP command of the message).
        With ``force_ascii`` a non-ASCII domain is IDNA-encoded and a non-ASCII local part
        is invalid; without it (SMTPUTF8) both are kept.
        """
        return parse_address(force_str(address), force_ascii=force_ascii)

    def _envelope(self, email_message: EmailMessage) -> tuple[str, list[str], ValueError | None]:
        """The envelope's sender and recipients (addr-specs), and, when an address has a
        non-ASCII local part, Django's ``ValueError`` for it: raised should the server
        not offer SMTPUTF8. An invalid address raises here, before any SMTP command."""
        addresses = [email_message.from_email, *email_message.recipients()]
        try:
            specs = [self.prep_address(a) for a in addresses]
            ascii_error = None
        except ValueError as exc:
            # Valid only with a non-ASCII local part kept (else this raises in turn).
            specs = [self.prep_address(a, force_ascii=False) for a in addresses]
            ascii_error = exc
        return specs[0], specs[1:], ascii_error

    def _send(self, email_message: EmailMessage) -> bool:
        if not email_message.recipients():
            return False
        from_email, recipients, ascii_error = self._envelope(email_message)
        if ascii_error is not None and not self.smtputf8:
            # Django's backend refuses it whatever the server offers, before it touches
            # the connection; so does this one unless told otherwise (Django's
            # test_prep_address_without_force_ascii names such a subclass).
            raise ascii_error
        connection = self.connection
        try:
            with deadlines.within(self.exchange_time_limit):
                connection.ehlo_or_helo_if_needed()  # a new connection has not said EHLO yet
                options = []
                if ascii_error is not None:
                    # RFC 6531: only over SMTPUTF8; refused before MAIL FROM, so nothing
                    # of this message is left on the connection for the next one.
                    if not connection.has_extn("smtputf8"):
                        # Django's words, and why Kipekee could not send it anyway.
                        raise ValueError(f"{ascii_error}; it needs SMTPUTF8 (RFC 6531), "
                                         f"which {self.host} does not offer") from None
                    options.append("SMTPUTF8")
                content = _wire_bytes(email_message, utf8=ascii_error is not None)
                if not content.isascii() and connection.has_extn("8bitmime"):
                    options.append("BODY=8BITMIME")
                # sendmail() (not deliver()), as Django's backend calls it: code that
                # wraps or replaces the connection's sendmail keeps working.
                refused = connection.sendmail(from_email, recipients, content, options)
        except smtplib.SMTPException:
            if not self.fail_silently:
                raise
            return False
        email_message.refused_recipients = {  # type: ignore[attr-defined]
            addr: f"{code} {text.decode('utf-8', 'replace')}"
            for addr, (code, text) in refused.items()
        }
        delivery = connection.last_delivery if isinstance(connection, SMTP) else None
        email_message.provider_message_ids = (  # type: ignore[attr-defined]
            dict(delivery.queue_ids) if delivery is not None else {})
        return True

    def is_usable(self, *, probe: bool = False, timeout: float | None = None) -> bool:
        """Whether the open connection can take the next message: the connection pool's
        health check before reuse (:mod:`kipekee.connections`; any backend may define it).

        Without ``probe`` nothing goes on the wire: a healthy idle session has nothing to
        read, while a server that closed it (idle timeout, restart) or said something
        unasked (``421`` before closing) left the socket readable. With ``probe``, one
        ``NOOP`` must be answered ``250`` within ``timeout`` seconds (a connection a NAT
        dropped in silence answers nothing). Raises nothing the caller must handle
        beyond what a dead connection raises.
        """
        connection = self.connection
        sock = getattr(connection, "sock", None)
        if connection is None or sock is None:
            return False
        if (isinstance(sock, ssl.SSLSocket) and sock.pending()) or _readable(sock):
            return False
        if not probe:
            return True
        previous = sock.gettimeout()
        if timeout is not None:
            sock.settimeout(timeout)
        try:
            code, _ = connection.noop()
        finally:
            if connection.sock is sock:  # smtplib drops a socket that failed
                sock.settimeout(previous)
        return bool(code == 250)


def _readable(sock: socket.socket) -> bool:
    """Whether ``sock`` has something to read (or reached its end), without waiting."""
    if hasattr(select, "poll"):
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        return bool(poller.poll(0))
    readable, _, _ = select.select([sock], [], [], 0)  # Windows: no poll()
    return bool(readable)
