"""Providers: build the configured email backends, and classify what they raise.

A provider is an alias, a Django email backend class and its ``OPTIONS`` — the shape of
Django 6.1's ``MAILERS``. Kipekee builds the backend itself (``Backend(alias=..., **OPTIONS)``)
so the same configuration works on Django 5.2 LTS.

:func:`classify` maps an exception to a :class:`Failure` of one of three kinds:

- *transient*: retry later, maybe through the next provider (SMTP 4xx, disconnects,
  timeouts, socket errors);
- *permanent*: this message cannot be delivered, do not retry (SMTP 5xx). When the
  refusal is a property of the provider rather than of the message (``provider_level``:
  a 5xx to ``MAIL FROM``, a size limit) the next provider is tried first;
- *configuration*: the provider itself is misconfigured (bad credentials, an untrusted
  certificate, TLS not offered): stop using it and alarm.

A backend can refine this by defining ``classify_error(exc) -> Failure | None``.

Errors of every django-anymail backend (Postmark, SendGrid, Mailgun, Amazon SES, Brevo,
Resend, Mailtrap, …) are classified by one function, :func:`classify_anymail`, from what
anymail gives: the HTTP status of the ESP's answer (a ``requests`` response, or the
parsed answer boto3 gives for Amazon SES), its ``Retry-After``, its error text, and the
per-recipient ``anymail_status``. After a send, :func:`sent_details` reads the
provider's message ids and per-recipient refusals the same way.
"""

from __future__ import annotations

import dataclasses
import re
import smtplib
import socket
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from functools import cache
from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.core.mail.backends.base import BaseEmailBackend
from django.utils.module_loading import import_string

from . import conf, testmode
from .exceptions import ConfigurationError, RoutingLoop
from .models import ErrorKind
from .redact import configured_secrets, redact
from .retry import smtp_retry_hint

try:  # the optional anymail extras ("mailtrap", "esp"): only its backends raise these
    from anymail import exceptions as anymail_errors
except ImportError:  # pragma: no cover - the test extra installs it
    anymail_errors = None  # type: ignore[assignment,unused-ignore]
try:  # boto3, through anymail's Amazon SES backend ("esp" extra)
    from botocore import exceptions as botocore_errors
except ImportError:  # pragma: no cover - the test extra installs it
    botocore_errors = None  # type: ignore[assignment,unused-ignore]

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
    # A permanent refusal that is a property of this provider, not of the message: its
    # account may not send as this sender, or the message is over its size limit.
    # Delivery tries the next provider; the message fails only when every one refuses.
    provider_level: bool = False
    # A configuration failure of the whole provider (its credentials, its TLS), which the
    # next message would meet too: its circuit opens at once. Not one that depends on the
    # message's sender (an unverified domain): another sender may go through.
    whole_provider: bool = False


@cache
def _backend_class(path: str) -> type[BaseEmailBackend]:
    try:
        cls = import_string(path)
    except ImportError as exc:
        raise ConfigurationError(f"Cannot import email backend {path!r}: {exc}") from exc
    if not (isinstance(cls, type) and issubclass(cls, BaseEmailBackend)):
        raise ConfigurationError(f"{path!r} is not a Django email backend class.")
    if any(f"{base.__module__}.{base.__qualname__}" == DROP_IN for base in cls.__mro__):
        raise RoutingLoop(f"{path!r} is Kipekee's drop-in backend: a provider must deliver.")
    return cls


#: Kipekee's drop-in backend (``kipekee.backend``), named: that module sends through the
#: outbox, which sends through this one.
DROP_IN = "kipekee.backend.EmailBackend"


def reset() -> None:
    """Forget imported backend classes (settings changed)."""
    _backend_class.cache_clear()


conf.reset_on_change(reset)


def build(alias: str) -> BaseEmailBackend:
    """A new, unopened backend for provider ``alias``."""
    config = conf.get().provider(alias)
    cls = _backend_class(config.backend)
    if testmode.active():
        # Under Django's test runner every provider is Django's locmem backend, as the
        # runner makes EMAIL_BACKEND: mail lands in django.core.mail.outbox.
        return testmode.OutboxBackend(alias=alias)
    # A backend's defaults for when Kipekee builds it (Kipekee's SMTP backend: a timeout).
    options = {**getattr(cls, "provider_defaults", {}), **config.options}
    try:
        return cls(alias=alias, **options)
    except (TypeError, ValueError, ImproperlyConfigured) as exc:
        # Redacted, and not chained: a backend may put its options (secrets) in the error.
        raise ConfigurationError(
            f'KIPEKEE["PROVIDERS"][{alias!r}]: cannot build {config.backend}: '
            f"{redact(f'{type(exc).__name__}: {exc}')}"
        ) from None


