"""Kipekee's URLs: ``path("kipekee/", include("kipekee.urls"))`` in your URLconf.

- ``webhooks/mailtrap/``: give Mailtrap ``https://user:password@your.host/kipekee/webhooks/mailtrap/``
  with the ``user:password`` of ``KIPEKEE["WEBHOOK_SECRET"]`` (needs the ``mailtrap`` extra).
"""

from django.urls import path

from .views import MailtrapTrackingWebhookView

app_name = "kipekee"
urlpatterns = [
    path("webhooks/mailtrap/", MailtrapTrackingWebhookView.as_view(), name="mailtrap_webhook"),
]
