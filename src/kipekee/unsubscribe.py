"""The unsubscribe endpoint that list mail links to (``kipekee.urls``: ``unsubscribe/<token>/``).

One URL, three callers:

- **a mailbox provider's one-click POST** (RFC 8058): body ``List-Unsubscribe=One-Click``
  (multipart/form-data or urlencoded), sent without cookies, authorization or a CSRF
  token. The address leaves the list; the answer is ``200`` every time (idempotent).
  The signed token is the only credential, so the view is exempt from CSRF checks, as
  the RFC requires;
- **a person following the link** (GET): a page naming the list and the address, with a
  button. A GET never unsubscribes: link scanners and previews fetch every link in a
  mail (RFC 8058 section 1). The button POSTs ``action=unsubscribe``; the page that
  follows confirms it and offers the way back (``action=resubscribe``);
- anything else with a token that was altered, signed with another key or has expired
  gets ``400`` and changes nothing; a list deleted since gets ``404``.

The page is ``kipekee/unsubscribe.html``: override it in your templates to match your
site. It sets no cookie, is not cached, and sends no ``Referer`` onwards (the link is a
credential).
"""

from __future__ import annotations

from typing import Any

from django.http import HttpRequest, HttpResponse, HttpResponseRedirect, QueryDict
from django.http.response import HttpResponseBase
from django.template.loader import render_to_string
from django.utils.decorators import method_decorator
from django.views import View
from django.views.decorators.csrf import csrf_exempt

from . import lists
from .exceptions import InvalidToken
from .models import MailingList, UnsubscribeSource, Unsubscription

TEMPLATE = "kipekee/unsubscribe.html"


def is_one_click(request: HttpRequest) -> bool:
    """The request body is RFC 8058's ``List-Unsubscribe=One-Click``: parsed by Django
    for form content types, read as urlencoded for a sender that labels it otherwise."""
    if request.POST.get("List-Unsubscribe") == "One-Click":
        return True
    if request.content_type in ("application/x-www-form-urlencoded", "multipart/form-data"):
        return False
    body = QueryDict(request.body[:1024], encoding="utf-8")
    return body.get("List-Unsubscribe") == "One-Click"


@method_decorator(csrf_exempt, name="dispatch")
class UnsubscribeView(View):
    http_method_names = ["get", "head", "post"]

    def dispatch(self, request: HttpRequest, *args: Any, token: str = "",
                 **kwargs: Any) -> HttpResponseBase:
        try:
            wanted = lists.read_token(token)
        except InvalidToken as exc:
            return self.answer(request, status=400, error=str(exc))
        mailing_list = MailingList.objects.filter(key=wanted.mailing_list).first()
        if mailing_list is None:
            return self.answer(request, status=404,
                               error="This mailing list no longer exists: it sends nothing.")
        return super().dispatch(request, wanted, mailing_list)

    def get(self, request: HttpRequest, wanted: lists.Subscription,
            mailing_list: MailingList) -> HttpResponse:
        return self.answer(request, wanted=wanted, mailing_list=mailing_list)

    def post(self, request: HttpRequest, wanted: lists.Subscription,
             mailing_list: MailingList) -> HttpResponse:
        if is_one_click(request):
            lists.unsubscribe(mailing_list.key, wanted.address, source=UnsubscribeSource.ONE_CLICK)
            return _private(HttpResponse(f"Unsubscribed from {mailing_list.name}.\n",
                                         content_type="text/plain; charset=utf-8"))
        action = request.POST.get("action")
        if action == "unsubscribe":
            lists.unsubscribe(mailing_list.key, wanted.address, source=UnsubscribeSource.PAGE)
        elif action == "resubscribe":
            lists.resubscribe(mailing_list.key, wanted.address, source=UnsubscribeSource.PAGE)
        else:
            return self.answer(request, status=400, error=(
                "Nothing to do: a one-click unsubscribe POSTs List-Unsubscribe=One-Click."))
        # Post/redirect/get: a reload does not post again.
        return _private(HttpResponseRedirect(f"{request.path}?done={action}", status=303))

    def answer(self, request: HttpRequest, *, status: int = 200, error: str = "",
               wanted: lists.Subscription | None = None,
               mailing_list: MailingList | None = None) -> HttpResponse:
        """The page (for people) or a line of text (for a one-click POST)."""
        if request.method == "POST" and error:
            return _private(HttpResponse(error + "\n", status=status,
                                         content_type="text/plain; charset=utf-8"))
        left = wanted is not None and mailing_list is not None and Unsubscription.objects.filter(
            mailing_list=mailing_list, address=wanted.address).exists()
        page = render_to_string(TEMPLATE, {
            "error": error, "mailing_list": mailing_list,
            "address": wanted.address if wanted else "", "unsubscribed": left,
            "done": request.GET.get("done", ""), "action_url": request.path,
        }, request=request)
        return _private(HttpResponse(page, status=status))


def _private(response: HttpResponse) -> HttpResponse:
    response["Cache-Control"] = "no-store"
    response["Referrer-Policy"] = "no-referrer"
    response["X-Robots-Tag"] = "noindex"
    return response


view = UnsubscribeView.as_view()
