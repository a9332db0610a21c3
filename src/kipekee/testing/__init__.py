"""Real local servers for tests and demos: SMTP (:mod:`.smtp`) and Mailtrap's HTTP API
(:mod:`.mailtrap`), and a proxy that puts either a round trip away (:mod:`.delay`).

Install with the ``kipekee[testing]`` extra. ``python -m kipekee.testing`` runs the SMTP
capture server; ``python -m kipekee.testing.mailtrap`` runs the Mailtrap one.
"""

from typing import TYPE_CHECKING, Any

from .delay import DelayProxy
from .smtp import Faults, LocalSMTPServer, ReceivedMessage, TLSMode, self_signed_context

if TYPE_CHECKING:
    from .mailtrap import LocalMailtrapServer, MailtrapFaults, MailtrapRequest

__all__ = [
    "DelayProxy",
    "Faults",
    "LocalMailtrapServer",
    "LocalSMTPServer",
    "MailtrapFaults",
    "MailtrapRequest",
    "ReceivedMessage",
    "TLSMode",
    "self_signed_context",
]


def __getattr__(name: str) -> Any:
    # Lazy, so that ``python -m kipekee.testing.mailtrap`` does not find its module
    # already imported by the package.
    if name in {"LocalMailtrapServer", "MailtrapFaults", "MailtrapRequest"}:
        from . import mailtrap

        return getattr(mailtrap, name)
    raise AttributeError(f"module 'kipekee.testing' has no attribute {name!r}")
