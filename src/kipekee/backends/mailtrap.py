"""Mailtrap's HTTP API as a Kipekee provider, on django-anymail's Mailtrap backend.

::

    KIPEKEE = {"PROVIDERS": {"mailtrap": {
        "BACKEND": "kipekee.backends.mailtrap.EmailBackend",
        "OPTIONS": {"api_token": os.environ["MAILTRAP_API_TOKEN"],
                    "stream": "transactional"},       # or "bulk", or "sandbox" + sandbox_id
        "LIMITS": {"RATE": "150/10s"},                 # Mailtrap's limit per API token
    }}}

Anymail builds the request (attachments, inline images, headers, reply-to) and owns the
pooled ``requests`` session and its error normalisation. On top of it this backend:

- chooses the host from ``stream`` (transactional, bulk, sandbox) unless ``api_url`` is
  given (a local test server), and checks its options: a typo is an error;
- passes Kipekee's ``metadata`` on: ``metadata["category"]`` (else the template name)
  becomes Mailtrap's ``category``, the rest ``custom_variables`` with the outbox id as
  ``kipekee_id`` (they come back in webhooks);
- refuses one item of a batch as a permanent failure of that message alone
  (:meth:`classify_error`); every other error, the ids Mailtrap gives (one per recipient)
  and refused recipients are read as for every anymail backend (:mod:`kipekee.providers`);
- sends many messages in one ``/api/batch`` request (:meth:`send_batch`), for
  :meth:`kipekee.delivery.Deliverer.deliver_many`. Anymail itself only uses the batch
  endpoint for one message with per-recipient merge data; this reuses anymail's payload
  builder for each message and its session and response parsing for the request.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urljoin

from anymail.backends.mailtrap import EmailBackend as AnymailMailtrapBackend
from anymail.backends.mailtrap import MailtrapPayload
from anymail.exceptions import (
    AnymailAPIError,
    AnymailError,
    AnymailRequestsAPIError,
    AnymailUnsupportedFeature,
)
from anymail.message import AnymailStatus
from django.core.mail import EmailMessage
from requests import Session
from requests.utils import get_netrc_auth

from ..exceptions import ConfigurationError
from ..models import ErrorKind
from ..providers import Failure

DEFAULT_TIMEOUT = 15.0
STREAM_URLS = {
    "transactional": "https://send.api.mailtrap.io/api/",
    "bulk": "https://bulk.api.mailtrap.io/api/",
    "sandbox": "https://sandbox.api.mailtrap.io/api/",
}
#: Mailtrap's documented limits for one /api/batch request.
BATCH_MAX_MESSAGES = 500
BATCH_MAX_BYTES = 50 * 1024 * 1024
# Room for the request's own JSON around the messages.
_ENVELOPE = 1024


class MailtrapBatchItemError(AnymailAPIError):
    """Mailtrap refused one message of a batch (the request as a whole succeeded)."""

    def __init__(self, errors: Sequence[str], **kwargs: Any) -> None:
        self.errors = [str(e) for e in errors] or ["refused without a reason"]
        super().__init__("; ".join(self.errors), **kwargs)


@dataclass(frozen=True, kw_only=True)
class BatchItem:
    """One message ready for a batch request: its JSON and its size in bytes."""

    message: EmailMessage
    payload: MailtrapPayload
    json: str
    size: int


class _BatchRequest:
    """What anymail's ``post_to_esp`` needs of a payload, for a whole batch."""

    def __init__(self, url: str, body: bytes, headers: dict[str, str]) -> None:
        self.url = url
        self.body = body
        self.headers = headers

    def get_request_params(self, api_url: str) -> dict[str, Any]:
        return {"method": "POST", "url": self.url, "data": self.body, "headers": self.headers}


