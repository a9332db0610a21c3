"""A TCP proxy that puts a provider a round-trip time away, for benchmarks and tests.

    from kipekee.testing import DelayProxy, LocalSMTPServer

    with LocalSMTPServer() as server, DelayProxy((server.host, server.port), rtt=0.02) as proxy:
        ...  # connect to proxy.host, proxy.port: every exchange now costs 20 ms more

Every chunk of bytes is passed on half the round-trip time after it arrived, in each
direction, in order, without throttling: bytes written together (a pipelined SMTP
command group) cost one round trip, as on a real link, and bytes written one reply at a
time cost one round trip each.

A new connection pays for the TCP handshake too: the client's ``connect()`` returns at
once on loopback, so its first bytes reach the server 1.5 round trips later (SYN,
SYN-ACK, then the ACK with its data) and the server's first bytes (an SMTP greeting) reach
the client two round trips after connect, as on a real link.

``python -m kipekee.testing.delay TARGET_PORT [--rtt S]`` runs one in the foreground.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import socket
import sys
import threading
import time
from collections.abc import Sequence

from .serving import LocalServer

__all__ = ["DelayProxy"]

_READ = 65536


class DelayProxy(LocalServer):
    """Forward ``127.0.0.1:<port>`` to ``target``, ``rtt`` seconds of round trip away."""

    def __init__(self, target: tuple[str, int], *, rtt: float, host: str = "127.0.0.1",
                 port: int = 0) -> None:
        if rtt < 0:
            raise ValueError("rtt must be >= 0 seconds")
        self.target = target
        self.rtt = rtt
        self.host = host
        self.port = port
        self._lock = threading.Lock()
        self._connections = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopped: asyncio.Event | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None

    @property
    def connections(self) -> int:
        """TCP connections accepted so far."""
        with self._lock:
            return self._connections

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> DelayProxy:
        sock = socket.create_server((self.host, self.port))
        self.port = sock.getsockname()[1]
        self._thread = threading.Thread(target=self._run, args=(sock,), daemon=True,
                                        name=f"DelayProxy-{self.port}")
        self._thread.start()
        self._started.wait()
        if self._error is not None:
            raise self._error
        return self

    def stop(self) -> None:
        loop, stopped, thread = self._loop, self._stopped, self._thread
        if thread is None or loop is None or stopped is None:
            return
        self._thread = None
        loop.call_soon_threadsafe(stopped.set)
        thread.join(5)

    # -- the proxy's thread ----------------------------------------------------------

    def _run(self, sock: socket.socket) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve(sock))
        except BaseException as exc:  # noqa: BLE001 - reported to start()'s caller
            self._error = exc
        finally:
            self._started.set()
            loop.close()

    async def _serve(self, sock: socket.socket) -> None:
        self._stopped = asyncio.Event()
        tasks: set[asyncio.Task[None]] = set()

        def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            with self._lock:
                self._connections += 1
            task = asyncio.get_running_loop().create_task(self._relay(reader, writer))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        server = await asyncio.start_server(accepted, sock=sock)
        self._started.set()
        await self._stopped.wait()
        server.close()
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _relay(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        half = self.rtt / 2
        _nodelay(client_w)
        upstream: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        # What the client sends before the handshake would have let it is held back.
        reading = loop.create_task(_read_into(client_r, upstream, half))
        server_w: asyncio.StreamWriter | None = None
        try:
            await asyncio.sleep(self.rtt + half)  # SYN, SYN-ACK, ACK
            server_r, server_w = await asyncio.open_connection(*self.target)
            _nodelay(server_w)
            downstream: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
            await asyncio.gather(
                reading,
                _write_from(upstream, server_w),
                _read_into(server_r, downstream, half),
                _write_from(downstream, client_w),
            )
        except (OSError, asyncio.IncompleteReadError):
            pass  # one side went away: close both
        finally:
            reading.cancel()
            for writer in (client_w, server_w):
                if writer is not None:
                    writer.close()
                    with contextlib.suppress(Exception):
                        await writer.wait_closed()


async def _read_into(reader: asyncio.StreamReader, queue: asyncio.Queue[tuple[float, bytes]],
                     delay: float) -> None:
    """Each chunk with the time it may be passed on; ``b""`` at the end."""
    loop = asyncio.get_running_loop()
    while True:
        data = await reader.read(_READ)
        await queue.put((loop.time() + delay, data))
        if not data:
            return


async def _write_from(queue: asyncio.Queue[tuple[float, bytes]],
                      writer: asyncio.StreamWriter) -> None:
    loop = asyncio.get_running_loop()
    while True:
        due, data = await queue.get()
        wait = due - loop.time()
        if wait > 0:
            await asyncio.sleep(wait)
        if not data:
            if writer.can_write_eof():
                writer.write_eof()
            return
        writer.write(data)
        await writer.drain()


def _nodelay(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kipekee.testing.delay",
                                     description="A TCP proxy adding a round-trip time.")
    parser.add_argument("target_port", type=int)
    parser.add_argument("--target-host", default="127.0.0.1")
    parser.add_argument("--rtt", type=float, default=0.02, help="seconds (default 0.02)")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    with DelayProxy((args.target_host, args.target_port), rtt=args.rtt, port=args.port) as proxy:
        print(f"127.0.0.1:{proxy.port} -> {args.target_host}:{args.target_port}, "
              f"{args.rtt * 1000:.0f} ms round trip (Ctrl-C to stop)", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                time.sleep(3600)
    return 0


if __name__ == "__main__":
    sys.exit(main())
