"""The SMTP sink every system in ``bench/compare.py`` sends to, in its own process.

It is :class:`kipekee.testing.LocalSMTPServer` (aiosmtpd, real sockets) with one hook:
each accepted message's Message-ID is counted, so the benchmark can check that every
message arrived exactly once. The reply to the final dot of each message waits
``delay`` seconds (``Faults.stall_before_data_reply``): one provider round trip per
message. Banner, EHLO, MAIL and RCPT are answered at once (the server sets ``TCP_NODELAY``).

Or, with :meth:`Sink.set_latency`, every reply (banner included) reaches the client
``latency`` seconds after the server wrote it, without holding the server up
(``Faults.reply_latency``): a provider one round trip away, where a client pays for each
reply it waits for, and pipelined commands share one. :meth:`Sink.set_pipelining` turns
the PIPELINING advertisement (on by default) off and on, :meth:`Sink.set_chunking`
CHUNKING (BDAT; off by default). :meth:`Sink.round_trips` counts the replies the clients
waited for (from the server's command groups), whatever the load.

Run in its own process so that its event loop does not compete for the interpreter lock
of the process being measured. Controlled over a ``multiprocessing`` pipe by
:class:`Sink`.
"""

from __future__ import annotations

import multiprocessing
import re
import threading
from collections import Counter
from multiprocessing.connection import Connection
from typing import Any

_MESSAGE_ID = re.compile(rb"^message-id:[ \t]*(<[^>\r\n]+>)", re.IGNORECASE | re.MULTILINE)


def _serve(conn: Connection, delay: float) -> None:
    from kipekee.testing import Faults, LocalSMTPServer, ReceivedMessage

    counts: Counter[str] = Counter()
    lock = threading.Lock()

    def count(message: ReceivedMessage) -> None:
        head = message.data.split(b"\r\n\r\n", 1)[0]
        found = _MESSAGE_ID.search(head)
        key = found.group(1).decode("ascii", "replace") if found else "(none)"
        with lock:
            counts[key] += 1

    server = LocalSMTPServer(faults=Faults(stall_before_data_reply=delay), on_message=count)
    with server:
        conn.send(server.port)
        while True:
            if not conn.poll(1.0):
                # The counts and command groups are kept; the message bodies are not needed.
                server.forget_messages()
                continue
            command, *args = conn.recv()
            if command == "stop":
                return
            if command == "delay":
                server.faults.stall_before_data_reply = float(args[0])
                conn.send(None)
            elif command == "latency":
                server.faults.reply_latency = float(args[0])
                conn.send(None)
            elif command == "pipelining":
                server.pipelining = bool(args[0])
                conn.send(None)
            elif command == "chunking":
                server.chunking = bool(args[0])
                conn.send(None)
            elif command == "reset":
                with lock:
                    counts.clear()
                server.clear()
                conn.send(None)
            elif command == "round_trips":
                conn.send(_round_trips(server.command_groups, server.connections))
            elif command == "total":
                with lock:
                    conn.send(sum(counts.values()))
            elif command == "counts":
                with lock:
                    conn.send(dict(counts))


def _round_trips(groups: list[tuple[str, ...]], sessions: int) -> int:
    """The replies clients waited for since the last reset: each session's banner, each
    command group (commands sent together wait for their replies together), and the
    content after each ``DATA`` (its final reply); ``BDAT`` carries its content."""
    return sessions + len(groups) + sum(group.count("DATA") for group in groups)


class Sink:
    """Start the sink process; ask it for the counts of what arrived."""

    def __init__(self, delay: float = 0.0) -> None:
        self._conn, theirs = multiprocessing.Pipe()
        self._process = multiprocessing.Process(target=_serve, args=(theirs, delay),
                                                name="kipekee-bench-sink", daemon=True)
        self._process.start()
        self.port: int = self._conn.recv()
        self._lock = threading.Lock()

    def _ask(self, *command: Any) -> Any:
        with self._lock:
            self._conn.send(command)
            return self._conn.recv()

    def set_delay(self, seconds: float) -> None:
        self._ask("delay", seconds)

    def set_latency(self, seconds: float) -> None:
        self._ask("latency", seconds)

    def set_pipelining(self, offered: bool) -> None:
        self._ask("pipelining", offered)

    def set_chunking(self, offered: bool) -> None:
        self._ask("chunking", offered)

    def reset(self) -> None:
        self._ask("reset")

    def round_trips(self) -> int:
        """Replies the clients waited for since the last reset (see ``_round_trips``)."""
        return int(self._ask("round_trips"))

    def total(self) -> int:
        return int(self._ask("total"))

    def counts(self) -> dict[str, int]:
        return dict(self._ask("counts"))

    def check(self, expected: list[str]) -> tuple[int, int, int]:
        """``(missing, duplicated, unexpected)`` against the Message-IDs that were sent."""
        counts = self.counts()
        wanted = set(expected)
        missing = sum(1 for m in wanted if counts.get(m, 0) == 0)
        duplicated = sum(n - 1 for m, n in counts.items() if m in wanted and n > 1)
        unexpected = sum(n for m, n in counts.items() if m not in wanted)
        return missing, duplicated, unexpected

    def stop(self) -> None:
        with self._lock:
            self._conn.send(("stop",))
        self._process.join(timeout=10)
