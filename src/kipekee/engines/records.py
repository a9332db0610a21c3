"""Writing a sent batch's outcomes, through brief database errors.

What a batch's record says is already true at the provider: the mail went out (or was
refused). Should the database refuse the write for a moment (a restart or failover
ending the session, SQLite's write lock held by a migration or a backup), giving up
would leave the rows ``sending`` until their lease ends and then send them again. So the
record is tried again while the claim is surely still this engine's: for half a lease
from the first failure (the lease keeper renewed it at most a third of a lease before,
and cannot while the database is away). The write is fenced by each claim's token, so a
try whose commit did happen before its acknowledgement was lost changes nothing the
second time. Only errors of the connection or of locking are retried; anything else
(a bug, a constraint) would fail the same way again.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Sequence

from django.db import InterfaceError, OperationalError, connections, transaction

from .. import conf
from ..delivery import Outcome
from ..models import OutboxEmail
from ..recording import record_many

logger = logging.getLogger("kipekee.engines")

_FIRST_WAIT = 0.05
_LONGEST_WAIT = 1.0


def record_batch(rows: Sequence[OutboxEmail], outcomes: Sequence[Outcome], *,
                 engine: str) -> list[bool]:
    """Record ``outcomes`` of the claimed ``rows`` in one transaction; per row, whether
    its result was recorded. Raises the database's error if it lasts past half a lease."""
    db = rows[0]._state.db
    wait, deadline = _FIRST_WAIT, None
    while True:
        # Recording moves the rows in hand (status, claim) as it goes: each try starts
        # from the rows as claimed, and the caller's rows take the outcome of the one
        # that committed.
        trying = [copy.copy(row) for row in rows]
        try:
            with transaction.atomic(using=db):
                recorded = record_many(trying, outcomes)
        except (OperationalError, InterfaceError) as exc:
            now = time.monotonic()
            if deadline is None:
                deadline = now + conf.get().lease.total_seconds() / 2
            if now + wait > deadline:
                raise
            logger.warning("%s: recording %d outcome(s) failed (%s); trying again in %.2f s",
                           engine, len(rows), exc, wait)
            for connection in connections.all(initialized_only=True):
                connection.close_if_unusable_or_obsolete()
            time.sleep(wait)
            wait = min(wait * 2, _LONGEST_WAIT)
            continue
        for row, done in zip(rows, trying, strict=True):
            row.__dict__.update(done.__dict__)
        return recorded
