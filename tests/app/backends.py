"""A provider backend that relays through ``django.core.mail``'s default connection — a
realistic misconfiguration that loops back into Kipekee when Kipekee is EMAIL_BACKEND."""

from django.core import mail
from django.core.mail.backends.base import BaseEmailBackend


class RelayToDefault(BaseEmailBackend):
    def send_messages(self, email_messages):
        return mail.get_connection().send_messages(email_messages)


from kipekee.backend import EmailBackend as DropIn  # noqa: E402


class LoopingBackend(DropIn):
    """Kipekee's drop-in under another name: as a provider it would enqueue forever."""


class TokenBackend(BaseEmailBackend):
    """An HTTP-API-like backend that can check its token without sending."""

    def __init__(self, *, token: str = "", **kwargs):
        super().__init__(**kwargs)
        self.token = token

    def check_connection(self) -> str:
        from django.core.exceptions import ImproperlyConfigured

        if self.token != "good":
            raise ImproperlyConfigured("API token rejected (401)")
        return "API token valid"

    def send_messages(self, email_messages):
        raise AssertionError("a connection check must not send")
