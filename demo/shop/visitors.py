"""Who owns an order, a booking or a quote in a demo without accounts: the browser that
made it.

Each visitor gets a random id in its Django session (the session key travels in an
HttpOnly cookie; the id itself stays on the server) the first time it opens a form. The
rows it creates carry that id as ``owner``, and every page and action finds its row by
``(pk, owner)``: another visitor gets 404 whether it counts through the numbers or holds
the exact URL, and ``/market/`` lists only this visitor's orders. Signing in keeps the
id (Django's ``login()`` keeps the session's data under a new key).

A shop with accounts would use the customer instead; one whose customers come back from
another device would add an unguessable link in the confirmation mail. Neither is needed
to show what Kipekee does.
"""

from __future__ import annotations

import secrets
from typing import TypeVar

from django.db import models
from django.http import Http404, HttpRequest

_SESSION_KEY = "visitor"

M = TypeVar("M", bound=models.Model)


def visitor(request: HttpRequest) -> str:
    """This browser's id, made on first use."""
    key = request.session.get(_SESSION_KEY)
    if not key:
        key = request.session[_SESSION_KEY] = secrets.token_urlsafe(24)
    return str(key)


def owned(request: HttpRequest, model: type[M], pk: int) -> M:
    """The ``model`` row ``pk`` if this browser made it; 404 otherwise (the same answer
    as for a row that does not exist: nothing tells a guesser which numbers are taken)."""
    key = request.session.get(_SESSION_KEY)
    row = model._default_manager.filter(pk=pk, owner=key).first() if key else None
    if row is None:
        raise Http404("No such page.")
    return row
