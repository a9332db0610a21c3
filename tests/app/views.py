"""Views of the test app: what a project's own views do with Kipekee — requests that
queue mail, requests that do not, and an async view that sends."""

from __future__ import annotations

from django.db import transaction
from django.http import HttpRequest, HttpResponse, JsonResponse

import kipekee


def page(request: HttpRequest) -> HttpResponse:
    """A page that has nothing to do with mail."""
    return HttpResponse("ok")


def order(request: HttpRequest) -> HttpResponse:
    """An order placed: its confirmation queued in the order's transaction."""
    with transaction.atomic():
        receipt = kipekee.send(subject="Order placed", text="thanks",
                               to=[request.GET.get("to", "ann@example.com")], mode="queue")
    return HttpResponse(str(receipt.id))


async def async_signup(request: HttpRequest) -> JsonResponse:
    """An async view (ASGI) that sends a confirmation and answers with its receipt."""
    receipt = await kipekee.asend(subject="Welcome", text="You are in.",
                                  to=request.POST["to"])
    return JsonResponse({"id": receipt.id, "message_id": receipt.message_id,
                         "status": receipt.status, "provider": receipt.provider})
