"""Kipekee: dependable transactional email for Django.

Every email is written to a durable outbox in your database, in the same transaction as
the business event, then delivered right away or by an engine, with retries and failover.
"""

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["Email", "Receipt", "asend", "notify", "notify_many", "send", "send_many"]

if TYPE_CHECKING:
    from .compose import Email, asend, send, send_many
    from .dispatch import Receipt
    from .notifications import notify, notify_many


def __getattr__(name: str) -> Any:
    # Lazy, so that ``import kipekee`` works before Django's app registry is ready
    # (settings files, INSTALLED_APPS).
    if name in {"Email", "asend", "send", "send_many"}:
        from . import compose

        return getattr(compose, name)
    if name in {"notify", "notify_many"}:
        from . import notifications

        return getattr(notifications, name)
    if name == "Receipt":
        from .dispatch import Receipt

        return Receipt
    raise AttributeError(f"module 'kipekee' has no attribute {name!r}")
