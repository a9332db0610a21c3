"""Real local servers for tests and demos: SMTP (:mod:`.smtp`) and Mailtrap's HTTP API
(:mod:`.mailtrap`).

Install with the ``kipekee[testing]`` extra. ``python -m kipekee.testing`` runs the SMTP
capture server; ``python -m kipekee.testing.mailtrap`` runs the Mailtrap one.
"""

from .mailtrap import LocalMailtrapServer, MailtrapFaults, MailtrapRequest
from .smtp import Faults, LocalSMTPServer, ReceivedMessage, TLSMode, self_signed_context

__all__ = [
    "Faults",
    "LocalMailtrapServer",
    "LocalSMTPServer",
    "MailtrapFaults",
    "MailtrapRequest",
    "ReceivedMessage",
    "TLSMode",
    "self_signed_context",
]
