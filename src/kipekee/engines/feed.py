"""``Feed``: the claims and the records of one worker process, shared by its senders.

A worker's sender threads used to claim a batch each (and a second one ahead) and record
their own outcomes: a few statements for every ten rows, and at the end of a backlog the
last rows sat in whole batches of some senders while the others were idle. The feed
claims for all of them at once, sized to the free sending slots (``senders ×
batch_size``, less what it already holds), and hands rows out a share at a time: a
sender takes an equal share of what is queued (at most ``batch_size``), so the last rows
spread over every sender; rows of a higher lane go before those of lower lanes queued
earlier. Outcomes are recorded by the feed's recorder thread, everything
finished since its last record in one transaction (one UPDATE per claim): recording
waits on nobody, and nobody waits on it. When the queue runs low the recorder claims ahead,
so senders do not wait for the database between shares.

A claim that finds nothing found nothing due (claims never lose a race): :meth:`take`
returns nothing and the sender goes idle. Rows claimed and not handed out are given back
(``outbox.release``) when the worker stops; leases are renewed while rows are held
(:mod:`kipekee.engines.leases`). A process killed mid-way leaves what it held to the
leases, as before: at most ``senders × batch_size`` rows are sent again.
"""

from __future__ import annotations

import logging
import math
import threading
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

from django.db import connections

from .. import lanes, outbox
from ..delivery import Outcome
from ..models import OutboxEmail
from . import Stats, _drop_broken_connections, leases, no_transaction_left_open
from .records import record_batch

logger = logging.getLogger("kipekee.engines")


