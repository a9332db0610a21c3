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
