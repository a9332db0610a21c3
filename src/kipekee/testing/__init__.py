"""Real local servers for tests and demos: SMTP (:mod:`.smtp`), and the HTTP APIs of
Mailtrap (:mod:`.mailtrap`), Postmark (:mod:`.postmark`), SendGrid (:mod:`.sendgrid`),
Mailgun (:mod:`.mailgun`) and Amazon SES v2 (:mod:`.amazon_ses`), each following the
ESP's documented contract, with its signed webhooks; and a proxy that puts any of them a
round trip away (:mod:`.delay`).

Install with the ``kipekee[testing]`` extra. ``python -m kipekee.testing`` runs the SMTP
capture server; ``python -m kipekee.testing.mailtrap`` runs the Mailtrap one.
"""

import importlib
from typing import TYPE_CHECKING, Any

from .delay import DelayProxy
from .smtp import Faults, LocalSMTPServer, ReceivedMessage, TLSMode, self_signed_context

if TYPE_CHECKING:
    from .amazon_ses import LocalSESServer
    from .esp import ESPFaults, ESPRequest
    from .mailgun import LocalMailgunServer
    from .mailtrap import LocalMailtrapServer, MailtrapFaults, MailtrapRequest
    from .postmark import LocalPostmarkServer
    from .sendgrid import LocalSendGridServer

__all__ = [
    "DelayProxy",
    "ESPFaults",
    "ESPRequest",
    "Faults",
    "LocalMailgunServer",
    "LocalMailtrapServer",
    "LocalPostmarkServer",
    "LocalSESServer",
    "LocalSMTPServer",
    "LocalSendGridServer",
    "MailtrapFaults",
    "MailtrapRequest",
    "ReceivedMessage",
    "TLSMode",
    "self_signed_context",
]


_LAZY = {
    "LocalMailtrapServer": "mailtrap", "MailtrapFaults": "mailtrap", "MailtrapRequest": "mailtrap",
    "ESPFaults": "esp", "ESPRequest": "esp", "LocalPostmarkServer": "postmark",
    "LocalSendGridServer": "sendgrid", "LocalMailgunServer": "mailgun",
    "LocalSESServer": "amazon_ses",
}


def __getattr__(name: str) -> Any:
    # Lazy, so that ``python -m kipekee.testing.mailtrap`` does not find its module
    # already imported by the package, and the HTTP servers' dependencies (the "esp"
    # extra) are needed only by who uses them.
    if name in _LAZY:
        module = importlib.import_module(f".{_LAZY[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module 'kipekee.testing' has no attribute {name!r}")
