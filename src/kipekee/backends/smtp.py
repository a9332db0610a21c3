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
  backend drops what ``smtplib.sendmail`` returns);
- as a Kipekee provider, a ``timeout`` of 15 s unless its OPTIONS set one
  (:attr:`EmailBackend.provider_defaults`; Django's default is none: a stalled server
  hangs the sender forever). Built by Django, it keeps Django's default.

The connection is reused across ``send_messages`` calls while it is open (``open()`` …
``close()``), as with Django's backend.
"""

from __future__ import annotations

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

from .. import wire
from ..exceptions import InvalidMailer
from ..message import parse_address

if django.VERSION >= (6, 1):
    from django.core.mail import InvalidMailer as DjangoInvalidMailer
    from django.utils.deprecation import RemovedInDjango2028Warning, warn_about_external_use

#: Django 6.1 introduced MAILERS: an alias means "configured by OPTIONS only".
_MAILERS = django.VERSION >= (6, 1)

DEFAULT_TIMEOUT = 15.0


class _IPv4Mixin:
    """Connect over IPv4 only (resolve A records, never AAAA)."""

    def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
        last_error: OSError | None = None
        for family, type_, proto, _, addr in socket.getaddrinfo(
            host, port, socket.AF_INET, socket.SOCK_STREAM
        ):
            sock = socket.socket(family, type_, proto)
            try:
                if timeout is not socket._GLOBAL_DEFAULT_TIMEOUT:  # type: ignore[attr-defined]
                    sock.settimeout(timeout)  # smtplib's "none given" keeps the default
                sock.connect(addr)
                return sock
            except OSError as exc:
                sock.close()
                last_error = exc
        raise last_error or OSError(f"no IPv4 address for {host}")


class IPv4SMTP(_IPv4Mixin, smtplib.SMTP):
    pass


class IPv4SMTP_SSL(smtplib.SMTP_SSL, IPv4SMTP):
    # SMTP_SSL._get_socket wraps what super()._get_socket returns: the IPv4 socket.
    pass


def _wire_bytes(email_message: EmailMessage) -> bytes:
    """The message as bytes with CRLF line ends, as each Django version builds it, with
    large attachments encoded once (kipekee.wire; message_chunks() to stream them)."""
    return wire.message_bytes(email_message)


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

    def _invalid(self, message: str) -> None:
        """Refuse this configuration, as Django 6.1 does a MAILERS entry's."""
        raise InvalidMailer(message, alias=self.alias)

    @property
    def connection_class(self) -> Any:
        if self.ipv4_only:
            base: type[smtplib.SMTP] = IPv4SMTP_SSL if self.use_ssl else IPv4SMTP
        else:
            base = smtplib.SMTP_SSL if self.use_ssl else smtplib.SMTP
        if not self.local_hostname:
            return base
        name = self.local_hostname

        def connect(host: str, port: int, **params: Any) -> smtplib.SMTP:
            # Django passes its cached FQDN; a configured name wins (some relays check it).
            return base(host, port, **{**params, "local_hostname": name})

        return connect

    @cached_property
    def ssl_context(self) -> ssl.SSLContext:
        # Verified TLS (hostname and chain: PROTOCOL_TLS_CLIENT's defaults) against
        # certifi's bundle, or the CA file the user chose to trust (a private relay with
        # its own CA or a self-signed certificate). Built as Django builds its context.
        context = ssl.SSLContext(protocol=ssl.PROTOCOL_TLS_CLIENT)
        if sys.version_info >= (3, 13):
            # As ssl.create_default_context() does from Python 3.13 on: strict X.509
            # checks, and a chain may end at a trusted intermediate.
            context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN | ssl.VERIFY_X509_STRICT
        context.load_verify_locations(cafile=self.ca_file or certifi.where())
        if self.ssl_certfile or self.ssl_keyfile:
            context.load_cert_chain(self.ssl_certfile, self.ssl_keyfile)  # type: ignore[arg-type]
        return context

    def prep_address(self, address: Any, force_ascii: bool = True) -> str:
        """The envelope address (addr-spec) of ``address``, as Django 6's backend makes it.

        ``ValueError`` for an invalid address (before any SMTP command of the message).
        With ``force_ascii`` a non-ASCII domain is IDNA-encoded and a non-ASCII local part
        is invalid; without it (SMTPUTF8) both are kept.
        """
        return parse_address(force_str(address), force_ascii=force_ascii)

    def _send(self, email_message: EmailMessage) -> bool:
        if not email_message.recipients():
            return False
        from_email = self.prep_address(email_message.from_email)
        recipients = [self.prep_address(addr) for addr in email_message.recipients()]
        assert self.connection is not None
        try:
            refused: dict[str, tuple[int, bytes]] = self.connection.sendmail(
                from_email, recipients, _wire_bytes(email_message)
            )
        except smtplib.SMTPException:
            if not self.fail_silently:
                raise
            return False
        email_message.refused_recipients = {  # type: ignore[attr-defined]
            addr: f"{code} {text.decode('utf-8', 'replace')}" for addr, (code, text) in refused.items()
        }
        return True