def aliases(only: str = "") -> list[str]:
    """Provider aliases in failover order (or just ``only``)."""
    if only:
        return [conf.get().provider(only).alias]
    return [p.alias for p in conf.get().providers]


def _reply(code: int, text: bytes | str) -> str:
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    return f"{code} {text}".strip()


def _kind_for_code(code: int) -> ErrorKind:
    if code in _CONFIGURATION_CODES:
        return ErrorKind.CONFIGURATION
    return ErrorKind.PERMANENT if 500 <= code < 600 else ErrorKind.TRANSIENT


# RFC 3463 X.3.4 "message too big for system", X.2.3 "message length exceeds
# administrative limit".
_SIZE_STATUS = re.compile(r"^\d{3}[ -][45]\.(?:3\.4|2\.3)(?:\s|$)")


def _provider_level(exc: smtplib.SMTPResponseException, reply: str) -> bool:
    """Whether a permanent SMTP refusal is the provider's, not the message's.

    - Any 5xx to ``MAIL FROM``: at that point the server knows only the sender and the
      size smtplib declares (``SIZE=``, RFC 1870). RFC 5321 gives 550/553 for a sender
      it will not take and 552 for the size; submission services answer there "sender
      not owned by this account", "unauthenticated senders not allowed", "sender not
      verified", or refuse the client (554). Another account, another service, may take
      it. (530/535 are configuration.)
    - A size refusal after the data (552, or X.3.4 / X.2.3): the message is over this
      provider's limit; another's may be higher (Mailgun 25 MB, SES 40 MB …).

    Everything else stays with the message: recipients refused at ``RCPT TO``, content
    refused after the data (554 / 550 5.7.1 spam, a virus): another provider must not
    deliver what one judged undeliverable.
    """
    if isinstance(exc, smtplib.SMTPSenderRefused):
        return True
    return isinstance(exc, smtplib.SMTPDataError) and (
        exc.smtp_code == 552 or bool(_SIZE_STATUS.match(reply)))


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
        hooked: Failure | None = hook(exc)
        if hooked is not None:
            return hooked
    failure = classify_anymail(exc, backend)
    if failure is not None:
        return failure

    name = type(exc).__name__
    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        refused = {addr: _reply(code, text) for addr, (code, text) in exc.recipients.items()}
        codes = [code for code, _ in exc.recipients.values()]
        kind = (ErrorKind.PERMANENT if codes and all(500 <= c < 600 for c in codes)
                else ErrorKind.TRANSIENT)
        detail = "; ".join(f"{a}: {r}" for a, r in refused.items())
        return Failure(kind=kind, error=f"all recipients refused: {detail}",
                       code=max(codes) if codes else None, refused=refused)
    if isinstance(exc, smtplib.SMTPAuthenticationError):
        return Failure(kind=ErrorKind.CONFIGURATION, code=exc.smtp_code, whole_provider=True,
                       error=f"authentication failed: {_reply(exc.smtp_code, exc.smtp_error)}")
    if isinstance(exc, (smtplib.SMTPConnectError, smtplib.SMTPHeloError)):
        # The server turned the session down before any message was involved.
        kind = (ErrorKind.TRANSIENT if 400 <= exc.smtp_code < 500 or exc.smtp_code < 0
                else ErrorKind.CONFIGURATION)
        return Failure(kind=kind, code=exc.smtp_code,
                       error=f"{name}: {_reply(exc.smtp_code, exc.smtp_error)}")
    if isinstance(exc, smtplib.SMTPResponseException):
        # SMTPSenderRefused, SMTPDataError and plain replies (421 on MAIL, …).
        reply = _reply(exc.smtp_code, exc.smtp_error)
        kind = _kind_for_code(exc.smtp_code)
        return Failure(kind=kind, code=exc.smtp_code, error=f"{name}: {reply}",
                       retry_after=smtp_retry_hint(reply) if kind == ErrorKind.TRANSIENT else None,
                       provider_level=kind == ErrorKind.PERMANENT and _provider_level(exc, reply),
                       # 530/534/535/538: authentication or encryption, the whole server's
                       whole_provider=kind == ErrorKind.CONFIGURATION)
    if isinstance(exc, smtplib.SMTPNotSupportedError):
        return Failure(kind=ErrorKind.CONFIGURATION, whole_provider=True,
                       error=f"server does not support: {exc}")
    if isinstance(exc, ssl.SSLCertVerificationError):
        return Failure(kind=ErrorKind.CONFIGURATION, whole_provider=True,
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


# -- HTTP-API providers, through django-anymail -----------------------------------------

#: Anymail's per-recipient statuses that mean "this recipient will not get it".
ANYMAIL_REFUSED = frozenset({"rejected", "invalid", "failed"})

#: Refusals that are a property of the provider account, not of the message, where the
#: HTTP status alone does not say so (anymail passes these through as the ESP gave
#: them): the message goes to the next provider and the row is not failed.
#: Postmark (422 with ``ErrorCode``): 400 sender signature not found, 401 not confirmed,
#: 405 out of credits, 412 account pending approval, 413 account may not send.
#: Amazon SES v2 (``x-amzn-ErrorType``): the account or its sending is suspended, the
#: MAIL FROM domain is not verified.
PROVIDER_REFUSALS: dict[str, frozenset[str]] = {
    "Postmark": frozenset({"400", "401", "405", "412", "413"}),
    "Amazon SES": frozenset({"AccountSuspendedException", "SendingPausedException",
                             "MailFromDomainNotVerifiedException"}),
}


#: The largest message each ESP documents, in bytes as its API receives it (JSON with
#: base64 attachments; Amazon SES: the raw message). A ``413 Payload Too Large`` for a
#: request over it is the message's: it will never fit this provider, though another
#: may take it (permanent, provider-level: the next provider is tried, as after an SMTP
#: 552). For a request within it, the refusal is the provider's own (a proxy in front of
#: the API, a limit lowered on the account): transient, the message is fine. An ESP not
#: listed documents no size: a 413 from it is taken as the provider's.
#: Postmark: "total message size, including attachments, 10 MB" (after base64);
#: SendGrid: "30 MB total message size"; Mailgun: "25 MB max message size"; Amazon SES
#: (v2): "40 MB, after encoding".
DOCUMENTED_SIZE: dict[str, int] = {
    "Postmark": 10 * 1024 * 1024,
    "SendGrid": 30 * 1024 * 1024,
    "Mailgun": 25 * 1024 * 1024,
    "Amazon SES": 40 * 1024 * 1024,
}


def _too_large(exc: Any, esp: str, error: str) -> Failure:
    """What a ``413 Payload Too Large`` means: see :data:`DOCUMENTED_SIZE`."""
    size = _request_size(exc)
    limit = DOCUMENTED_SIZE.get(esp)
    if limit is not None and size is not None and size > limit:
        return Failure(kind=ErrorKind.PERMANENT, code=413, provider_level=True,
                       error=f"{error} (the message, {size:,} bytes as sent, is over {esp}'s "
                             f"documented limit of {limit:,}; another provider may take it)")
    within = (f"within {esp}'s documented limit of {limit:,}" if limit is not None
              else f"{esp} documents no limit")
    as_sent = f"{size:,} bytes as sent" if size is not None else "size unknown"
    return Failure(kind=ErrorKind.TRANSIENT, code=413,
                   error=f"{error} (the message, {as_sent}, is {within}: the refusal is "
                         "the provider's, not the message's)")


def _request_size(exc: Any) -> int | None:
    """Bytes of the request the ESP refused, or of the message when it is not known."""
    response = getattr(exc, "response", None)
    body = getattr(getattr(response, "request", None), "body", None)
    if isinstance(body, (bytes, str)):
        return len(body.encode() if isinstance(body, str) else body)
    message = getattr(exc, "email_message", None)
    if message is not None:
        try:
            return len(message.message().as_bytes())
        except Exception:  # noqa: BLE001 - only a size for the error text; None says unknown
            return None
    return None


def http_retry_after(value: str | None) -> float | None:
    """Seconds from an HTTP ``Retry-After`` value (seconds, or an HTTP date), if any."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


@dataclass(frozen=True)
class _Answer:
    """What an ESP answered, read from an anymail error: status, headers, error text, and
    the ESP's own error code when it gives one in the body."""

    status: int | None
    headers: Mapping[str, str]
    detail: str
    code: str = ""


def _answer(exc: Any) -> _Answer:
    response = getattr(exc, "response", None)
    if isinstance(response, Mapping):
        # boto3 (Amazon SES): the parsed answer of a botocore ClientError.
        meta = response.get("ResponseMetadata") or {}
        error = response.get("Error") or {}
        status = meta.get("HTTPStatusCode")
        code = str(error.get("Code") or "")
        message = str(error.get("Message") or "")
        return _Answer(status=int(status) if status else None,
                       headers=dict(meta.get("HTTPHeaders") or {}),
                       detail=f"{code}: {message}" if code and message else code or message,
                       code=code)
    status = getattr(exc, "status_code", None)
    if response is None or status is None:
        return _Answer(status=None, headers={}, detail="")
    try:
        body = response.json()
    except ValueError:
        return _Answer(status=int(status), headers=response.headers,
                       detail=" ".join((response.text or "").split())[:300])
    code = str(body.get("ErrorCode", "")) if isinstance(body, dict) else ""
    return _Answer(status=int(status), headers=response.headers, detail=_error_text(body),
                   code=code)


def _error_text(body: Any) -> str:
    """The human part of an ESP's JSON error body, whatever its shape: Postmark's
    ``{"ErrorCode", "Message"}``, SendGrid's ``{"errors": [{"field", "message"}]}``,
    Mailgun's and SES's ``{"message"}``, Mailtrap's ``{"errors": [...]}``, …"""
    if isinstance(body, str):
        return body[:300]
    if isinstance(body, list):
        return "; ".join(filter(None, (_error_text(item) for item in body)))[:300]
    if not isinstance(body, dict):
        return ""
    for key in ("errors", "Errors", "error", "Error"):
        if body.get(key):
            return _error_text(body[key])
    message = next((str(body[k]) for k in ("message", "Message", "detail", "description")
                    if body.get(k)), "")
    field_name = body.get("field") or body.get("Field")
    text = f"{field_name}: {message}" if field_name and message else message
    if body.get("ErrorCode"):
        text = f"ErrorCode {body['ErrorCode']}: {text}"
    return text[:300]


def classify_anymail(exc: BaseException, backend: Any = None) -> Failure | None:
    """Classify an error raised by any django-anymail backend (``None``: not anymail's).

    - every recipient refused (``anymail_status``: rejected / invalid) → *permanent*,
      with each recipient's status in ``refused``;
    - an answer 400, 422 (the ESP's validation errors) → *permanent*;
    - 413: *permanent* and provider-level (failover) for a request over the ESP's
      documented size (:data:`DOCUMENTED_SIZE`), *transient* otherwise;
    - 401, 403 (key, sender identity), 404 (wrong URL, domain or server), and the
      account-level refusals of :data:`PROVIDER_REFUSALS` → *configuration*;
    - 408, 429, 5xx, no answer (refused, reset, timeout, DNS) → *transient*, with the
      answer's ``Retry-After`` (seconds or an HTTP date);
    - a message the ESP's API cannot express (unsupported feature, an address anymail
      cannot encode) → *permanent*; anymail's configuration errors → *configuration*.
    """
    if anymail_errors is None:
        return None
    if isinstance(exc, anymail_errors.AnymailConfigurationError):
        return Failure(kind=ErrorKind.CONFIGURATION, error=f"anymail: {exc}",
                       whole_provider=True)
    if not isinstance(exc, anymail_errors.AnymailError):
        return None
    # (Anymail leaves the backend off the errors it raises for a request that got no
    # answer.)
    esp = exc.esp_name or getattr(backend, "esp_name", None) or "ESP"
    if isinstance(exc, anymail_errors.AnymailRecipientsRefused):
        refused = anymail_refusals(exc.email_message, esp)
        return Failure(kind=ErrorKind.PERMANENT, refused=refused,
                       error=f"{esp} refused every recipient: "
                             + (", ".join(f"{a} ({why})" for a, why in refused.items())
                                or str(exc.args[0] if exc.args else exc)))
    if isinstance(exc, (anymail_errors.AnymailUnsupportedFeature,
                        anymail_errors.AnymailInvalidAddress,
                        anymail_errors.AnymailSerializationError)):
        return Failure(kind=ErrorKind.PERMANENT,
                       error=f"cannot send through {esp}: {exc.args[0] if exc.args else exc}")
    if not isinstance(exc, anymail_errors.AnymailAPIError):
        return None
    answer = _answer(exc)
    if answer.status is None:
        cause = exc.__cause__ or exc
        if botocore_errors is not None and isinstance(
                cause, (botocore_errors.NoCredentialsError, botocore_errors.NoRegionError,
                        botocore_errors.PartialCredentialsError)):
            return Failure(kind=ErrorKind.CONFIGURATION, error=f"{esp}: {cause}")
        text = str(cause).splitlines()[0] if str(cause) else ""
        return Failure(kind=ErrorKind.TRANSIENT,
                       error=f"{esp} unreachable: {type(cause).__name__}: {text}")
    status = answer.status
    error = f"{esp} {status}: {answer.detail}" if answer.detail else f"{esp} {status}"
    if status in (401, 403):
        # 401: the key, for every message; 403: often the sender's domain or identity.
        return Failure(kind=ErrorKind.CONFIGURATION, code=status, whole_provider=status == 401,
                       error=f"{error} (check the API key and the sender's domain)")
    if status == 404:
        return Failure(kind=ErrorKind.CONFIGURATION, code=status,
                       error=f"{error} (check the API URL, domain or server)")
    if status in (408, 429) or status >= 500 or status < 400:
        # < 400: a 2xx whose body could not be read; the message may or may not have
        # been taken, and a resend is the same message (same Message-ID).
        return Failure(kind=ErrorKind.TRANSIENT, code=status, error=error,
                       retry_after=http_retry_after(_header(answer.headers, "Retry-After")))
    if status == 413:
        return _too_large(exc, esp, error)
    if answer.code and answer.code in PROVIDER_REFUSALS.get(esp, ()):
        return Failure(kind=ErrorKind.CONFIGURATION, code=status, error=error)
    return Failure(kind=ErrorKind.PERMANENT, code=status, error=error)


def _header(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)
    if value is None:  # a plain dict (boto3 lower-cases the names)
        value = next((v for k, v in headers.items() if k.lower() == name.lower()), None)
    return value


def anymail_refusals(message: Any, esp: str) -> dict[str, str]:
    """Recipient → why, for the recipients anymail's ``anymail_status`` says were refused."""
    status = getattr(message, "anymail_status", None)
    recipients = getattr(status, "recipients", None) or {}
    return {addr: f"refused by {esp} ({s.status})" for addr, s in recipients.items()
            if s.status in ANYMAIL_REFUSED}


def sent_details(message: Any, backend: Any = None) -> tuple[dict[str, str], dict[str, str]]:
    """After a successful send: the provider's message ids (recipient → id) and the
    recipients it refused while taking the others (recipient → why).

    A backend may leave them on the message as ``provider_message_ids`` and
    ``refused_recipients``; for anymail backends they are read from ``anymail_status``
    (one id per recipient where the ESP gives one, else the message's id for each).
    """
    ids = getattr(message, "provider_message_ids", None)
    refused = getattr(message, "refused_recipients", None)
    status = getattr(message, "anymail_status", None)
    if status is not None and getattr(backend, "esp_name", None):
        recipients = getattr(status, "recipients", None) or {}
        if ids is None:
            ids = {addr: str(s.message_id) for addr, s in recipients.items() if s.message_id}
        if refused is None:
            refused = anymail_refusals(message, backend.esp_name)
    return dict(ids or {}), dict(refused or {})


def merge_batch(backend: Any) -> Any:
    """``backend`` as a batch backend of identical messages to one recipient each, if it
    is an anymail backend whose ESP has a batch API (:mod:`kipekee.backends.merge_batch`);
    else ``None``."""
    if anymail_errors is None:
        return None
    # Lazy: the module needs the optional anymail extra (and imports nothing of ours).
    from .backends import merge_batch  # noqa: PLC0415

    return merge_batch.for_backend(backend)
