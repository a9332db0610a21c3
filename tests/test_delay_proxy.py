"""kipekee.testing.DelayProxy: forwards both ways, in order, and never sooner than asked."""

from __future__ import annotations

import smtplib
import socket
import time

from kipekee.testing import DelayProxy


def test_proxy_carries_an_smtp_session_and_adds_at_least_the_round_trips(smtp_sink):
    rtt = 0.05
    with DelayProxy((smtp_sink.host, smtp_sink.port), rtt=rtt) as proxy:
        started = time.monotonic()
        with smtplib.SMTP(proxy.host, proxy.port, timeout=5) as client:
            connected = time.monotonic()
            client.noop()
            probed = time.monotonic()
            client.sendmail("a@example.com", ["b@example.com"], b"Subject: hi\r\n\r\nbody\r\n")
        assert proxy.connections == 1
    [received] = smtp_sink.wait_for(1)
    assert received.data.endswith(b"body\r\n") and received.rcpt_tos == ("b@example.com",)
    # Lower bounds only (a proxy can be slow on a busy machine, never early): the TCP
    # handshake and the greeting take two round trips, a NOOP one.
    assert connected - started >= 2 * rtt
    assert probed - connected >= rtt


def test_proxy_passes_a_large_write_through_unchanged():
    payload = bytes(range(256)) * 4096  # 1 MiB
    with socket.create_server(("127.0.0.1", 0)) as listener:
        target = listener.getsockname()
        with DelayProxy(target, rtt=0.002) as proxy:
            client = socket.create_connection((proxy.host, proxy.port), timeout=5)
            peer, _ = listener.accept()
            with client, peer:
                client.sendall(payload)
                client.shutdown(socket.SHUT_WR)
                got = b""
                peer.settimeout(5)
                while chunk := peer.recv(65536):
                    got += chunk
                peer.sendall(b"thanks")
                peer.shutdown(socket.SHUT_WR)
                assert client.recv(100) == b"thanks"
    assert got == payload