class Feed:
    """Claims for ``senders`` sender threads and records what they send."""

    def __init__(self, *, engine: str, senders: int, batch_size: int, stats: Stats,
                 on_rows: Callable[[], None] | None = None) -> None:
        self.engine = engine
        self.senders = senders
        self.batch_size = batch_size
        self.stats = stats
        # Called when a claim brought rows: idle senders may take some.
        self.on_rows = on_rows
        # Rows held at most: queued, being sent and being recorded (a share each for
        # every sender, and as many again ahead).
        self.capacity = 2 * senders * batch_size
        self._queue: deque[OutboxEmail] = deque()
        self._held: dict[str, int] = {}  # claim token -> its rows not yet recorded
        self._lock = threading.Condition()
        self._claiming = False
        self._claims = 0  # claims finished, to tell a sender whether one ran meanwhile
        self._found_nothing = False  # the latest claim found nothing due
        self._tail = False  # the latest claim found fewer rows than it asked for
        self._unrecorded: list[tuple[OutboxEmail, Outcome]] = []
        self._recording: Future[None] | None = None
        # Raised to every sender at its next take, once (then it waits a poll):
        self._record_failed: Exception | None = None
        self._told: set[int] = set()  # the senders (threads) told of it so far
        self._recorder = ThreadPoolExecutor(1, thread_name_prefix="kipekee-recorder")

    # --- senders -----------------------------------------------------------------------

    def take(self, stopping: threading.Event) -> list[OutboxEmail]:
        """Rows for one sender (see :meth:`_share`); claimed first if nothing is queued.
        Empty: nothing is due (or ``stopping``)."""
        with self._lock:
            failed = self._record_failed
            if failed is not None and threading.get_ident() not in self._told:
                # Every sender stops, not only the first to ask (the others would go on
                # sending what cannot be recorded, to be sent again after the lease):
                # the worker's loop logs it and waits a poll before sending more.
                self._told.add(threading.get_ident())
                if len(self._told) >= self.senders:
                    self._record_failed, self._told = None, set()
                raise failed
            seen = self._claims
            while not stopping.is_set():
                if self._queue:
                    rows = self._share()
                    self._claim_ahead()
                    return rows
                if self._claiming or self._free() <= 0:
                    # A claim is under way (its rows, or its "nothing due"), or every slot
                    # is held until the recorder records what was sent.
                    self._lock.wait(1.0)
                    continue
                if self._claims != seen and self._found_nothing:
                    return []  # the claim that ran meanwhile found nothing due
                self._claiming = True
                break
            else:
                return []
        # This sender has nothing to do: it claims itself, outside the lock.
        self._claim()
        with self._lock:
            return self._share()

    def _share(self) -> list[OutboxEmail]:
        """(Under the lock.) One sender's rows: ``batch_size``, or, at the end of a
        backlog (the latest claim found fewer rows than it asked for), an equal share of
        what is left, so that it spreads over every sender."""
        share = self.batch_size
        if self._tail:
            share = min(share, max(1, math.ceil(len(self._queue) / self.senders)))
        return [self._queue.popleft() for _ in range(min(share, len(self._queue)))]

    def done(self, rows: Sequence[OutboxEmail], outcomes: Sequence[Outcome]) -> None:
        """A sender sent ``rows``: their outcomes go to the recorder to be recorded."""
        with self._lock:
            self._unrecorded.extend(zip(rows, outcomes, strict=True))
            if self._recording is None:
                self._recording = self._recorder.submit(self._record)

    def abandon(self, rows: Sequence[OutboxEmail]) -> None:
        """Sending ``rows`` raised: which of them went out is not known, so they are
        neither recorded nor given back; their leases are no longer renewed (they go out
        again when the lease ends)."""
        self._let_go([row.claimed_by for row in rows])

    def recover(self) -> None:
        """After a failure: drop the recorder thread's broken database connections."""
        self._recorder.submit(_drop_broken_connections).result()

    # --- the recorder -------------------------------------------------------------

    def _claim_ahead(self) -> None:
        """(Under the lock.) Claim in the recorder thread when less than a share per sender
        is queued, so senders do not wait for the database between shares (not at the
        end of a backlog: the sender that finds the queue empty claims then)."""
        if (not self._claiming and not self._tail
                and len(self._queue) < self.senders * self.batch_size
                and self._free() >= self.batch_size):
            self._claiming = True
            self._recorder.submit(self._claim)

    def _free(self) -> int:
        return self.capacity - sum(self._held.values())

    def _claim(self) -> None:
        """Claim what the free slots take; queue the rows (``self._claiming`` is set)."""
        rows: list[OutboxEmail] = []
        want = 0
        try:
            with self._lock:
                want = self._free()
            if want > 0:
                no_transaction_left_open(outbox.db_for_write())
                rows = outbox.claim_batch(want, engine=self.engine)
                leases.keeper().hold(rows)
        except Exception:
            logger.exception("%s: claiming rows failed", self.engine)
            raise
        finally:
            with self._lock:
                for row in rows:
                    self._held[row.claimed_by] = self._held.get(row.claimed_by, 0) + 1
                if rows:
                    # Higher lanes first, also before rows of lower lanes claimed earlier:
                    # a sign-in code claimed now is sent before the newsletter queued.
                    order = lanes.planner().order
                    self._queue = deque(sorted([*self._queue, *rows],
                                               key=lambda row: order(row.lane)))
                self._found_nothing = not rows
                self._tail = len(rows) < want
                self._claiming = False
                self._claims += 1
                self._lock.notify_all()
        if rows and self.on_rows is not None:
            self.on_rows()

    def _record(self) -> None:
        """Record everything finished so far, in one transaction; again while more came."""
        while True:
            with self._lock:
                finished, self._unrecorded = self._unrecorded, []
                if not finished:
                    self._recording = None
                    return
            rows = [row for row, _ in finished]
            tokens = [row.claimed_by for row in rows]  # (recording clears them on the rows)
            try:
                no_transaction_left_open(rows[0]._state.db)
                recorded = record_batch(rows, [outcome for _, outcome in finished],
                                        engine=self.engine)
                # The signal receivers ran on this connection as the record committed.
                no_transaction_left_open(rows[0]._state.db)
            except Exception as exc:  # noqa: BLE001 - the rows stay leased, go out again later
                logger.exception("%s: recording %d outcome(s) failed; their rows are sent "
                                 "again when their lease ends", self.engine, len(rows))
                recorded = [False] * len(rows)
                # Nothing more goes out while records fail: what was claimed and not sent
                # goes back now (or, should that fail too, when its lease ends), and the
                # next sender to take is told.
                with self._lock:
                    self._record_failed, self._told = exc, set()
                self._give_back()
            for row, done in zip(rows, recorded, strict=True):
                if done:
                    self.stats.add(row.status)
            self._let_go(tokens)

    def _let_go(self, tokens: Sequence[str]) -> None:
        """These rows are recorded (or given back, or given up): their slots are free,
        and a claim none of whose rows is held any more needs no lease renewed."""
        ended = []
        with self._lock:
            for token in tokens:
                left = self._held.get(token, 0) - 1
                if left > 0:
                    self._held[token] = left
                else:
                    self._held.pop(token, None)
                    ended.append(token)
            self._lock.notify_all()  # slots are free: a sender waiting for them may claim
        if ended:
            leases.keeper().drop(ended)

    def _give_back(self) -> None:
        """Give back the rows claimed and not handed out: due now, their claim not
        counted (``outbox.release``)."""
        with self._lock:
            unsent, self._queue = list(self._queue), deque()
        if not unsent:
            return
        try:
            no_transaction_left_open(unsent[0]._state.db or outbox.db_for_write())
            released = sum(outbox.release(row) for row in unsent)
        except Exception:  # noqa: BLE001 - then they go out again when their lease ends
            logger.exception("%s: giving back %d row(s) failed", self.engine, len(unsent))
            released = 0
        self._let_go([row.claimed_by for row in unsent])
        logger.info("%s: %d row(s) claimed ahead given back unsent", self.engine, released)

    # --- the end -------------------------------------------------------------------------

    def close(self) -> None:
        """Give back what was claimed and not handed out, wait for the records, and stop
        the recorder thread (closing its database connection)."""
        self._give_back()
        with self._lock:
            recording = self._recording
        if recording is not None:
            recording.result()
        self._recorder.submit(connections.close_all).result()
        self._recorder.shutdown()
