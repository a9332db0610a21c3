"""A local HTTP server that follows SendGrid's documented v3 Mail Send API, for tests.

    with LocalSendGridServer(api_keys={KEY}) as server:
        ...  # the provider's OPTIONS: {"api_key": KEY, "api_url": server.api_url}

The contract (docs.sendgrid.com, "Mail Send" v3 and its errors reference):

- ``POST /v3/mail/send`` with ``Authorization: Bearer <API key>``; a wrong or missing key:
  401;
- 202 Accepted with an empty body and an ``X-Message-Id`` header; each personalization is
  a separate message (anymail puts its ``anymail_id`` in each one's ``custom_args``);
- errors ``{"errors": [{"field": ..., "message": ..., "help": ...}]}``: 400 for a request
  that fails validation (no ``from``, no ``personalizations``, no recipient, no subject, no
  content, an invalid address), 403 when the From is not a verified Sender Identity
  (``verified_senders``), 413, 429 (with ``X-RateLimit-Limit``, ``-Remaining`` and
  ``-Reset``), 500.

Tracking webhooks (:meth:`LocalSendGridServer.webhook`): a JSON array of events, signed
with SendGrid's Signed Event Webhook (ECDSA P-256 over the timestamp and the body:
``X-Twilio-Email-Event-Webhook-Signature`` / ``-Timestamp``); the server holds the key
pair and gives the public key as :attr:`LocalSendGridServer.verification_key`.
"""

from __future__ import annotations

import base64
import json
import re
import secrets
import time
import uuid
from collections.abc import Iterable
from typing import Any

# The "esp" extra (anymail's SendGrid webhook verifies with it too).
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from .esp import ContractServer, ESPFaults, Reply

__all__ = ["LocalSendGridServer"]

MAX_RECIPIENTS = 1000
_ADDRESS = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+")
_HELP = "http://sendgrid.com/docs/API_Reference/Web_API_v3/Mail/errors.html"
_ERRORS = {
    400: "Bad Request",
    401: "The provided authorization grant is invalid, expired, or revoked",
    403: "access forbidden",
    413: "The JSON payload you have included in your request is too large.",
    429: "too many requests",
    500: "internal error",
    503: "service unavailable",
}


def _errors(status: int, *errors: tuple[str | None, str], **headers: str) -> Reply:
    return Reply.json(status, {"errors": [
        {"field": field_name, "message": message, "help": None if status >= 401 else _HELP}
        for field_name, message in errors]}, **headers)


