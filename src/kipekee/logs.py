"""Structured log lines: one per status change, on the ``kipekee.events`` logger.

Each line reads well as text (``email sent id=12 provider=primary attempt=1
duration_ms=231 …``) and carries the same fields as a dict in ``record.kipekee`` for
JSON formatters (python-json-logger, structlog's stdlib bridge…). Addresses are not
logged, only their count: logs outlive the retention of the outbox.
"""

from __future__ import annotations

import logging
from typing import Any

from . import signals
from .models import OutboxEmail

logger = logging.getLogger("kipekee.events")

_LEVELS = {"queued": logging.INFO, "sent": logging.INFO, "deferred": logging.WARNING,
           "failed": logging.ERROR, "cancelled": logging.INFO, "suppressed": logging.WARNING}


def fields(event: str, email: OutboxEmail, outcome: Any = None) -> dict[str, Any]:
    """The structured fields of one event."""
    data: dict[str, Any] = {
        "event": event, "id": email.pk, "message_id": email.message_id,
        "status": email.status, "mode": email.mode, "attempt": email.attempts,
        "recipients": len(email.to) + len(email.cc) + len(email.bcc),
    }
    if email.template:
        data["template"] = email.template
    if outcome is not None:
        data["provider"] = outcome.provider
        data["duration_ms"] = round(
            (outcome.finished_at - outcome.started_at).total_seconds() * 1000)
        if outcome.kind:
            data["error_kind"] = outcome.kind
        if outcome.code is not None:
            data["code"] = outcome.code
        if outcome.error:
            data["error"] = outcome.error
    if event == "deferred":
        data["due_at"] = email.due_at.isoformat()
    return data


def _format(data: dict[str, Any]) -> str:
    parts = [f"{k}={v!r}" if isinstance(v, str) and (" " in v or not v) else f"{k}={v}"
             for k, v in data.items() if k != "event"]
    return f"email {data['event']} " + " ".join(parts)


def _receiver(event: str) -> Any:
    def receive(sender: type, *, email: OutboxEmail, outcome: Any = None, **kwargs: Any) -> None:
        level = _LEVELS[event]
        if logger.isEnabledFor(level):
            data = fields(event, email, outcome)
            logger.log(level, "%s", _format(data), extra={"kipekee": data})

    receive.__name__ = f"log_{event}"
    return receive


_receivers = {name: _receiver(name) for name in _LEVELS}


def connect() -> None:
    """Connect the log receivers (done once by the app's ``ready()``)."""
    for name, receive in _receivers.items():
        signal = getattr(signals, name, None)  # "suppressed" comes with the suppression list
        if signal is not None:
            signal.connect(receive, dispatch_uid=f"kipekee.logs.{name}")
