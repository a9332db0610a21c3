"""A local HTTP server that follows Mailgun's documented Messages API, for tests.

    with LocalMailgunServer(api_keys={KEY}, domains={"mg.example.com"}) as server:
        ...  # OPTIONS: {"api_key": KEY, "api_url": server.api_url,
             #           "sender_domain": "mg.example.com"}

The contract (documentation.mailgun.com, "Messages" and "API Response Codes"):

- ``POST /v3/<domain>/messages``, form data (``multipart/form-data`` with attachments):
  ``from``, ``to``, ``cc``, ``bcc``, ``subject``, ``text``, ``html``, ``h:<Header>``,
  ``v:<variable>``, ``o:tag``, ``attachment``, ``inline``, and ``recipient-variables``
  (batch sending: one message per ``to`` address); HTTP basic auth ``api:<API key>``, a
  wrong key gets 401 ``Forbidden``;
- 200 ``{"id": "<…@domain>", "message": "Queued. Thank you."}``;
- errors ``{"message": "..."}``: 400 for a bad request (no ``from``, no ``to``, no text,
  html or template, an invalid address), 404 ``Domain not found``, 413, 429, 500.

Tracking webhooks (:meth:`LocalMailgunServer.webhook`): JSON ``{"signature": {"timestamp",
"token", "signature"}, "event-data": {...}}``, signed with HMAC-SHA256 of
timestamp + token under the webhook signing key (:attr:`signing_key`).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
import time
import uuid
from base64 import b64decode
from collections.abc import Iterable
from datetime import UTC, datetime
from email.parser import BytesParser
from email.policy import HTTP
from email.utils import getaddresses
from typing import Any
from urllib.parse import parse_qsl, unquote

from .esp import ContractServer, ESPFaults, Reply

__all__ = ["LocalMailgunServer"]

_ADDRESS = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+")
_ERRORS = {
    400: "Bad Request",
    413: "Request Entity Too Large",
    429: "Too many requests",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


def _message(status: int, text: str) -> Reply:
    return Reply.json(status, {"message": text})


class LocalMailgunServer(ContractServer):
    esp_name = "Mailgun"

    def __init__(self, *, api_keys: Iterable[str] = ("mailgun-key",),
                 domains: Iterable[str] = ("mg.example.com",),
                 signing_key: str = "mailgun-webhook-signing-key",
                 faults: ESPFaults | None = None, **kwargs: Any) -> None:
        super().__init__(faults=faults, **kwargs)
        self.api_keys = set(api_keys)
        self.domains = {d.lower() for d in domains}
        #: The webhook signing key (anymail's ``MAILGUN_WEBHOOK_SIGNING_KEY``).
        self.signing_key = signing_key

    @property
    def api_url(self) -> str:
        return self.base_url + "/v3/"

    def error(self, status: int, reason: str = "") -> Reply:
        if status == 401:
            return Reply(401, b"Forbidden", "text/plain")
        text = _ERRORS.get(status, f"HTTP {status}")
        return _message(status, f"{text}: {reason}" if reason else text)

    def answer(self, method: str, path: str, headers: dict[str, str], body: bytes) -> Reply:
        match = re.fullmatch(r"/v3/([^/]+)/messages", path.split("?", 1)[0])
        if method != "POST" or not match:
            return Reply(404, b"404 page not found", "text/plain")
        auth = headers.get("authorization", "")
        scheme, _, encoded = auth.partition(" ")
        try:
            user, _, key = b64decode(encoded).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            user, key = "", ""
        if scheme.lower() != "basic" or user != "api" or key not in self.api_keys:
            return self.error(401)
        domain = unquote(match[1]).lower()
        if domain not in self.domains:
            return _message(404, f"Domain not found: {domain}")
        self.forced()
        form, files = _form(headers.get("content-type", ""), body)
        sender = form.get("from", [])
        if not sender:
            return _message(400, "'from' parameter is missing")
        to = form.get("to", [])
        if not to:
            return _message(400, "'to' parameter is missing")
        recipients = {key: [a for _, a in getaddresses(form.get(key, []))]
                      for key in ("to", "cc", "bcc")}
        for key, addresses in recipients.items():
            if any(not _ADDRESS.fullmatch(a) for a in addresses):
                return _message(400, f"{key} parameter is not a valid address. please check "
                                     "documentation")
        if not any(v for key in ("text", "html", "template") for v in form.get(key, [])):
            return _message(400, "Need at least one of 'text', 'html' or 'template' "
                                 "parameters specified")
        everyone = [a for addresses in recipients.values() for a in addresses]
        self.refused_recipient(everyone)
        message_id = (f"<{datetime.now(UTC):%Y%m%d%H%M%S}.{secrets.token_hex(8)}"
                      f"@{domain}>")
        message: dict[str, Any] = {"from": sender[0], "subject": (form.get("subject") or [""])[0],
                   "text": (form.get("text") or [""])[0], "html": (form.get("html") or [""])[0],
                   "headers": {k[2:]: v[-1] for k, v in form.items() if k.startswith("h:")},
                   "variables": {k[2:]: v[-1] for k, v in form.items() if k.startswith("v:")},
                   "attachments": files, "message_id": message_id, "domain": domain}
        batch = form.get("recipient-variables")
        if batch:
            variables = json.loads(batch[0])
            self.accept(*({**message, "to": [a], "recipient_variables": variables.get(a, {}),
                           # Mailgun fills %recipient.<name>% in for each copy.
                           "headers": {k: _fill(v, variables.get(a, {}))
                                       for k, v in message["headers"].items()}}
                          for a in recipients["to"]))
        else:
            self.accept({**message, "to": recipients["to"], "cc": recipients["cc"],
                         "bcc": recipients["bcc"]})
        return Reply.json(200, {"id": message_id, "message": "Queued. Thank you."})

    # -- webhooks ---------------------------------------------------------------------

    def webhook(self, event: str, message_id: str, recipient: str, *,
                severity: str = "permanent", **event_data: Any) -> tuple[bytes, dict[str, str]]:
        """The body and headers of one signed tracking webhook: ``event`` delivered,
        failed (``severity`` permanent or temporary), complained, unsubscribed, …"""
        timestamp = str(int(time.time()))
        token = secrets.token_hex(25)
        signature = hmac.new(self.signing_key.encode(), (timestamp + token).encode(),
                             hashlib.sha256).hexdigest()
        data: dict[str, Any] = {
            "id": uuid.uuid4().hex, "event": event, "timestamp": time.time(),
            "recipient": recipient,
            "message": {"headers": {"message-id": message_id.strip("<>"), "to": recipient}},
            "user-variables": {}, "tags": [],
        }
        if event == "failed":
            data.update(severity=severity, reason="bounce" if severity == "permanent"
                        else "generic",
                        **{"delivery-status": {"code": 550 if severity == "permanent" else 452,
                                               "message": "5.1.1 The email account does not "
                                                          "exist" if severity == "permanent"
                                               else "4.2.2 Mailbox full",
                                               "description": ""}})
        data.update(event_data)
        body = {"signature": {"timestamp": timestamp, "token": token, "signature": signature},
                "event-data": data}
        return json.dumps(body).encode(), {"Content-Type": "application/json"}


def _fill(value: str, variables: dict[str, Any]) -> str:
    return re.sub(r"%recipient\.([^%]+)%", lambda m: str(variables.get(m[1], "")), value)


def _form(content_type: str, body: bytes) -> tuple[dict[str, list[str]], list[dict[str, Any]]]:
    """Form fields (name → values) and files of a urlencoded or multipart body."""
    fields: dict[str, list[str]] = {}
    files: list[dict[str, Any]] = []
    if content_type.startswith("multipart/form-data"):
        message = BytesParser(policy=HTTP).parsebytes(
            b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body)
        for part in message.iter_parts():
            name = part.get_param("name", header="content-disposition")
            filename = part.get_filename()
            payload = part.get_payload(decode=True)
            if not isinstance(payload, bytes):
                payload = b""
            if filename is not None:
                files.append({"field": name, "filename": filename, "content": payload,
                              "content_type": part.get_content_type()})
            else:
                fields.setdefault(str(name), []).append(payload.decode())
    else:
        for name, value in parse_qsl(body.decode(), keep_blank_values=True):
            fields.setdefault(name, []).append(value)
    return fields, files