class LocalSendGridServer(ContractServer):
    esp_name = "SendGrid"

    def __init__(self, *, api_keys: Iterable[str] = ("SG.test-key",),
                 verified_senders: Iterable[str] | None = None,
                 faults: ESPFaults | None = None, **kwargs: Any) -> None:
        super().__init__(faults=faults, **kwargs)
        self.api_keys = set(api_keys)
        self.verified_senders = (None if verified_senders is None
                                 else {s.lower() for s in verified_senders})
        self._signing_key = ec.generate_private_key(ec.SECP256R1())

    @property
    def api_url(self) -> str:
        return self.base_url + "/v3/"

    @property
    def verification_key(self) -> str:
        """The public key of the signed event webhook, as SendGrid's settings page shows
        it (anymail's ``SENDGRID_TRACKING_WEBHOOK_VERIFICATION_KEY``)."""
        pem = self._signing_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        return "".join(pem.decode().strip().splitlines()[1:-1])

    def error(self, status: int, reason: str = "") -> Reply:
        text = _ERRORS.get(status, f"HTTP {status}")
        reply = _errors(status, (None, f"{text}: {reason}" if reason else text))
        if status == 429:
            reply.headers.update({"X-RateLimit-Limit": "600", "X-RateLimit-Remaining": "0",
                                  "X-RateLimit-Reset": str(int(time.time()) + 60)})
        return reply

    def answer(self, method: str, path: str, headers: dict[str, str], body: bytes) -> Reply:
        if method != "POST" or path.split("?", 1)[0] != "/v3/mail/send":
            return _errors(404, (None, "not found"))
        scheme, _, key = headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or key.strip() not in self.api_keys:
            return self.error(401)
        self.forced()
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            return _errors(400, (None, "Bad Request"))
        if not isinstance(data, dict):
            return _errors(400, (None, "Bad Request"))
        problems = list(_validate(data))
        if problems:
            return _errors(400, *problems)
        sender = data["from"]["email"].lower()
        if self.verified_senders is not None and not (
                sender in self.verified_senders
                or sender.rpartition("@")[2] in self.verified_senders):
            return _errors(403, ("from", ("The from address does not match a verified Sender "
                                 "Identity. Mail cannot be sent until this error is resolved. "
                                 "Visit https://sendgrid.com/docs/for-developers/sending-email/"
                                 "sender-identity/ to see the Sender Identity requirements")))
        personalizations = data["personalizations"]
        self.refused_recipient([r["email"] for p in personalizations
                                for key in ("to", "cc", "bcc") for r in p.get(key) or []])
        x_message_id = secrets.token_urlsafe(16)[:22]
        self.accept(*({
            **data, "to": [r["email"] for r in p.get("to") or []],
            "subject": p.get("subject", data.get("subject", "")),
            "message_id": (p.get("custom_args") or {}).get("anymail_id", x_message_id),
            "personalization": p, "x_message_id": x_message_id,
        } for p in personalizations))
        return Reply(202, b"", "text/plain", {"X-Message-Id": x_message_id})

    # -- webhooks ---------------------------------------------------------------------

    def webhook(self, events: list[dict[str, Any]]) -> tuple[bytes, dict[str, str]]:
        """The body and headers of one signed event webhook request carrying ``events``
        (see :meth:`event`)."""
        body = json.dumps(events).encode()
        timestamp = str(int(time.time()))
        signature = self._signing_key.sign(timestamp.encode() + body, ec.ECDSA(hashes.SHA256()))
        return body, {"Content-Type": "application/json",
                      "X-Twilio-Email-Event-Webhook-Signature":
                          base64.b64encode(signature).decode(),
                      "X-Twilio-Email-Event-Webhook-Timestamp": timestamp}

    @staticmethod
    def event(kind: str, message: dict[str, Any], recipient: str, **extra: Any) -> dict[str, Any]:
        """One event about an accepted ``message`` (from :attr:`messages`): ``kind``
        delivered, bounce (``type`` "bounce" or "blocked"), dropped, spamreport,
        unsubscribe, …"""
        event = {"email": recipient, "event": kind, "timestamp": int(time.time()),
                 "sg_event_id": uuid.uuid4().hex, "smtp-id": f"<{message['x_message_id']}>",
                 "sg_message_id": f"{message['x_message_id']}.filter0001.1.0",
                 **(message["personalization"].get("custom_args") or {})}
        if kind == "bounce":
            event.update(type="bounce", status="5.1.1",
                         reason="550 5.1.1 The email account that you tried to reach does "
                                "not exist.")
        return {**event, **extra}


def _validate(data: dict[str, Any]) -> Iterable[tuple[str | None, str]]:
    """The documented validation errors, as (field, message)."""
    sender = data.get("from")
    if not isinstance(sender, dict) or not sender.get("email"):
        yield ("from.email", ("The from object must be provided for every email send. It is "
                             "an object that requires the email parameter, but may also "
                             "contain a name parameter."))
    elif not _ADDRESS.fullmatch(str(sender["email"])):
        yield ("from.email", "Does not contain a valid address.")
    personalizations = data.get("personalizations")
    if not isinstance(personalizations, list) or not personalizations:
        yield ("personalizations", ("The personalizations field is required and must have "
                                   "at least one personalization."))
        return
    total = 0
    for i, p in enumerate(personalizations):
        if not isinstance(p, dict) or not p.get("to"):
            yield (f"personalizations.{i}.to", ("The to array is required for all "
                                               "personalization objects, and must have at "
                                               "least one email object with a valid email "
                                               "address."))
            continue
        for key in ("to", "cc", "bcc"):
            for j, r in enumerate(p.get(key) or []):
                total += 1
                if not isinstance(r, dict) or not _ADDRESS.fullmatch(str(r.get("email", ""))):
                    yield (f"personalizations.{i}.{key}.{j}.email",
                           "Does not contain a valid address.")
    if total > MAX_RECIPIENTS:
        yield ("personalizations", (f"The total number of recipients must be less than "
                                   f"{MAX_RECIPIENTS + 1}."))
    templated = bool(data.get("template_id"))
    if not templated and not data.get("subject") and not all(
            isinstance(p, dict) and p.get("subject") for p in personalizations):
        yield ("subject", ("The subject is required. You can get around this requirement if "
                          "you use a template with a subject defined or if every "
                          "personalization has a subject defined."))
    content = data.get("content")
    if not templated and (not isinstance(content, list) or not content):
        yield ("content", ("Unless a valid template_id is provided, the content parameter is "
                          "required. There must be at least one defined content block. We "
                          "typically suggest both text/plain and text/html blocks are "
                          "included, but only one block is required."))
    for i, block in enumerate(content or []):
        if not isinstance(block, dict) or not block.get("value"):
            yield (f"content.{i}.value", ("The content value must be a string at least one "
                                         "character in length."))
