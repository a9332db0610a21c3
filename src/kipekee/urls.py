"""Kipekee's URLs: ``path("kipekee/", include("kipekee.urls"))`` in your URLconf.

- ``webhooks/<esp>/`` for every ESP anymail supports (``amazon_ses``, ``brevo``,
  ``mailersend``, ``mailgun``, ``mailjet``, ``mailtrap``, ``mandrill``, ``postal``,
  ``postmark``, ``resend``, ``sendgrid``, ``sparkpost``, ``unisender_go``): give the
  provider ``https://user:password@your.host/kipekee/webhooks/<esp>/`` with the
  ``user:password`` of ``KIPEKEE["WEBHOOK_SECRET"]`` (see :mod:`kipekee.webhooks`).
  Named ``kipekee:<esp>_webhook``.
"""

from django.urls import path

from .webhooks import VIEWS

app_name = "kipekee"
urlpatterns = [
    path(f"webhooks/{esp}/", view.as_view(), name=f"{esp}_webhook")  # type: ignore[attr-defined]
    for esp, view in VIEWS.items()
]
