"""Signals sent by :mod:`kipekee.outbox` after each status change is written to the row.

Every signal is sent with ``sender=OutboxEmail`` and these keyword arguments:

``queued``
    ``email``: the new row (status ``queued``), sent right after the INSERT — inside the
    caller's transaction, which may still roll back. Also sent for a person's resend
    (``email.metadata["resent_from"]`` is the original's id).
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

Receivers run in the thread that changed the row (a request, an engine). An exception
in a receiver propagates, as with any Django signal: keep receivers small.
"""

from django.dispatch import Signal

queued = Signal()
sent = Signal()
deferred = Signal()
failed = Signal()
cancelled = Signal()
suppressed = Signal()
