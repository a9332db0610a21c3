"""Providers: build the configured email backends, and classify what they raise.

A provider is an alias, a Django email backend class and its ``OPTIONS`` — the shape of
Django 6.1's ``MAILERS``. Kipekee builds the backend itself (``Backend(alias=..., **OPTIONS)``)
so the same configuration works on Django 5.2 LTS.

:func:`classify` maps an exception to a :class:`Failure` of one of three kinds:

- *transient*: retry later, maybe through the next provider (SMTP 4xx, disconnects,
  timeouts, socket errors);
- *permanent*: this message cannot be delivered, do not retry (SMTP 5xx);
- *configuration*: the provider itself is misconfigured (bad credentials, an untrusted
  certificate, TLS not offered): stop using it and alarm.

A backend can refine this by defining ``classify_error(exc) -> Failure | None``.
"""

from __future__ import annotations

import dataclasses
import re
import smtplib
import socket
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.core.mail.backends.base import BaseEmailBackend
from django.utils.module_loading import import_string

from . import conf, limits
from .exceptions import ConfigurationError, RoutingLoop
from .limits import ProviderLimits
from .models import ErrorKind
from .redact import configured_secrets, redact

# SMTP replies that say "you (the client) are not set up right", not "this message is bad".
_CONFIGURATION_CODES = {530, 534, 535, 538}


@dataclass(frozen=True, kw_only=True)
class Failure:
    """What went wrong in one send through one provider."""

    kind: ErrorKind
    error: str
    code: int | None = None
    # Recipient -> the provider's reply, for refusals that name recipients.
    refused: dict[str, str] = field(default_factory=dict)
    # Seconds the provider asked us to wait (HTTP 429 Retry-After, …).
    retry_after: float | None = None


@cache
def _backend_class(path: str) -> type[BaseEmailBackend]:
    try:
        cls = import_string(path)
    except ImportError as exc:
        raise ConfigurationError(f"Cannot import email backend {path!r}: {exc}") from exc
    if not (isinstance(cls, type) and issubclass(cls, BaseEmailBackend)):
        raise ConfigurationError(f"{path!r} is not a Django email backend class.")
    from .backend import EmailBackend as DropIn

    if issubclass(cls, DropIn):
        raise RoutingLoop(f"{path!r} is Kipekee's drop-in backend: a provider must deliver.")
    return cls


def reset() -> None:
    """Forget imported backend classes (settings changed)."""
    _backend_class.cache_clear()


def build(alias: str) -> BaseEmailBackend:
    """A new, unopened backend for provider ``alias``."""
    config = conf.get().provider(alias)
    cls = _backend_class(config.backend)
    try:
        return cls(alias=alias, **config.options)
    except (TypeError, ValueError, ImproperlyConfigured) as exc:
        # Redacted, and not chained: a backend may put its options (secrets) in the error.
        raise ConfigurationError(
            f'KIPEKEE["PROVIDERS"][{alias!r}]: cannot build {config.backend}: '
            f"{redact(f'{type(exc).__name__}: {exc}')}"
        ) from None


def limits_for(alias: str) -> ProviderLimits:
    """The process-wide rate window of provider ``alias`` (its concurrency is the
    connection pool's, :mod:`kipekee.connections`)."""
    return limits.for_provider(alias, conf.get().provider(alias).rate)


def aliases(only: str = "") -> list[str]:
    """Provider aliases in failover order (or just ``only``)."""
    if only:
        return [conf.get().provider(only).alias]
    return [p.alias for p in conf.get().providers]


def _reply(code: int, text: bytes | str) -> str:
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    return f"{code} {text}".strip()


_HINT = re.compile(r"(?:try|retry)[^0-9]{0,20}?(\d+)\s*(s|sec|second|m|min|minute|h|hour)s?\b", re.I)
_HINT_UNIT = {"s": 1, "sec": 1, "second": 1, "m": 60, "min": 60, "minute": 60, "h": 3600, "hour": 3600}


def smtp_retry_hint(reply: str) -> float | None:
    """Seconds a 4xx reply asks us to wait ("451 4.7.1 Try again in 5 minutes"), if any."""
    match = _HINT.search(reply)
    if not match:
        return None
    return float(match[1]) * _HINT_UNIT[match[2].lower()]


_TRANSIENT_REPLY = re.compile(r"4\d\d(?:\s|$)")


def transient_refusals(refused: Mapping[str, str]) -> dict[str, str]:
    """The recipients a server refused for now (a 4xx reply to their ``RCPT TO``), from an
    outcome's ``refused`` (address → reply; suppressions and 5xx replies are left out)."""
    return {a: why for a, why in refused.items() if _TRANSIENT_REPLY.match(why)}


