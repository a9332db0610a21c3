"""``{% load kipekee %}``: tags that add inline images to the email being rendered.

``{% qr_code booking.number %}`` and ``{% inline_image "shop/logo.png" %}`` add a part to
the message and write ``<img src="cid:…">`` for it, so images show in mail clients that
block ``data:`` URIs and remote images. They work only while Kipekee renders an email.
"""

from __future__ import annotations

import mimetypes
from pathlib import Path

from django import template
from django.apps import apps
from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString

from ..compose import composing
from ..exceptions import TemplateError
from ..qr import png_size, qr_png

register = template.Library()


@register.simple_tag
def qr_code(data: object, scale: int = 6, border: int = 4, error: str = "m",
            alt: str = "QR code") -> SafeString:
    """An inline PNG of the QR code of ``data``, with its width and height."""
    email = composing()
    text = str(data)  # a variable missing in strict mode raises here, naming the template
    if not text:
        raise TemplateError("{% qr_code %} got empty data.")
    png = qr_png(text, scale=int(scale), border=int(border), error=str(error))
    cid = email._add_rendered_inline("qr-code.png", png, "image/png")
    width, height = png_size(png)
    return format_html('<img src="cid:{}" alt="{}" width="{}" height="{}">',
                       cid, alt, width, height)


@register.simple_tag
def inline_image(path: str, alt: str = "", **attrs: object) -> SafeString:
    """An inline part for a static file (found by the staticfiles finders)."""
    email = composing()
    if not apps.is_installed("django.contrib.staticfiles"):
        raise TemplateError("{% inline_image %} finds files with django.contrib.staticfiles, "
                            "which is not in INSTALLED_APPS.")
    # Only where the optional staticfiles app is installed (checked above).
    from django.contrib.staticfiles import finders  # noqa: PLC0415

    found = finders.find(str(path))
    if not found:
        raise TemplateError(f"{{% inline_image %}}: static file {path!r} not found.")
    file = Path(found if isinstance(found, str) else found[0])
    mimetype = mimetypes.guess_type(file.name)[0] or "application/octet-stream"
    cid = email._add_rendered_inline(file.name, file.read_bytes(), mimetype)
    extra = format_html_join("", ' {}="{}"', attrs.items())
    return format_html('<img src="cid:{}" alt="{}"{}>', cid, alt, extra)
