"""A rate limit per client on the public forms (Django's cache), so they cannot be used
to send mail in bulk."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from django.conf import settings
from django.core.cache import cache
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render


def _limit() -> tuple[int, int]:
    count, seconds = settings.DEMO_RATE_LIMIT.split("/")
    return int(count), int(seconds)


def client_ip(request: HttpRequest) -> str:
    # The demo runs without a proxy in front: REMOTE_ADDR is the client. Behind one, use
    # the address it appends to X-Forwarded-For (never the client-supplied first one).
    return request.META.get("REMOTE_ADDR", "")


def rate_limited(scope: str) -> Callable[[Callable[..., HttpResponse]], Callable[..., HttpResponse]]:
    """Every POST counts (valid or not: bots probe too); past the limit → 429."""

    def decorate(view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
        @functools.wraps(view)
        def wrapped(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
            if request.method == "POST":
                count, seconds = _limit()
                key = f"demo-rate:{scope}:{client_ip(request)}"
                cache.add(key, 0, timeout=seconds)
                if cache.incr(key) > count:
                    return render(request, "shop/rate_limited.html",
                                  {"seconds": seconds, "count": count}, status=429)
            return view(request, *args, **kwargs)

        return wrapped

    return decorate
