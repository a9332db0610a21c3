"""Views of the test app: requests that queue mail, and requests that do not."""

from __future__ import annotations

from django.db import transaction
from django.http import HttpRequest, HttpResponse

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
