"""Views of the test app: what a project's own views would do with Kipekee."""

from __future__ import annotations

from django.http import HttpRequest, JsonResponse

import kipekee


async def async_signup(request: HttpRequest) -> JsonResponse:
    """An async view (ASGI) that sends a confirmation and answers with its receipt."""
    receipt = await kipekee.asend(subject="Welcome", text="You are in.",
                                  to=request.POST["to"])
    return JsonResponse({"id": receipt.id, "message_id": receipt.message_id,
                         "status": receipt.status, "provider": receipt.provider})
