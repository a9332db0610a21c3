"""Leases kept alive while their rows are in hand.

A claimed row belongs to its sender until ``lease_until`` (``LEASE_SECONDS``). A delivery
that takes longer — a slow server, a large attachment, a provider's rate limit to wait
out — would outlive the lease: another engine would take the row and send it again, and
the first one's result would be refused (fenced). So while a sender holds a claim, one
thread per process renews it every third of the lease; the renewal is fenced by the
claim's token, so it never extends a claim another engine has taken since. When the
process dies the renewals stop, and the rows come back after the lease as before.

:class:`kipekee.engines.Sender` holds each batch from its claim until its outcomes are
recorded (or it is given back) and drops whatever it still holds when a drain ends.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable

from django.db import DatabaseError, connections

from .. import conf, outbox
from ..models import OutboxEmail
from ..registries import PerProcess

logger = logging.getLogger("kipekee.engines")


class LeaseKeeper:
    """Renews the leases of the claims held in this process.

    Its thread runs only while something is held, and closes its database connection
    when it stops (a test database, a pooler, must not see an idle session linger).
    """

    def __init__(self) -> None:
        self._held: dict[str, tuple[str, list[int]]] = {}  # claim token -> (db, pks)
        self._lock = threading.Lock()
        self._changed = threading.Event()
        self._thread: threading.Thread | None = None

    def hold(self, rows: Iterable[OutboxEmail]) -> set[str]:
        """Keep the leases of ``rows`` (claimed rows) alive; return their claim tokens."""
        claims: dict[str, tuple[str, list[int]]] = {}
        for row in rows:
            if row.claimed_by:
                db = row._state.db or outbox.db_for_write()
                claims.setdefault(row.claimed_by, (db, []))[1].append(row.pk)
        if claims:
            with self._lock:
                self._held.update(claims)
                if self._thread is None or not self._thread.is_alive():
                    self._thread = threading.Thread(target=self._run, name="kipekee-leases",
                                                    daemon=True)
                    self._thread.start()
        return set(claims)

    def drop(self, tokens: Iterable[str]) -> None:
        """Stop renewing these claims (recorded, given back, or given up)."""
        with self._lock:
            for token in tokens:
                self._held.pop(token, None)
            if not self._held:
                self._changed.set()  # the thread stops now, not after its next wait

    def held(self) -> int:
        with self._lock:
            return len(self._held)

    def join(self, timeout: float | None = None) -> bool:
        """Once nothing is held any more, wait (at most ``timeout`` seconds) for the
        renewal thread to end, a renewal under way included; True when none runs then.

        For an engine that stops: at a normal exit the interpreter shuts down right
        after, and a daemon thread still in a database call is cut off there. While
        claims are still held (another engine of this process) the thread is theirs:
        nothing is waited for.
        """
        with self._lock:
            running = self._thread
            if self._held:
                return running is None or not running.is_alive()
            self._changed.set()  # a thread waiting for its next round ends now
        if running is not None and running is not threading.current_thread():
            running.join(timeout)
        return running is None or not running.is_alive()

    def _run(self) -> None:
        try:
            while True:
                self._changed.wait(conf.get().lease.total_seconds() / 3)
                self._changed.clear()
                with self._lock:
                    claims = dict(self._held)
                    if not claims:
                        self._thread = None
                        return
                self._renew(claims)
        finally:
            connections.close_all()  # this thread's own connection

    def _renew(self, claims: dict[str, tuple[str, list[int]]]) -> None:
        for token, (db, pks) in claims.items():
            try:
                kept = outbox.renew_lease(token, pks, using=db)
            except DatabaseError as exc:
                # The next round tries again; should the database stay away longer than
                # the lease, the rows go to another engine, as they would without renewal.
                logger.warning("Renewing the lease of %d row(s) failed (%s)", len(pks), exc)
                for conn in connections.all(initialized_only=True):
                    conn.close_if_unusable_or_obsolete()
                continue
            if not kept:  # finished or taken over meanwhile: nothing left to keep
                self.drop([token])


_keeper = PerProcess(LeaseKeeper)


def keeper() -> LeaseKeeper:
    """This process's lease keeper (a new one after a fork: threads do not survive it)."""
    return _keeper.get()
