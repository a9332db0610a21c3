"""The dev inbox: what the capture servers received, as a person would read it.

It holds every mail the site sent — sign-in codes included — and switches the capture
servers: with ``DEBUG`` on it is open (a developer's machine), with ``DEBUG`` off only
staff may open it; anyone else is sent to the admin's sign-in page and sees nothing.
"""

from __future__ import annotations

import base64
import functools
import re
from collections.abc import Callable
from email.message import EmailMessage
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.views import redirect_to_login
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.utils.http import content_disposition_header, url_has_allowed_host_and_scheme
from django.views.decorators.http import require_POST

import kipekee

from . import capture
from .models import CapturedMessage

_CID = re.compile(r"cid:([^\"'\s)>]+)", re.IGNORECASE)

View = Callable[..., HttpResponse]
# Shown as images; any other part is offered as a download, never rendered as a page.
_IMAGES = ("image/png", "image/jpeg", "image/gif")


def staff_unless_debug(view: View) -> View:
    """``view`` for anyone with DEBUG on, for active staff only with DEBUG off: an
    anonymous visitor goes to the admin's sign-in page, a signed-in non-staff user gets
    404."""

    @functools.wraps(view)
    def wrapped(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        user = request.user
        if settings.DEBUG or (user.is_active and user.is_staff):
            return view(request, *args, **kwargs)
        if not user.is_authenticated:
            return redirect_to_login(request.get_full_path(), reverse("admin:login"))
        raise Http404("No such page.")

    return wrapped


@staff_unless_debug
def index(request: HttpRequest) -> HttpResponse:
    return render(request, "devinbox/index.html", {
        "debug": settings.DEBUG,
        "messages_": CapturedMessage.objects.defer("raw")[:200],
        "servers": [{"name": name, "port": server.port, "down": capture.is_down(name)}
                    for name, server in capture.servers.items()],
    })


@staff_unless_debug
def detail(request: HttpRequest, pk: int) -> HttpResponse:
    captured = get_object_or_404(CapturedMessage, pk=pk)
    message = captured.message
    text = message.get_body(("plain",))
    html = message.get_body(("html",))
    files = []
    for index, part in enumerate(captured.parts(message)):
        if part is html or part is text:
            continue
        files.append({"index": index, "filename": part.get_filename() or "(no name)",
                      "type": part.get_content_type(), "size": len(part.get_payload(decode=True) or b""),
                      "inline": part.get_content_disposition() == "inline" or bool(part["Content-ID"]),
                      "content_id": (part["Content-ID"] or "").strip("<>")})
    return render(request, "devinbox/detail.html", {
        "m": captured, "headers": list(message.items()),
        "text": text.get_content() if text is not None else None,
        "has_html": html is not None, "files": files,
        "unsubscribe": unsubscribe_links(message),
    })


def unsubscribe_links(message: EmailMessage) -> dict[str, Any] | None:
    """What a mail client reads from ``List-Unsubscribe`` (RFC 2369) and
    ``List-Unsubscribe-Post`` (RFC 8058): the https link, the mailto: address and subject,
    and whether one-click is offered. None for mail that is not list mail."""
    header = message.get("List-Unsubscribe")
    if header is None:
        return None
    found: dict[str, Any] = {"https": "", "mailto": "", "subject": "",
                             "one_click": str(message.get("List-Unsubscribe-Post", "")).strip()
                             == "List-Unsubscribe=One-Click"}
    for uri in re.findall(r"<([^>]+)>", str(header)):
        if uri.startswith(("https:", "http:")) and not found["https"]:
            found["https"] = uri
        elif uri.startswith("mailto:") and not found["mailto"]:
            parts = urlsplit(uri)
            found["mailto"] = unquote(parts.path)
            found["subject"] = parse_qs(parts.query).get("subject", [""])[0]
    return found


@staff_unless_debug
@require_POST
def mailto(request: HttpRequest, pk: int) -> HttpResponse:
    """Send the email a mail client sends for the ``mailto:`` unsubscribe link: from the
    recipient, to the unsubscribe address, the token in the subject (through Kipekee and
    the capture servers, whose hook unsubscribes)."""
    captured = get_object_or_404(CapturedMessage, pk=pk)
    links = unsubscribe_links(captured.message)
    if links is None or not links["mailto"]:
        raise Http404("This message has no mailto: unsubscribe link.")
    receipt = kipekee.send(subject=links["subject"], text="Please unsubscribe me.\n",
                           to=links["mailto"], from_email=captured.rcpt_tos[0], mode="now")
    if receipt.sent:
        messages.success(request, f"Sent “{links['subject'][:30]}…” to {links['mailto']}.")
    else:
        messages.error(request, f"The unsubscribe email was not sent ({receipt.status}): "
                                f"{receipt.error}")
    return redirect("devinbox:detail", pk)


@staff_unless_debug
def html(request: HttpRequest, pk: int) -> HttpResponse:
    """The HTML part, with cid: images put in as data: URIs; shown in a sandboxed iframe,
    and sandboxed again by its own CSP in case it is opened directly. (Not links to their
    parts: a sandboxed document's requests go without the session cookie, which staff
    need with DEBUG off.)"""
    captured = get_object_or_404(CapturedMessage, pk=pk)
    body = captured.message.get_body(("html",))
    if body is None:
        raise Http404("This message has no HTML part.")
    by_cid = {(p["Content-ID"] or "").strip("<>"): p for p in captured.parts() if p["Content-ID"]}

    def inline(match: re.Match[str]) -> str:
        part = by_cid.get(match.group(1))
        if part is None or part.get_content_type() not in _IMAGES:
            return match.group(0)
        payload = part.get_payload(decode=True)
        data = base64.b64encode(payload if isinstance(payload, bytes) else b"").decode()
        return f"data:{part.get_content_type()};base64,{data}"

    response = HttpResponse(_CID.sub(inline, body.get_content()), content_type="text/html; charset=utf-8")
    response["Content-Security-Policy"] = "sandbox; script-src 'none'"
    return response


@staff_unless_debug
def part(request: HttpRequest, pk: int, index: int) -> HttpResponse:
    captured = get_object_or_404(CapturedMessage, pk=pk)
    parts = captured.parts()
    if not 0 <= index < len(parts):
        raise Http404("No such part.")
    chosen = parts[index]
    response = HttpResponse(chosen.get_payload(decode=True) or b"", content_type=chosen.get_content_type())
    if chosen.get_content_type() not in _IMAGES:
        # Never render an attachment as a page of this site.
        response["Content-Disposition"] = content_disposition_header(True, chosen.get_filename() or "part")
    response["X-Content-Type-Options"] = "nosniff"
    return response


@staff_unless_debug
def raw(request: HttpRequest, pk: int) -> HttpResponse:
    captured = get_object_or_404(CapturedMessage, pk=pk)
    return HttpResponse(bytes(captured.raw), content_type="text/plain; charset=utf-8")


@staff_unless_debug
@require_POST
def toggle_server(request: HttpRequest, name: str) -> HttpResponse:
    if name not in capture.servers:
        raise Http404("No such capture server in this process.")
    capture.set_down(name, not capture.is_down(name))
    target = request.POST.get("next", "")
    if not url_has_allowed_host_and_scheme(target, allowed_hosts={request.get_host()}):
        target = reverse("devinbox:index")
    return redirect(target)
