"""What Kipekee's local servers share: :class:`LocalServer`, started and stopped by a
test or used as a context manager (the SMTP server, the delay proxy, the HTTP servers);
and for the HTTP ones (:mod:`.esp`, :mod:`.mailtrap`) a threaded ``http.server``, its
address, and waiting for messages."""

from __future__ import annotations

import json
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self


@dataclass(frozen=True)
class ServedRequest:
    """One HTTP request a server received, and the status it answered (0: dropped)."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    status: int
    at: float  # time.monotonic() when it was received

    @property
    def json(self) -> Any:
        return json.loads(self.body) if self.body else None


class RequestHandler(BaseHTTPRequestHandler, ABC):
    """Reads a request and writes a reply for a server's :meth:`answer_request`.

    A subclass implements ``answer_request(received, headers, body)``: ``received`` is
    when it came (``time.monotonic()``), ``headers`` lower-cased.
    """

    protocol_version = "HTTP/1.1"  # keep-alive, as the real APIs

    def log_message(self, format: str, *args: Any) -> None:
        pass  # tests read server.requests; stderr stays quiet

    @abstractmethod
    def answer_request(self, received: float, headers: dict[str, str], body: bytes) -> None:
        """Answer one request (with :meth:`reply`)."""

    def reply(self, status: int, content_type: str, body: bytes,
              headers: Mapping[str, str]) -> None:
        """Send the answer, or (``status`` 0: dropped) close without a word."""
        if status == 0:
            self.close_connection = True
            return
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def _serve(self) -> None:
        received = time.monotonic()
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        self.answer_request(received, {k.lower(): v for k, v in self.headers.items()}, body)

    do_POST = _serve
    do_GET = _serve
    do_PUT = _serve
    do_DELETE = _serve


class LocalServer(ABC):
    """A server a test starts and stops, or uses as a context manager: ``with`` starts
    it and stops it on the way out, whatever happened inside."""

    @abstractmethod
    def start(self) -> object:
        """Start serving (in the background); returns the server."""

    @abstractmethod
    def stop(self) -> None:
        """Stop serving and release the port."""

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class ServedInThread(LocalServer):
    """Runs a :class:`ThreadingHTTPServer` in a daemon thread.

    A subclass sets ``messages``, ``requests`` (each with a ``status``), ``_lock`` and
    ``_changed`` (a Condition on ``_lock``, notified when a message is accepted) and
    implements :meth:`start`, which builds the server and calls :meth:`_serve`.
    """

    messages: list[dict[str, Any]]
    requests: list[Any]
    _lock: threading.Lock
    _changed: threading.Condition
    _httpd: ThreadingHTTPServer | None = None
    _thread: threading.Thread | None = None

    def _serve(self, httpd: ThreadingHTTPServer, name: str) -> None:
        httpd.daemon_threads = True
        self._httpd = httpd
        self._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    @property
    def host(self) -> str:
        assert self._httpd is not None, "server not started"
        return str(self._httpd.server_address[0])

    @property
    def port(self) -> int:
        assert self._httpd is not None, "server not started"
        return int(self._httpd.server_address[1])

    # -- what tests read -------------------------------------------------------------

    def wait_for(self, count: int, timeout: float = 5.0) -> list[dict[str, Any]]:
        """Wait until at least ``count`` messages were accepted; return them all."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while len(self.messages) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{len(self.messages)} messages accepted, not {count}")
                self._changed.wait(left)
            return list(self.messages)

    def statuses(self) -> list[int]:
        """The HTTP status of every request so far, in order (0: dropped)."""
        with self._lock:
            return [r.status for r in self.requests]
