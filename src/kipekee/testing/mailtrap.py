"""A local HTTP server that follows Mailtrap's documented sending API, for tests and demos.

    from kipekee.testing import LocalMailtrapServer

    with LocalMailtrapServer(tokens={"t0ken"}, latency=0.02) as server:
        ...  # point the provider's api_url at server.api_url
        [message] = server.wait_for(1)
        assert message["subject"] == "Welcome"

The contract it follows (Mailtrap's OpenAPI specs for the transactional, bulk and sandbox
sending hosts, which share one request and response shape):

- ``POST /api/send`` (transactional and bulk hosts), ``POST /api/send/{inbox_id}`` (sandbox
  host): one message; ``200 {"success": true, "message_ids": [...]}`` with one id per
  recipient in ``to, cc, bcc`` order (the sandbox returns a single id).
- ``POST /api/batch`` (``/api/batch/{inbox_id}`` on the sandbox host):
  ``{"base": {...}, "requests": [{...}, ...]}``, at most 500 requests and 50 MB. Each
  request is merged over ``base``. The answer is 200 even when items fail:
  ``{"success": true, "responses": [{"success": true, "message_ids": [...]},
  {"success": false, "errors": [...]}]}``.
- Authentication by ``Api-Token: <token>`` or ``Authorization: Bearer <token>``.
- Errors as ``{"success": false, "errors": ["..."]}``: 400 for a bad request (the
  documented messages: ``'from' is required``, ``'to', 'cc' or 'bcc' address is
  required``, ``'subject' is required``, ``must specify either text or html body``),
  401 ``Unauthorized``, 403 ``Forbidden`` (sender domain not verified), 429 when the
  token made more than 150 requests in 10 seconds (with ``Retry-After``), 500.

Each server is one sending host: ``stream="transactional"`` (default), ``"bulk"`` or
``"sandbox"`` (which needs ``inbox_ids``). Misbehaviour comes from :class:`MailtrapFaults`,
changeable while the server runs. Every request is recorded (:attr:`requests`), and every
accepted message (:attr:`messages`, the merged JSON plus ``"message_ids"``).

``python -m kipekee.testing.mailtrap [--port N] [--latency S]`` runs one in the foreground.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import re
import socket
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import ThreadingHTTPServer
from typing import Any, Literal

from .serving import RequestHandler, ServedInThread, ServedRequest

__all__ = ["LocalMailtrapServer", "MailtrapFaults", "MailtrapRequest"]

Stream = Literal["transactional", "bulk", "sandbox"]

#: Mailtrap's documented limits.
MAX_BATCH_REQUESTS = 500
MAX_BATCH_BYTES = 50 * 1024 * 1024
MAX_RECIPIENTS_PER_FIELD = 1000
DEFAULT_RATE = (150, 10.0)  # requests per seconds, per API token

_ERROR_TEXT = {
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    413: "Payload Too Large",
    422: "Unprocessable Entity",
    429: "Too many requests",
    500: "Internal server error",
    502: "Bad Gateway",
    503: "Service Unavailable",
}


@dataclass
class MailtrapFaults:
    """Misbehaviour for a :class:`LocalMailtrapServer`; all off by default.

    Read at the moment each request is handled, so a test may change them while the
    server runs.
    """

    statuses: list[int] = field(default_factory=list)
    """HTTP statuses used first-in first-out, one per request, instead of handling it
    (``[500, 503]`` fails the next two requests). A 429 carries ``Retry-After``."""

    recipients: dict[str, int] = field(default_factory=dict)
    """Recipient address (case-insensitive) -> HTTP status. ``/api/send`` answers a
    message to it with that status; in ``/api/batch`` that item fails with
    ``{"success": false, "errors": [...]}`` while the others go through (the batch
    answer stays 200, as documented)."""

    drop: int = 0
    """The next ``drop`` requests get no answer: the connection is closed after the
    request was read (a network error for the client)."""

    retry_after: int = 1
    """Seconds in the ``Retry-After`` header of 429 answers."""


@dataclass(frozen=True)
class MailtrapRequest(ServedRequest):
    """One HTTP request the server received, and what it answered."""

    response: dict[str, Any] | None


class _Refused(Exception):
    def __init__(self, status: int, errors: Sequence[str]) -> None:
        super().__init__(status, errors)
        self.status = status
        self.errors = list(errors)


class LocalMailtrapServer(ServedInThread):
    """A threaded HTTP server on 127.0.0.1 that speaks Mailtrap's sending API."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        stream: Stream = "transactional",
        tokens: Iterable[str] = ("test-token",),
        inbox_ids: Iterable[int | str] = (),
        verified_domains: Iterable[str] | None = None,
        rate: tuple[int, float] | None = DEFAULT_RATE,
        latency: float = 0.0,
        faults: MailtrapFaults | None = None,
        record_bodies: bool = True,
    ) -> None:
        if stream not in ("transactional", "bulk", "sandbox"):
            raise ValueError(f"stream must be transactional, bulk or sandbox, not {stream!r}")
        self.stream: Stream = stream
        self.tokens = set(tokens)
        self.inbox_ids = {str(i) for i in inbox_ids}
        if stream == "sandbox" and not self.inbox_ids:
            raise ValueError("a sandbox server needs inbox_ids")
        self.verified_domains = (
            None if verified_domains is None else {d.lower() for d in verified_domains}
        )
        self.rate = rate
        self.latency = latency
        self.faults = faults or MailtrapFaults()
        #: Keep request bodies in :attr:`requests` (a benchmark may turn it off).
        self.record_bodies = record_bodies
        self.requests: list[MailtrapRequest] = []
        self.messages: list[dict[str, Any]] = []
        #: TCP connections accepted so far (a pooled client keeps reusing one).
        self.connections = 0
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._windows: dict[str, deque[float]] = {}
        self._bind = (host, port)

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> LocalMailtrapServer:
        server = self

        class Handler(_Handler):
            owner = server

        self._serve(ThreadingHTTPServer(self._bind, Handler), "kipekee-mailtrap")
        return self

    @property
    def api_url(self) -> str:
        """The base URL to give the client (the ``https://<host>/api/`` of the real one)."""
        return f"http://{self.host}:{self.port}/api/"

    # -- what tests read -------------------------------------------------------------

    def reset(self) -> None:
        """Forget recorded requests, messages and the rate windows."""
        with self._lock:
            self.requests.clear()
            self.messages.clear()
            self._windows.clear()
            self.connections = 0

    # -- request handling (called from handler threads) -----------------------------

    def _token(self, headers: dict[str, str]) -> str | None:
        token = headers.get("api-token")
        if token is None:
            auth = headers.get("authorization", "")
            scheme, _, value = auth.partition(" ")
            if scheme.lower() == "bearer" and value.strip():
                token = value.strip()
        return token

    def _admit(self, token: str) -> bool:
        """Count the request in the token's sliding window; False if over the limit."""
        if self.rate is None:
            return True
        count, per = self.rate
        now = time.monotonic()
        with self._lock:
            window = self._windows.setdefault(token, deque())
            while window and window[0] <= now - per:
                window.popleft()
            if len(window) >= count:
                return False
            window.append(now)
            return True

    def handle(self, method: str, path: str, headers: dict[str, str],
               body: bytes) -> tuple[int, dict[str, Any] | None, dict[str, str]]:
        """Answer one request: ``(status, json body or None to drop, extra headers)``."""
        extra: dict[str, str] = {}
        try:
            with self._lock:
                if self.faults.drop > 0:
                    self.faults.drop -= 1
                    return 0, None, extra
            if method != "POST":
                raise _Refused(404, ["Not Found"])
            endpoint, inbox = self._route(path)
            token = self._token(headers)
            if token is None or token not in self.tokens:
                raise _Refused(401, ["Unauthorized"])
            if not self._admit(token):
                extra["Retry-After"] = str(self.faults.retry_after)
                raise _Refused(429, [_ERROR_TEXT[429]])
            with self._lock:
                forced = self.faults.statuses.pop(0) if self.faults.statuses else None
            if forced is not None and forced >= 300:
                if forced == 429:
                    extra["Retry-After"] = str(self.faults.retry_after)
                raise _Refused(forced, [_ERROR_TEXT.get(forced, HTTPStatus(forced).phrase)])
            if "json" not in headers.get("content-type", ""):
                raise _Refused(400, ["Content-Type must be application/json"])
            try:
                data = json.loads(body)
            except (ValueError, UnicodeDecodeError):
                raise _Refused(400, ["request body is not valid JSON"]) from None
            if not isinstance(data, dict):
                raise _Refused(400, ["request body must be a JSON object"])
            if endpoint == "send":
                ids = self._accept(data, inbox)
                return 200, {"success": True, "message_ids": ids}, extra
            return 200, self._batch(data, inbox, len(body)), extra
        except _Refused as refused:
            return refused.status, {"success": False, "errors": refused.errors}, extra

    def _route(self, path: str) -> tuple[str, str | None]:
        path = path.split("?", 1)[0].rstrip("/")
        match = re.fullmatch(r"/api/(send|batch)(?:/([^/]+))?", path)
        if not match:
            raise _Refused(404, ["Not Found"])
        endpoint, inbox = match[1], match[2]
        if self.stream == "sandbox":
            if inbox is None or inbox not in self.inbox_ids:
                raise _Refused(404, ["Not Found"])
        elif inbox is not None:
            raise _Refused(404, ["Not Found"])
        return endpoint, inbox

    def _batch(self, data: dict[str, Any], inbox: str | None, size: int) -> dict[str, Any]:
        if size > MAX_BATCH_BYTES:
            raise _Refused(413, [f"payload exceeds {MAX_BATCH_BYTES} bytes"])
        requests = data.get("requests")
        if not isinstance(requests, list) or not requests:
            raise _Refused(400, ["'requests' is required"])
        if len(requests) > MAX_BATCH_REQUESTS:
            raise _Refused(400, [f"'requests' must contain at most {MAX_BATCH_REQUESTS} items"])
        base = data.get("base") or {}
        if not isinstance(base, dict):
            raise _Refused(400, ["'base' must be an object"])
        responses = []
        for item in requests:
            if not isinstance(item, dict):
                responses.append({"success": False, "errors": ["request must be an object"]})
                continue
            # A request's properties replace base's (not a deep merge), as documented.
            merged = {**base, **item}
            try:
                responses.append({"success": True, "message_ids": self._accept(merged, inbox)})
            except _Refused as refused:
                if refused.status == 401:
                    raise
                responses.append({"success": False, "errors": refused.errors})
        return {"success": True, "responses": responses}

    def _accept(self, message: dict[str, Any], inbox: str | None) -> list[str]:
        """Validate one message; record it and return its ids, or raise _Refused."""
        errors = _validate(message)
        if errors:
            raise _Refused(400, errors)
        recipients = [a["email"] for key in ("to", "cc", "bcc") for a in message.get(key) or []]
        with self._lock:
            faults = {k.lower(): v for k, v in self.faults.recipients.items()}
        for address in recipients:
            status = faults.get(address.lower())
            if status is not None:
                raise _Refused(status, [f"{_ERROR_TEXT.get(status, 'refused')}: {address}"])
        sender = message["from"]["email"]
        if self.verified_domains is not None:
            domain = sender.rpartition("@")[2].lower()
            if domain not in self.verified_domains:
                raise _Refused(403, [f"Sending from domain {domain} is not allowed"])
        if self.stream == "sandbox":
            ids = [str(uuid.uuid4())]
        else:
            ids = [str(uuid.uuid4()) for _ in recipients]
        with self._changed:
            self.messages.append({**message, "message_ids": ids, "inbox_id": inbox})
            self._changed.notify_all()
        return ids

    def _record(self, request: MailtrapRequest) -> None:
        with self._lock:
            self.requests.append(request)