def _kind_for_code(code: int) -> ErrorKind:
    if code in _CONFIGURATION_CODES:
        return ErrorKind.CONFIGURATION
    return ErrorKind.PERMANENT if 500 <= code < 600 else ErrorKind.TRANSIENT


def classify(exc: BaseException, backend: Any = None) -> Failure:
    """Classify what sending raised; a backend's own ``classify_error`` is asked first.

    The failure's text is redacted (:mod:`kipekee.redact`): a server's reply may echo the
    credentials it was sent, and this text is logged and recorded on the row.
    """
    failure = _classify(exc, backend)
    secrets = configured_secrets()
    if not secrets:
        return failure
    return dataclasses.replace(
        failure, error=redact(failure.error, secrets),
        refused={k: redact(v, secrets) for k, v in failure.refused.items()},
    )


def _classify(exc: BaseException, backend: Any) -> Failure:
    hook = getattr(backend, "classify_error", None)
    if hook is not None:
        failure = hook(exc)
        if failure is not None:
            return failure

    name = type(exc).__name__
    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        refused = {addr: _reply(code, text) for addr, (code, text) in exc.recipients.items()}
        codes = [code for code, _ in exc.recipients.values()]
        kind = ErrorKind.PERMANENT if codes and all(500 <= c < 600 for c in codes) else ErrorKind.TRANSIENT
        detail = "; ".join(f"{a}: {r}" for a, r in refused.items())
        return Failure(kind=kind, error=f"all recipients refused: {detail}",
                       code=max(codes) if codes else None, refused=refused)
    if isinstance(exc, smtplib.SMTPAuthenticationError):
        return Failure(kind=ErrorKind.CONFIGURATION, code=exc.smtp_code,
                       error=f"authentication failed: {_reply(exc.smtp_code, exc.smtp_error)}")
    if isinstance(exc, (smtplib.SMTPConnectError, smtplib.SMTPHeloError)):
        # The server turned the session down before any message was involved.
        kind = ErrorKind.TRANSIENT if 400 <= exc.smtp_code < 500 or exc.smtp_code < 0 else ErrorKind.CONFIGURATION
        return Failure(kind=kind, code=exc.smtp_code,
                       error=f"{name}: {_reply(exc.smtp_code, exc.smtp_error)}")
    if isinstance(exc, smtplib.SMTPResponseException):
        # SMTPSenderRefused, SMTPDataError and plain replies (421 on MAIL, …).
        reply = _reply(exc.smtp_code, exc.smtp_error)
        kind = _kind_for_code(exc.smtp_code)
        return Failure(kind=kind, code=exc.smtp_code, error=f"{name}: {reply}",
                       retry_after=smtp_retry_hint(reply) if kind == ErrorKind.TRANSIENT else None)
    if isinstance(exc, smtplib.SMTPNotSupportedError):
        return Failure(kind=ErrorKind.CONFIGURATION, error=f"server does not support: {exc}")
    if isinstance(exc, ssl.SSLCertVerificationError):
        return Failure(kind=ErrorKind.CONFIGURATION,
                       error=f"TLS certificate not trusted ({exc.verify_message}); "
                             "trust it with the provider's 'ca_file' option if it is yours")
    if isinstance(exc, smtplib.SMTPServerDisconnected):
        return Failure(kind=ErrorKind.TRANSIENT, error=f"server disconnected: {exc}")
    if isinstance(exc, (TimeoutError, socket.timeout)):
        return Failure(kind=ErrorKind.TRANSIENT, error=f"timed out: {exc or 'no reply in time'}")
    if isinstance(exc, (OSError, smtplib.SMTPException)):  # refused, reset, DNS, TLS errors
        return Failure(kind=ErrorKind.TRANSIENT, error=f"{name}: {exc}")
    if isinstance(exc, ImproperlyConfigured):
        return Failure(kind=ErrorKind.CONFIGURATION, error=f"{name}: {exc}")
    if isinstance(exc, (ValueError, UnicodeError)):
        # Django raises ValueError for addresses it cannot put on the wire.
        return Failure(kind=ErrorKind.PERMANENT, error=f"{name}: {exc}")
    # Unknown: retry (bounded by the retry policy) rather than drop a message for a bug
    # that may be fixed by the next deploy; the error stays on the row.
    return Failure(kind=ErrorKind.TRANSIENT, error=f"unexpected {name}: {exc}")
