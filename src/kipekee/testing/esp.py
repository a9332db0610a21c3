"""What the local servers of ESP contracts share: a threaded HTTP server on 127.0.0.1 that
records every request, keeps every accepted message and misbehaves on demand.

The ESP-specific parts (routes, authentication, validation, the documented answers and
the signed webhooks each ESP sends) are in :mod:`.postmark`, :mod:`.sendgrid`,
:mod:`.mailgun` and :mod:`.amazon_ses`; Mailtrap's server is :mod:`.mailtrap`.
"""

from __future__ import annotations

import json
import threading
import time
from abc import abstractmethod
from dataclasses import dataclass, field
from http.server import ThreadingHTTPServer
from typing import Any, ClassVar

from .serving import RequestHandler, ServedInThread, ServedRequest

__all__ = ["ContractServer", "ESPFaults", "ESPRequest", "Reply"]


@dataclass
class ESPFaults:
    """Misbehaviour for a contract server; all off by default, read at each request (a
    test may change them while the server runs)."""

    statuses: list[int] = field(default_factory=list)
    """HTTP statuses used first-in first-out, one per sending request, each answered with
    the ESP's documented error body for that status (``[500, 503]`` fails the next two)."""

    recipients: dict[str, int] = field(default_factory=dict)
    """Recipient address (case-insensitive) -> HTTP status for a message to it."""

    drop: int = 0
    """The next ``drop`` requests are read and get no answer (the connection is closed)."""

    retry_after: str | int | None = 1
    """``Retry-After`` of 429 answers (seconds or an HTTP date; ``None``: no header)."""


#: One HTTP request an ESP server received, and the status it answered (0: dropped).
ESPRequest = ServedRequest


@dataclass
class Reply:
    """An answer: status, body, its content type and more headers (status 0: drop)."""

    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def json(cls, status: int, data: Any, **headers: str) -> Reply:
        return cls(status, json.dumps(data).encode(), "application/json", dict(headers))


class Refused(Exception):
    """Raised while handling a request: answer with ``reply``."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(reply.status)
        self.reply = reply


class ContractServer(ServedInThread):
    """Base of the ESP contract servers. Subclasses implement :meth:`answer`."""

    esp_name: ClassVar[str] = "ESP"

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0, latency: float = 0.0,
                 faults: ESPFaults | None = None) -> None:
        self.latency = latency
        self.faults = faults or ESPFaults()
        self.requests: list[ESPRequest] = []
        #: Accepted messages, one per copy the ESP would deliver (a batch of n gives n),
        #: each a dict with at least ``to`` (addresses), ``subject`` and ``message_id``.
        self.messages: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._bind = (host, port)

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> ContractServer:
        server = self

        class Handler(_Handler):
            owner = server

        self._serve(ThreadingHTTPServer(self._bind, Handler), f"kipekee-{self.esp_name}")
        return self

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    # -- for subclasses ----------------------------------------------------------------

    @abstractmethod
    def answer(self, method: str, path: str, headers: dict[str, str], body: bytes) -> Reply:
        """The answer to one request, as the ESP's API contract gives it."""

    @abstractmethod
    def error(self, status: int, reason: str = "") -> Reply:
        """The ESP's documented error answer for ``status``."""

    def forced(self) -> None:
        """Raise the next fault of :attr:`faults.statuses`, if any."""
        with self._lock:
            status = self.faults.statuses.pop(0) if self.faults.statuses else None
        if status is not None:
            raise Refused(self.error(status))

    def refused_recipient(self, addresses: list[str]) -> None:
        """Raise the fault set for one of ``addresses`` in :attr:`faults.recipients`."""
        with self._lock:
            faults = {k.lower(): v for k, v in self.faults.recipients.items()}
        for address in addresses:
            status = faults.get(address.lower())
            if status is not None:
                raise Refused(self.error(status, address))

    def accept(self, *messages: dict[str, Any]) -> None:
        with self._changed:
            self.messages.extend(messages)
            self._changed.notify_all()

    def with_retry_after(self, reply: Reply) -> Reply:
        if reply.status == 429 and self.faults.retry_after is not None:
            reply.headers.setdefault("Retry-After", str(self.faults.retry_after))
        return reply

    def _handle(self, method: str, path: str, headers: dict[str, str], body: bytes) -> Reply:
        with self._lock:
            if self.faults.drop > 0:
                self.faults.drop -= 1
                return Reply(0)
        try:
            reply = self.answer(method, path, headers, body)
        except Refused as refused:
            reply = refused.reply
        return self.with_retry_after(reply)

    def _record(self, request: ESPRequest) -> None:
        with self._lock:
            self.requests.append(request)


class _Handler(RequestHandler):
    owner: ContractServer

    def answer_request(self, received: float, headers: dict[str, str], body: bytes) -> None:
        owner = self.owner
        reply = owner._handle(self.command, self.path, headers, body)
        if owner.latency:
            time.sleep(owner.latency)
        owner._record(ESPRequest(method=self.command, path=self.path, headers=headers,
                                 body=body, status=reply.status, at=received))
        self.reply(reply.status, reply.content_type, reply.body, reply.headers)