def _address_errors(field_name: str, value: Any, many: bool) -> list[str]:
    items = value if many else [value]
    if many and not isinstance(value, list):
        return [f"'{field_name}' must be an array"]
    if many and len(items) > MAX_RECIPIENTS_PER_FIELD:
        return [f"'{field_name}' must contain at most {MAX_RECIPIENTS_PER_FIELD} addresses"]
    errors = []
    for index, item in enumerate(items):
        email = item.get("email") if isinstance(item, dict) else None
        if not isinstance(email, str) or not re.fullmatch(r"[^@\s]+@[^@\s]+\.[^@\s]+", email):
            where = f"'{field_name}' {index}" if many else f"'{field_name}'"
            errors.append(f"address is invalid in {where}")
    return errors


def _validate(message: dict[str, Any]) -> list[str]:
    """The documented 400 errors for one message, in the documented words."""
    errors: list[str] = []
    if "from" not in message:
        errors.append("'from' is required")
    else:
        errors += _address_errors("from", message["from"], many=False)
    if not any(message.get(key) for key in ("to", "cc", "bcc")):
        errors.append("'to', 'cc' or 'bcc' address is required")
    for key in ("to", "cc", "bcc"):
        if key in message:
            errors += _address_errors(key, message[key], many=True)
    if "reply_to" in message:
        errors += _address_errors("reply_to", message["reply_to"], many=False)
    templated = "template_uuid" in message
    if templated:
        if any(k in message for k in ("subject", "text", "html", "category")):
            errors.append("'subject', 'text', 'html' and 'category' are not allowed with "
                          "'template_uuid'")
    else:
        if not isinstance(message.get("subject"), str) or not message["subject"]:
            errors.append("'subject' is required")
        if not message.get("text") and not message.get("html"):
            errors.append("must specify either text or html body")
    category = message.get("category")
    if category is not None and (not isinstance(category, str) or len(category) > 255):
        errors.append("'category' must be a string of at most 255 characters")
    for name in ("headers", "custom_variables"):
        value = message.get(name)
        if value is not None and not isinstance(value, dict):
            errors.append(f"'{name}' must be an object")
    for index, attachment in enumerate(message.get("attachments") or []):
        if not isinstance(attachment, dict) or not attachment.get("filename"):
            errors.append(f"'attachments' {index}: 'filename' is required")
            continue
        try:
            base64.b64decode(attachment.get("content") or "", validate=True)
        except (binascii.Error, ValueError):
            errors.append(f"'attachments' {index}: 'content' must be base64")
        if not attachment.get("content"):
            errors.append(f"'attachments' {index}: 'content' is required")
        disposition = attachment.get("disposition", "attachment")
        if disposition not in ("attachment", "inline"):
            errors.append(f"'attachments' {index}: 'disposition' must be attachment or inline")
        if disposition == "inline" and not attachment.get("content_id"):
            errors.append(f"'attachments' {index}: inline attachments need a 'content_id'")
    return errors


