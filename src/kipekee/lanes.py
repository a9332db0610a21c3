"""Lanes: which queue of the outbox the next claimed rows come from.

Each outbox row waits in a lane (``transactional`` unless told otherwise, ``bulk`` for
``kipekee.send_many``; more in ``KIPEKEE["LANES"]``). A claim of ``n`` rows takes them
lane by lane, the highest priority first, so a sign-in code never waits behind a
newsletter; a lane's ``SHARE`` of every claim is set aside for it first, so a lower
lane is slowed by busy higher ones but never starved; a lane's ``RATE`` caps the rows
claimed from it per window.

:class:`Planner` holds that state for one process (its engines' threads share it): the
share each lane is owed and the rows its rate window still allows.
:func:`kipekee.outbox.claim_batch` asks it for a plan and tells it what each lane gave.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass

from . import conf, limits
from .limits import SlidingWindow


@dataclass(frozen=True)
class Ask:
    """One step of a claim: up to ``count`` rows from ``lane``."""

    lane: str
    count: int


class Planner:
    """The lanes of one process: their order, the shares owed to them, their rates."""

    def __init__(self, lanes: Sequence[conf.LaneConfig]) -> None:
        self.lanes = tuple(lanes)  # highest priority first
        self.priority = {lane.name: index for index, lane in enumerate(self.lanes)}
        self._windows: dict[str, SlidingWindow] = {
            lane.name: limits.for_lane(lane.name, lane.rate) for lane in self.lanes if lane.rate}
        self._owed = {lane.name: 0.0 for lane in self.lanes if lane.share}
        self._lock = threading.Lock()

    def plan(self, slots: int) -> list[Ask]:
        """What to claim for ``slots`` free sending slots, in order: each lane's owed
        share first, then every lane by priority (each step takes what the earlier ones
        left). Pass each step's result to :meth:`took`."""
        asks: list[Ask] = []
        with self._lock:
            for lane in self.lanes:
                if lane.name in self._owed:
                    self._owed[lane.name] += slots * lane.share
                    owed = min(slots, math.floor(self._owed[lane.name]))
                    if owed:
                        asks.append(Ask(lane.name, owed))
        return asks + [Ask(lane.name, slots) for lane in self.lanes]

    def allow(self, lane: str, count: int) -> int:
        """How many of ``count`` rows ``lane``'s rate lets this claim take (taken from its
        window now; :meth:`took` returns what was not claimed)."""
        window = self._windows.get(lane)
        return count if window is None else window.take(count)

    def took(self, lane: str, allowed: int, claimed: int) -> None:
        """``claimed`` rows came from ``lane``, which was allowed ``allowed``."""
        window = self._windows.get(lane)
        if window is not None and claimed < allowed:
            window.give_back(allowed - claimed)
        with self._lock:
            if lane in self._owed:
                # What a lane got counts against its share; an empty lane is owed nothing
                # (no burst of "owed" rows when it fills again).
                owed = self._owed[lane] - claimed
                self._owed[lane] = 0.0 if claimed < allowed else max(0.0, owed)

    def rate_wait(self) -> float:
        """Seconds until a rate-limited lane may be claimed from again (0: none waits)."""
        return min((w.free_in() for w in self._windows.values()), default=0.0)

    def order(self, lane: str) -> int:
        """Sort key of a lane: its rank by priority (unknown lanes last)."""
        return self.priority.get(lane, len(self.lanes))


_planner: Planner | None = None
_planned_for: conf.KipekeeSettings | None = None
_guard = threading.Lock()


def planner() -> Planner:
    """This process's planner, for the settings in force (a new one when they change)."""
    global _planner, _planned_for
    settings = conf.get()
    with _guard:
        if _planner is None or _planned_for is not settings:
            _planner, _planned_for = Planner(settings.lanes), settings
        return _planner
