"""Signals sent by :mod:`kipekee.outbox` after each status change is committed to the row.

Every signal is sent with ``sender=OutboxEmail`` and ``email`` (the row, as written).
``sent``, ``deferred``, ``failed`` and ``suppressed`` also carry ``outcome`` (a
:class:`kipekee.delivery.Outcome`: provider, error kind, error text, refused recipients).
"""

from django.dispatch import Signal

queued = Signal()
sent = Signal()
deferred = Signal()
failed = Signal()
cancelled = Signal()
suppressed = Signal()
