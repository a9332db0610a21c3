"""Signals sent by :mod:`kipekee.outbox` after each status change is written to the row.

Every signal is sent once the change it announces is committed (at once when no
transaction is open; a rolled-back change is never announced), with
``sender=OutboxEmail`` and these keyword arguments:

``queued``
    ``email``: the new row (status ``queued``), once the caller's transaction that wrote
    it commits. Also sent for a person's resend (``email.metadata["resent_from"]`` is
    the original's id) and for the follow-up row of recipients refused for now
    (``email.metadata["recipients_of"]``).
``sent``
    ``email`` (status ``sent``, ``sent_by`` is the provider alias) and ``outcome``, a
    :class:`kipekee.delivery.Outcome`: ``provider``, ``started_at``/``finished_at`` of the
    attempt, ``refused`` recipients (address → reply) the provider turned down while
    accepting the others, and in ``error`` why earlier providers were passed over.
``deferred``
    ``email`` (status ``deferred``, ``due_at`` is the next try) and ``outcome`` (``kind``
    is ``transient``; ``error``, ``code``, ``retry_after``).
``failed``
    ``email`` (status ``failed``) and ``outcome`` (``kind`` is ``permanent`` or
    ``configuration``, or ``transient`` when attempts ran out).
``suppressed``
    ``email`` (status ``suppressed``) and ``outcome`` (``refused`` names the suppressed
    recipients and why): every recipient is on the suppression list, nothing was sent.
``cancelled``
    ``email`` (status ``cancelled``), cancelled by a person.

Mailing lists (:mod:`kipekee.lists`) send two more, with ``sender=MailingList``:

``unsubscribed``
    ``mailing_list`` (the :class:`~kipekee.models.MailingList`), ``address`` (canonical)
    and ``source`` (``"one-click"``, ``"page"``, ``"mailto"``, ``"admin"``, ``"code"``):
    the address left the list. Not sent again for an address that had already left.
``resubscribed``
    the same arguments: the address came back (the unsubscribe page's way back, the
    admin, :func:`kipekee.lists.resubscribe`).

Receivers run in the thread that changed the row (a request, an engine), outside any
transaction of Kipekee's. A receiver cannot change what Kipekee recorded: what it raises
is logged (``kipekee.signals`` logger, with the traceback) and goes no further — not
into the engine, not into the caller's ``send()``, and the other receivers still run.
A project that mails its errors through Kipekee (Django's ``AdminEmailHandler`` with the
drop-in backend) gets the report of such an error by mail; the error of a receiver about
that report is logged and not mailed again (a mail loop: ``kipekee.exceptions.MailLoop``).
Keep receivers small: an engine waits for them before its next batch.
"""

from __future__ import annotations

import logging
import sys
import threading
from functools import partial
from typing import Any

from django.db import transaction
from django.dispatch import Signal

logger = logging.getLogger("kipekee.signals")

queued = Signal()
sent = Signal()
deferred = Signal()
failed = Signal()
cancelled = Signal()
suppressed = Signal()
unsubscribed = Signal()
resubscribed = Signal()

_NAMES = {id(signal): name for name, signal in (
    ("queued", queued), ("sent", sent), ("deferred", deferred), ("failed", failed),
    ("cancelled", cancelled), ("suppressed", suppressed), ("unsubscribed", unsubscribed),
    ("resubscribed", resubscribed))}


def send_on_commit(signal: Signal, *, using: str, sender: type, **kwargs: Any) -> None:
    """Send ``signal`` when the current transaction on ``using`` commits (now, outside
    one) to every receiver; log what a receiver raises instead of raising it.

    Kipekee's own code sends its signals only through here: a receiver's error inside
    the transaction that records an outcome would undo the record (and the row would be
    sent again and again), and raised after a commit it would skip the application's
    later on_commit hooks.
    """
    transaction.on_commit(partial(_send_robust, signal, sender, kwargs), using=using)


#: ``metadata`` key of a mail written while a receiver's error was being logged (the
#: report, by the drop-in backend): how deep in a chain of such reports it is.
REPORT_DEPTH = "kipekee_error_report"

_reporting = threading.local()


def report_depth() -> int:
    """While a receiver's error is being reported in this thread (logged by Django's
    ``Signal.send_robust``, inside its ``except``, or by Kipekee below): 1 if it is about
    an ordinary mail, 2 if about a mail that itself reports such an error, …; else 0.

    The drop-in backend writes the depth on the mails it is given meanwhile (an
    ``AdminEmailHandler``'s report) and refuses them from depth 2 on: each report's
    delivery would raise again, a mail loop."""
    depth = int(getattr(_reporting, "depth", 0))
    if not depth:
        return 0
    if getattr(_reporting, "logging", False) or sys.exc_info()[1] is not None:
        return depth
    return 0


def _send_robust(signal: Signal, sender: type, kwargs: dict[str, Any]) -> None:
    email = kwargs.get("email")
    metadata = getattr(email, "metadata", None) or {}
    before = getattr(_reporting, "depth", 0)
    _reporting.depth = int(metadata.get(REPORT_DEPTH, 0)) + 1
    try:
        for receiver, result in signal.send_robust(sender=sender, **kwargs):
            if isinstance(result, Exception):
                about = (f"outbox email {email.pk}" if email is not None
                         else f"list {getattr(kwargs.get('mailing_list'), 'key', '?')}")
                _reporting.logging = True
                try:
                    logger.error(
                        "A receiver of kipekee.signals.%s (%s) raised for %s; what Kipekee "
                        "recorded stands.", _NAMES.get(id(signal), "?"),
                        getattr(receiver, "__qualname__", receiver), about, exc_info=result)
                finally:
                    _reporting.logging = False
    finally:
        _reporting.depth = before