class EmailBackend(AnymailMailtrapBackend):
    """Kipekee's Mailtrap provider. Options: ``api_token`` (required), ``stream``
    (``transactional`` | ``bulk`` | ``sandbox``), ``sandbox_id`` (the sandbox inbox),
    ``api_url`` (instead of the stream's host), ``timeout`` (seconds, default 15),
    ``batch_size`` (messages per batch request, at most 500)."""

    batch_max_bytes = BATCH_MAX_BYTES - _ENVELOPE
    #: Mailtrap's limit per API token (kipekee.W002 suggests it as LIMITS["RATE"]).
    documented_rate = "150/10s"

    def __init__(
        self,
        *,
        api_token: str | None = None,
        stream: str = "transactional",
        sandbox_id: int | str | None = None,
        api_url: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        batch_size: int = BATCH_MAX_MESSAGES,
        alias: str | None = None,
        fail_silently: bool = False,
    ) -> None:
        where = f"provider {alias!r}" if alias else "kipekee Mailtrap backend"
        if fail_silently:
            raise ConfigurationError(f"{where}: an outbox never fails silently.")
        if not api_token or not isinstance(api_token, str):
            raise ConfigurationError(f"{where}: OPTIONS must define 'api_token'.")
        if stream not in STREAM_URLS:
            raise ConfigurationError(
                f"{where}: 'stream' must be one of {sorted(STREAM_URLS)}, not {stream!r}.")
        if (stream == "sandbox") != bool(sandbox_id):
            raise ConfigurationError(
                f"{where}: 'sandbox_id' (the inbox id) goes with stream 'sandbox', and only "
                "with it.")
        if not isinstance(batch_size, int) or not 1 <= batch_size <= BATCH_MAX_MESSAGES:
            raise ConfigurationError(
                f"{where}: 'batch_size' must be an int from 1 to {BATCH_MAX_MESSAGES}.")
        options: dict[str, Any] = {"api_token": api_token, "api_url": api_url or STREAM_URLS[stream],
                                   "timeout": timeout, "sandbox_id": sandbox_id}
        if alias is not None:
            options["alias"] = alias
        super().__init__(**options)
        self.alias = alias
        self.stream = stream
        # Decided by the options alone, never by a stray ANYMAIL setting.
        self.sandbox_id = sandbox_id
        self.use_sandbox = stream == "sandbox"
        self.batch_max_messages = batch_size

    def create_session(self) -> Session:
        """anymail's session, with what ``requests`` reads from the environment for each
        request read once, for this backend's host: proxies (``HTTPS_PROXY``,
        ``NO_PROXY`` …), the CA bundle (``REQUESTS_CA_BUNDLE``) and ``~/.netrc``.

        Read per request they were a third of ``requests``' CPU for a send on a warm
        connection (``os.environ`` walked twice, ``.netrc`` looked for on disk), in the
        path a view waits on. A pooled session lives for ``CONNECTIONS["MAX_AGE_SECONDS"]`` at
        most, so a changed environment is taken up by the next session, as a kept-alive
        connection through a proxy keeps that proxy anyway.
        """
        session = super().create_session()
        if session.trust_env:
            found = session.merge_environment_settings(self.api_url, {}, None, None, None)
            session.proxies.update(found["proxies"])
            session.verify = found["verify"]
            if session.auth is None:
                session.auth = get_netrc_auth(self.api_url)
            session.trust_env = False
        return session

    # -- building ---------------------------------------------------------------------

    def build_message_payload(self, message: EmailMessage, defaults: Any) -> MailtrapPayload:
        payload = super().build_message_payload(message, defaults)
        metadata = dict(getattr(message, "kipekee_metadata", None) or {})
        data = payload.data
        category = metadata.pop("category", None) or getattr(message, "kipekee_template", "")
        if category and "category" not in data and "template_uuid" not in data:
            data["category"] = str(category)[:255]
        custom = {str(k): _text(v) for k, v in metadata.items()}
        kipekee_id = getattr(message, "kipekee_id", None)
        if kipekee_id is not None:
            custom["kipekee_id"] = str(kipekee_id)
        if custom:
            # What the message itself set (anymail's metadata) wins.
            data["custom_variables"] = {**custom, **data.get("custom_variables", {})}
        return payload

    # -- batch sends ------------------------------------------------------------------

    def send_batch_item(self, message: EmailMessage) -> BatchItem:
        """Build ``message`` for a batch request; raises what sending it would raise."""
        message.anymail_status = AnymailStatus()  # type: ignore[attr-defined]
        if not self.run_pre_send(message):
            # As with a single send (send_messages counts 0): not sent, reported, retried.
            raise RuntimeError("an anymail pre_send receiver cancelled the message")
        payload = self.build_message_payload(message, self.send_defaults)
        if payload.is_batch():
            raise AnymailUnsupportedFeature("merge_data in a Kipekee batch",
                                            email_message=message, backend=self)
        text = payload.serialize_json(payload.data)
        # +1: the comma between messages in the request.
        return BatchItem(message=message, payload=payload, json=text,
                         size=len(text.encode()) + 1)

    def send_batch(self, items: Sequence[BatchItem]) -> list[BaseException | None]:
        """Send ``items`` in one ``/api/batch`` request; per item ``None`` (sent, with
        ``provider_message_ids`` on its message) or the error that refused it.

        Raises (anymail's normalised errors) when the request as a whole fails.
        """
        if not items:
            return []
        if len(items) > self.batch_max_messages:
            raise ValueError(f"{len(items)} messages, more than {self.batch_max_messages}")
        first = items[0]
        body = ('{"requests":[' + ",".join(item.json for item in items) + "]}").encode()
        endpoint = "batch"
        if self.use_sandbox:
            endpoint += "/" + quote(str(self.sandbox_id), safe="")
        request = _BatchRequest(urljoin(self.api_url, endpoint), body,
                                dict(first.payload.headers))
        response = self.post_to_esp(request, first.message)
        parsed = self.deserialize_json_response(response, request, first.message)
        responses = parsed.get("responses") if isinstance(parsed, dict) else None
        if (not isinstance(responses, list) or len(responses) != len(items)
                or parsed.get("success") is not True):
            raise AnymailRequestsAPIError(
                f"Unexpected batch answer for {len(items)} messages",
                email_message=first.message, payload=request, response=response, backend=self)
        results: list[BaseException | None] = []
        for item, answer in zip(items, responses):
            if not isinstance(answer, dict) or not answer.get("success"):
                errors = answer.get("errors", []) if isinstance(answer, dict) else []
                results.append(MailtrapBatchItemError(errors, email_message=item.message,
                                                      backend=self))
                continue
            payload = item.payload
            recipients = [*payload.recipients_to, *payload.recipients_cc, *payload.recipients_bcc]
            try:
                status = self.parse_one_response(answer, recipients, response, payload,
                                                 item.message)
                item.message.anymail_status.set_recipient_status(status)  # type: ignore[attr-defined]
                item.message.anymail_status.esp_response = response  # type: ignore[attr-defined]
                self.run_post_send(item.message)
            except AnymailError as exc:
                results.append(exc)
                continue
            results.append(None)
        return results

    # -- errors -----------------------------------------------------------------------

    def classify_error(self, exc: BaseException) -> Failure | None:
        """A batch item Mailtrap refused is permanent for its message; everything else is
        classified as for every anymail backend (:func:`kipekee.providers.classify_anymail`)."""
        if isinstance(exc, MailtrapBatchItemError):
            return Failure(kind=ErrorKind.PERMANENT,
                           error=f"Mailtrap refused the message: {'; '.join(exc.errors)}")
        return None


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True, default=str)
    return str(value)