class _Handler(RequestHandler):
    owner: LocalMailtrapServer
    server_version = "kipekee-mailtrap/1"

    def setup(self) -> None:
        super().setup()
        # The handler writes the headers and the body apart: with Nagle's algorithm and
        # the client's delayed ACK the body waited up to 40 ms on a kept-alive
        # connection, a delay of this server that Mailtrap's has not.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self.owner._lock:
            self.owner.connections += 1

    def answer_request(self, received: float, headers: dict[str, str], body: bytes) -> None:
        owner = self.owner
        status, payload, extra = owner.handle(self.command, self.path, headers, body)
        if owner.latency:
            time.sleep(owner.latency)
        owner._record(MailtrapRequest(
            method=self.command, path=self.path, headers=headers,
            body=body if owner.record_bodies else b"", status=status,
            response=payload if owner.record_bodies or status != 200 else None, at=received,
        ))
        self.reply(0 if payload is None else status, "application/json; charset=utf-8",
                   json.dumps(payload).encode(), extra)


def main(argv: Sequence[str] | None = None) -> int:
    """Run a Mailtrap-contract server in the foreground until Ctrl-C."""
    parser = argparse.ArgumentParser(
        prog="python -m kipekee.testing.mailtrap",
        description="A local server that follows Mailtrap's sending API contract.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8025)
    parser.add_argument("--token", action="append", default=None,
                        help="accepted API token (repeatable; default 'test-token')")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds per answer")
    args = parser.parse_args(argv)
    server = LocalMailtrapServer(host=args.host, port=args.port,
                                 tokens=args.token or ["test-token"], latency=args.latency)
    with server:
        print(f"Kipekee Mailtrap-contract server at {server.api_url} (Ctrl-C to stop)",
              flush=True)
        seen = 0
        try:
            while True:
                time.sleep(0.2)
                for message in server.messages[seen:]:
                    to = ",".join(a["email"] for a in message.get("to") or [])
                    print(f"to={to} subject={message.get('subject')!r}", flush=True)
                seen = len(server.messages)
        except KeyboardInterrupt:
            print("stopping", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
