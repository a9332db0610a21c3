"""Helpers to read what reached the test SMTP server: the MIME tree and QR codes."""

from __future__ import annotations

import io
from email.message import Message


def tree(part: Message) -> object:
    """The MIME structure as nested ``(content_type, [children])`` / ``content_type``."""
    if part.is_multipart():
        return (part.get_content_type(), [tree(p) for p in part.get_payload()])
    return part.get_content_type()


def decode_qr(png: bytes) -> str:
    """The text of the one QR code in ``png`` (zxing-cpp, a real decoder from PyPI)."""
    import zxingcpp
    from PIL import Image

    results = zxingcpp.read_barcodes(Image.open(io.BytesIO(png)))
    assert len(results) == 1, results
    assert results[0].format == zxingcpp.BarcodeFormat.QRCode
    return results[0].text
