"""kipekee.wire: a message's bytes as Django builds them, without its attachments held
several times over; the exact size on the wire without encoding them."""

from __future__ import annotations

import base64
import os
import re
import tracemalloc

import pytest
from django.core.mail import EmailMessage, EmailMultiAlternatives

from kipekee import wire
from kipekee.message import RelatedMessage, inline_part

HEADERS = {"Message-ID": "<fixed@shop.example>", "Date": "Mon, 01 Dec 2025 10:00:00 +0000"}


def boundaries_numbered(data: bytes) -> bytes:
    """Multipart boundaries are random on each build: number them in order of appearance."""
    seen: dict[bytes, bytes] = {}

    def number(match: re.Match[bytes]) -> bytes:
        return seen.setdefault(match.group(0), b"BOUNDARY-%d" % len(seen))

    return re.sub(rb"={15}\d{19}==", number, data)


def django_bytes(message: EmailMessage) -> bytes:
    return boundaries_numbered(wire._django_bytes(message))


def messages() -> list[EmailMessage]:
    plain = EmailMessage("Your ticket", "see you", "shop@example.com", ["ann@example.com"],
                         headers=HEADERS)
    plain.attach("ticket.pdf", os.urandom(200_000), "application/pdf")

    rich = RelatedMessage("Tikiti yako ✓", "Karibu", "Shop <shop@example.com>",
                          ["ann@example.com"], cc=["bob@bücher.example"], headers=HEADERS)
    rich.attach_alternative('<p>Karibu <img src="cid:qr@kipekee"></p>', "text/html")
    rich.attach(inline_part("qr.png", os.urandom(80_000), "image/png", "qr@kipekee"))
    for size in (65_536, 65_537, 65_538, 57 * 1024 * 3):  # each remainder mod 3, whole pieces
        rich.attach(f"Fahrkarte-München-{size}.bin", os.urandom(size), "application/octet-stream")
    rich.attach("notes.txt", "a text attachment\n" * 5000, "text/plain")
    rich.attach("small.bin", b"\x00\x01", "application/octet-stream")

    alternatives = EmailMultiAlternatives("Report", "see attached", "shop@example.com",
                                          ["ann@example.com"], headers=HEADERS)
    alternatives.attach_alternative("<b>see attached</b>", "text/html")
    alternatives.attach("report.xlsx", os.urandom(300_001),
                        "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet")
    return [plain, rich, alternatives]


@pytest.mark.parametrize("index", [0, 1, 2])
def test_the_bytes_are_djangos(index):
    message = messages()[index]
    expected = django_bytes(message)
    chunks = [bytes(c) for c in wire.message_chunks(message)]
    assert boundaries_numbered(b"".join(chunks)) == expected
    assert all(c.endswith(b"\r\n") for c in chunks[:-1])  # dot-stuffing piece by piece
    assert boundaries_numbered(wire.message_bytes(message)) == expected
    assert wire.message_size(message) == len(wire._django_bytes(message))
    # The message is left as it was: attachments are the originals again.
    assert django_bytes(message) == expected


def test_small_attachments_are_left_to_django():
    message = EmailMessage("Hi", "x", "shop@example.com", ["ann@example.com"], headers=HEADERS)
    message.attach("a.bin", os.urandom(1000), "application/octet-stream")
    assert wire.message_size(message) == len(wire._django_bytes(message))
    assert boundaries_numbered(wire.message_bytes(message)) == django_bytes(message)


@pytest.mark.django_db(transaction=True)
def test_the_attachment_round_trips(sink_provider):
    import kipekee

    content = os.urandom(500_000)
    receipt = kipekee.send(subject="Photos", text="x", to=["ann@example.com"],
                           attachments=[("photo.jpg", content, "image/jpeg")])
    assert receipt.sent, receipt
    [received] = sink_provider.wait_for(1)
    [part] = list(received.message.iter_attachments())
    assert part.get_filename() == "photo.jpg" and part.get_content() == content
    body = part.get_payload()
    assert {len(line) for line in body.splitlines()[:-1]} == {76}
    assert base64.b64decode(body) == content


def test_the_wire_bytes_hold_an_attachment_about_once():
    """Django's own build peaks near 8 times a large attachment (bytes as a str, base64
    bytes, a base64 str, the generator's lines, the message). Measured with tracemalloc,
    which counts allocations, not time."""
    size = 4 * 2**20
    message = EmailMessage("Big", "x", "shop@example.com", ["ann@example.com"], headers=HEADERS)
    message.attach("big.bin", os.urandom(size), "application/octet-stream")
    tracemalloc.start()
    try:
        data = wire.message_bytes(message)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    encoded = len(data)
    assert encoded > 1.35 * size
    # The result and, while they are joined, its pieces; nothing else of that size.
    assert peak < 2 * encoded + 2**20, f"peak {peak / size:.2f} times the attachment"


@pytest.fixture
def sink_process(kipekee_settings):
    """A capture SMTP server in another process: its buffers stay out of this process's
    allocations, which the test below counts."""
    import subprocess
    import sys

    from .conftest import SMTP_BACKEND

    server = subprocess.Popen([sys.executable, "-m", "kipekee.testing", "--port", "0"],
                              stdout=subprocess.PIPE, text=True)
    try:
        line = server.stdout.readline()
        port = int(re.search(r"port (\d+)", line)[1])
        kipekee_settings(primary={"BACKEND": SMTP_BACKEND, "OPTIONS": {
            "host": "127.0.0.1", "port": port, "timeout": 30}})
        yield server
    finally:
        server.terminate()
        server.wait(timeout=10)


@pytest.mark.django_db(transaction=True)
def test_delivery_holds_a_large_attachment_far_fewer_times(sink_process):
    """A 50 MB attachment grew the worker by ~500 MB: Django's build of the message
    alone peaked near 8 times the attachment. Now: the attachment as read, the message
    once encoded, and what smtplib's DATA copies (twice the message). Counted by
    tracemalloc: allocations, not time."""
    import kipekee
    from kipekee import outbox
    from kipekee.delivery import Deliverer

    size = 8 * 2**20
    receipt = kipekee.send(subject="Big", text="x", to=["ann@example.com"], mode="queue",
                           attachments=[("big.bin", os.urandom(size), "application/zip")])
    row = outbox.claim(receipt.id)
    with Deliverer() as deliverer:
        tracemalloc.start()
        try:
            outcome = deliverer.deliver(row)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert outcome.ok, outcome
    # Read once (1) and encoded once (1.37); smtplib's DATA adds two copies of the
    # message while it sends (2.74): 5.1 measured on SQLite and PostgreSQL (8.85 before).
    assert peak < 6 * size, f"peak {peak / size:.2f} times the attachment"
