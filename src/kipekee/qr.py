"""QR codes as PNG bytes, for inline ``cid:`` images and attached tickets.

Needs the ``qr`` extra (``pip install django-kipekee[qr]``), which brings segno: pure
Python with no dependencies of its own (the ``qrcode`` package needs Pillow, or pypng at
half the speed, for PNG), as fast as qrcode with Pillow and with smaller PNGs.
"""

from __future__ import annotations

import io
import struct

from .exceptions import ConfigurationError, InvalidMessage

#: Error correction levels: L 7 %, M 15 %, Q 25 %, H 30 % of the symbol may be lost.
ERROR_LEVELS = ("l", "m", "q", "h")


def qr_png(data: str | bytes, *, scale: int = 6, border: int = 4, error: str = "m") -> bytes:
    """A PNG of the QR code of ``data``; ``scale`` pixels per module, ``border`` modules
    of quiet zone (the standard asks for 4; scanners struggle with less)."""
    try:
        import segno  # noqa: PLC0415 - the optional qr extra
    except ImportError as exc:
        raise ConfigurationError(
            "QR codes need segno: pip install 'django-kipekee[qr]'."
        ) from exc
    if not data:
        raise InvalidMessage("A QR code needs data to encode.")
    if error.lower() not in ERROR_LEVELS:
        raise InvalidMessage(f"QR error level must be one of {ERROR_LEVELS}, not {error!r}.")
    if scale < 1 or border < 0:
        raise InvalidMessage("QR scale must be at least 1 and border at least 0.")
    buffer = io.BytesIO()
    segno.make(data, error=error, micro=False).save(buffer, kind="png", scale=scale,
                                                    border=border)
    return buffer.getvalue()


def qr_attachment(data: str | bytes, filename: str = "ticket.png",
                  **options: int | str) -> tuple[str, bytes, str]:
    """``(filename, png, "image/png")`` for ``Email.attach(*qr_attachment(...))``."""
    return filename, qr_png(data, **options), "image/png"  # type: ignore[arg-type]


def png_size(png: bytes) -> tuple[int, int]:
    """Width and height of a PNG, from its IHDR chunk."""
    if png[:8] != b"\x89PNG\r\n\x1a\n":
        raise InvalidMessage("Not a PNG image.")
    width, height = struct.unpack(">II", png[16:24])
    return width, height
