"""Kipekee's SMTP backend: Django's, with the defaults a production sender needs.

Differences from ``django.core.mail.backends.smtp.EmailBackend``:

- a default ``timeout`` (Django's is none: a stalled server hangs the worker forever);
- TLS verified against certifi's CA bundle by default, or the ``ca_file`` you trust;
- ``ipv4_only`` for hosts whose IPv6 route is broken (the payments seed forced this by
  patching ``socket.getaddrinfo`` for the whole process; here it is per provider);
- per-recipient refusals are kept on the message as ``message.refused_recipients``
  (Django's backend drops what ``smtplib.sendmail`` returns);
- options are checked: an unknown option is an error, not silently ignored, on every
  Django version;
- it never fails silently.

The connection is reused across ``send_messages`` calls while it is open (``open()`` …
``close()``), as with Django's backend.
"""

from __future__ import annotations

import functools
import smtplib
import socket
import ssl
from email.headerregistry import AddressHeader
from typing import Any

import certifi
from django.core.mail import EmailMessage
from django.core.mail.backends.smtp import EmailBackend as DjangoSMTPBackend
from django.utils.encoding import punycode
from django.utils.functional import cached_property

from .. import wire
from ..exceptions import ConfigurationError
from ..message import is_plain_addr_spec

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
                sock.settimeout(timeout)
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
        # Verified TLS (hostname and chain) against certifi's bundle, or the CA file the
        # user chose to trust (a private relay with its own CA or a self-signed cert).
        context = ssl.create_default_context(cafile=self.ca_file or certifi.where())
        if self.ssl_certfile or self.ssl_keyfile:
            context.load_cert_chain(self.ssl_certfile, self.ssl_keyfile)  # type: ignore[arg-type]
        return context

    def _send(self, email_message: EmailMessage) -> bool:
        if not email_message.recipients():
            return False
        from_email = self._addr_spec(email_message.from_email)
        recipients = [self._addr_spec(addr) for addr in email_message.recipients()]
        assert self.connection is not None
        refused: dict[str, tuple[int, bytes]] = self.connection.sendmail(
            from_email, recipients, _wire_bytes(email_message)
        )
        email_message.refused_recipients = {  # type: ignore[attr-defined]
            addr: f"{code} {text.decode('utf-8', 'replace')}" for addr, (code, text) in refused.items()
        }
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
