"""Kipekee's URLs: ``path("kipekee/", include("kipekee.urls"))`` in your URLconf.

- ``webhooks/<esp>/`` (with django-anymail installed) for every ESP anymail supports
  (``amazon_ses``, ``brevo``, ``mailersend``, ``mailgun``, ``mailjet``, ``mailtrap``,
  ``mandrill``, ``postal``, ``postmark``, ``resend``, ``sendgrid``, ``sparkpost``,
  ``unisender_go``): give the provider
  ``https://user:password@your.host/kipekee/webhooks/<esp>/`` with the ``user:password``
  of ``KIPEKEE["WEBHOOK_SECRET"]`` (see :mod:`kipekee.webhooks`).
  Named ``kipekee:<esp>_webhook``.
- ``unsubscribe/<token>/``: the one-click unsubscribe endpoint and page that list mail
  links to (:mod:`kipekee.unsubscribe`). Named ``kipekee:unsubscribe``.
"""

import importlib.util
from typing import Any

from django.urls import path

from . import unsubscribe

VIEWS: dict[str, Any] = {}
if importlib.util.find_spec("anymail") is not None:
    # The webhooks are anymail's views: with the extra only (the unsubscribe link works
    # without it).
    from .webhooks import VIEWS

app_name = "kipekee"
urlpatterns = [
    path(f"webhooks/{esp}/", view.as_view(), name=f"{esp}_webhook")
    for esp, view in VIEWS.items()
] + [
    path("unsubscribe/<str:token>/", unsubscribe.view, name="unsubscribe"),
]
