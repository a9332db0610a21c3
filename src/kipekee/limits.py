"""Per-provider limits, shared by every process and host: calls per time window (rates,
daily quotas) and connections open at once.

Configured next to the backend::

    "ses": {"BACKEND": "...", "OPTIONS": {...},
            "LIMITS": {"RATE": ["14/s", "50000/d"], "CONCURRENCY": 10}}

``RATE`` (one window or a list of them) counts calls into the provider (one
``send_messages`` call, or one batch request) in a moving window: at most ``count`` in
any ``per`` seconds. ``CONCURRENCY`` bounds the connections open to the provider at once,
in use or idle (Mailtrap allows 10 SMTP connections); the connection pool asks for a
permit before it opens one (:mod:`kipekee.connections`).

Both hold across every process and host that shares the store, ``KIPEKEE["LIMITER"]``:

- ``"database"`` (the default): the outbox's own database (SQLite or PostgreSQL), no
  extra service. A take locks the limit's :class:`~kipekee.models.LimiterKey` row, so
  takers go one at a time.
- ``"redis"``: a Redis server (``LOCATION``), for many hosts and high rates.
- ``"process"``: each process on its own (the old behaviour; for tests and one process).

Why not a library. ``limits`` (a moving window on Redis, memory…) and
``pyrate-limiter`` (SQLite, PostgreSQL and Redis buckets) both answer one question, "is
there a slot *now*?", so a sender that must wait polls: every waiter wakes when the
oldest call leaves the window, one of them wins and the others ask again (with 16 sender
threads at 20 messages/s, hundreds of queries a second that find nothing; an earlier
version of this module on ``limits``' moving window did exactly that).
Here a caller *books* the next free slot, possibly in the future, in one atomic step
(one transaction, or one Lua script), and sleeps until it: no waiter asks twice.
``pyrate-limiter``'s SQL buckets also open their own connections (a SQLite file of their
own, a psycopg pool) rather than the project's database. Neither has a shared semaphore
for connections, so the permits are Kipekee's too: a row (or a Redis sorted-set member)
per open connection, with a lease renewed while the connection is open, so a process
that dies frees its permits within ``PERMIT_LEASE_SECONDS``.

A limit reached never fails a mail: a send waits for a free slot when it frees soon
(an engine up to ``MAX_WAIT_SECONDS``, a request up to half its remaining time budget),
otherwise the mail is deferred to when the slot frees, without being charged an attempt
(:class:`RateLimited`). A store that cannot be reached (Redis down, the migration not
applied) is no reason to stop mail: limits fall back to each process's own, with one
warning per outage on the ``kipekee.limits`` logger, and go back to the store once it
answers again.

A lane's ``RATE`` (``KIPEKEE["LANES"]``) counts the rows claimed from it per process
(:func:`for_lane`): it paces claims, the provider's limits protect the provider.
"""

from __future__ import annotations

import bisect
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from django.db import DatabaseError, router, transaction
from django.db.models import F

from . import conf
from .conf import Rate
from .models import LimiterHit, LimiterKey, ProviderPermit

logger = logging.getLogger("kipekee.limits")

class LocalLimit(Exception):
    """A limit of this deployment on provider ``alias`` (``LIMITS``) holds the mail back:
    not a provider failure, so no circuit breaker counts it."""

    def __init__(self, alias: str, message: str) -> None:
        self.alias = alias
        super().__init__(message)


class RateLimited(LocalLimit):
    """A provider's ``LIMITS["RATE"]`` has no free slot for ``wait`` seconds: the mail is
    deferred until then, uncharged."""

    def __init__(self, alias: str, rate: Rate, wait: float) -> None:
        self.rate, self.wait = rate, wait
        super().__init__(alias, f"rate limit of provider {alias!r} reached ({rate.count} "
                         f"per {rate.per:g} s, LIMITS['RATE']); next free slot in {wait:.1f} s")


# -- the stores ------------------------------------------------------------------------


class Store(Protocol):
    """Where shared limits live (see the module docstring)."""

    name: str

    def book(self, keys: Sequence[tuple[str, Rate]], max_wait: float,
             member: str) -> tuple[float, float]:
        """Book the earliest moment, at most ``max_wait`` seconds from now, at which every
        window ``(key, rate)`` has a free slot, as call ``member``; return how far away it
        is (0: now) and the moment itself. When it is further than ``max_wait``, book
        nothing and return how far it is."""
        ...

    def finished(self, keys: Sequence[tuple[str, Rate]], member: str, start: float,
                 end: float) -> None:
        """Call ``member``, booked at ``start``, ended at ``end``: count it from then on.

        A provider counts a call when it arrives, somewhere between its booking and its
        end; counted from the end, a window never holds more than its count of arrivals
        (counted from the booking, a call that travels longer than the next one does not).
        """
        ...

    def take_permit(self, key: str, limit: int, holder: str, lease: float) -> bool:
        """Count ``holder`` as one of at most ``limit`` holders of ``key`` until
        ``lease`` seconds from now (a holder that already holds it: renewed)."""
        ...

    def renew_permits(self, key: str, holders: Sequence[str], lease: float) -> set[str]:
        """Extend the leases of ``holders``; return those that had lost theirs."""
        ...

    def return_permit(self, key: str, holder: str) -> None: ...

    def want(self, key: str, seconds: float, by: str) -> None:
        """Say that process ``by`` waits for a permit of ``key`` (for ``seconds``)."""
        ...

    def wanted(self, key: str, by: str) -> bool:
        """Whether a process other than ``by`` waits for a permit of ``key``."""
        ...


def earliest(newest: Sequence[float], rate: Rate, now: float) -> float:
    """The earliest free slot of a window whose newest calls (booked slots included,
    newest first, at least ``rate.count`` of them when there are) are ``newest``."""
    if len(newest) < rate.count:
        return now
    # The slot frees when the count-th newest call leaves the window.
    return max(now, newest[rate.count - 1] + rate.per)


class ProcessStore:
    """Limits of this process alone (``LIMITER "process"``, and the fallback)."""

    name = "process"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._calls: dict[str, list[float]] = {}  # sorted, oldest first
        self._permits: dict[str, dict[str, float]] = {}

    def book(self, keys: Sequence[tuple[str, Rate]], max_wait: float,
             member: str) -> tuple[float, float]:
        with self._lock:
            now = time.time()
            start = now
            for key, rate in keys:
                calls = self._calls.setdefault(key, [])
                del calls[:bisect.bisect_right(calls, now - rate.per)]
                start = max(start, earliest(calls[::-1][:rate.count], rate, now))
            if start - now <= max_wait:
                for key, _ in keys:
                    bisect.insort(self._calls[key], start)
            return start - now, start

    def finished(self, keys: Sequence[tuple[str, Rate]], member: str, start: float,
                 end: float) -> None:
        with self._lock:
            for key, _ in keys:
                calls = self._calls.get(key, [])
                index = bisect.bisect_left(calls, start)
                if index < len(calls) and calls[index] == start:
                    del calls[index]
                    bisect.insort(calls, max(start, end))

    def take_permit(self, key: str, limit: int, holder: str, lease: float) -> bool:
        now = time.time()
        with self._lock:
            held = self._permits.setdefault(key, {})
            for other, until in list(held.items()):
                if until < now:
                    del held[other]
            if holder in held or len(held) < limit:
                held[holder] = now + lease
                return True
            return False

    def renew_permits(self, key: str, holders: Sequence[str], lease: float) -> set[str]:
        now = time.time()
        with self._lock:
            held = self._permits.setdefault(key, {})
            lost = {h for h in holders if h not in held}
            for h in holders:
                if h in held:
                    held[h] = now + lease
            return lost

    def return_permit(self, key: str, holder: str) -> None:
        with self._lock:
            self._permits.get(key, {}).pop(holder, None)

    def want(self, key: str, seconds: float, by: str) -> None:
        pass  # one process: its own waiters take its idle connections

    def wanted(self, key: str, by: str) -> bool:
        return False


def lock_key(db: str, key: str) -> None:
    """Lock ``key``'s :class:`~kipekee.models.LimiterKey` row for the rest of the
    transaction (made on first use)."""
    rows = LimiterKey.objects.using(db).filter(key=key)
    if not rows.update(takes=F("takes") + 1):
        LimiterKey.objects.using(db).bulk_create([LimiterKey(key=key)], ignore_conflicts=True)
        rows.update(takes=F("takes") + 1)


class DatabaseStore:
    """Shared limits in the outbox's database (``LIMITER "database"``): a
    :class:`~kipekee.models.LimiterHit` row per call (or booked slot).

    A booking runs in one short transaction that first locks each window's
    :class:`~kipekee.models.LimiterKey` row (an UPDATE: the row lock on PostgreSQL, the
    write lock on SQLite), so two processes never book the same slot. Times are
    ``time.time()`` of the booking host: keep the hosts' clocks in sync (NTP).
    """

    name = "database"

    def _db(self) -> str:
        return router.db_for_write(LimiterHit)

    def book(self, keys: Sequence[tuple[str, Rate]], max_wait: float,
             member: str) -> tuple[float, float]:
        db = self._db()
        hits = LimiterHit.objects.using(db)
        with transaction.atomic(using=db):
            for key, _ in sorted(keys, key=lambda k: k[0]):  # one order: no deadlock
                lock_key(db, key)
            now = time.time()
            start = now
            for key, rate in keys:
                newest = list(hits.filter(key=key).order_by("-at")
                              .values_list("at", flat=True)[rate.count - 1:rate.count])
                if newest:
                    start = max(start, newest[0] + rate.per)
            if start - now > max_wait:
                return start - now, start
            for key, rate in keys:
                hits.filter(key=key, at__lte=now - rate.per).delete()
            hits.bulk_create([LimiterHit(key=key, at=start) for key, _ in keys])
            return start - now, start

    def finished(self, keys: Sequence[tuple[str, Rate]], member: str, start: float,
                 end: float) -> None:
        # The hit is found by its time (a float written by this process): another
        # booking at the very same instant would be moved instead, later, never earlier.
        LimiterHit.objects.using(self._db()).filter(
            key__in=[key for key, _ in keys], at=start).update(at=max(start, end))

    def take_permit(self, key: str, limit: int, holder: str, lease: float) -> bool:
        db = self._db()
        permits = ProviderPermit.objects.using(db).filter(key=key)
        if (not permits.filter(holder=holder).exists()
                and permits.filter(lease_until__gte=time.time()).count() >= limit):
            # All out: said by a read, which takes no lock. Waiting takers ask again and
            # again; on SQLite a write each time would queue them behind one another.
            return False
        with transaction.atomic(using=db):
            lock_key(db, key)
            now = time.time()
            permits.filter(lease_until__lt=now).delete()
            if permits.filter(holder=holder).update(lease_until=now + lease):
                return True
            if permits.count() >= limit:
                return False
            ProviderPermit.objects.using(db).create(key=key, holder=holder,
                                                    lease_until=now + lease)
            return True

    def renew_permits(self, key: str, holders: Sequence[str], lease: float) -> set[str]:
        now = time.time()
        permits = ProviderPermit.objects.using(self._db()).filter(
            key=key, holder__in=list(holders), lease_until__gte=now)
        kept = set(permits.values_list("holder", flat=True))
        permits.update(lease_until=now + lease)
        return set(holders) - kept

    def return_permit(self, key: str, holder: str) -> None:
        ProviderPermit.objects.using(self._db()).filter(key=key, holder=holder).delete()

    def want(self, key: str, seconds: float, by: str) -> None:
        db = self._db()
        rows = LimiterKey.objects.using(db).filter(key=key)
        if not rows.update(wanted_until=time.time() + seconds, wanted_by=by):
            LimiterKey.objects.using(db).bulk_create([LimiterKey(key=key)],
                                                     ignore_conflicts=True)
            rows.update(wanted_until=time.time() + seconds, wanted_by=by)

    def wanted(self, key: str, by: str) -> bool:
        return LimiterKey.objects.using(self._db()).filter(
            key=key, wanted_until__gt=time.time()).exclude(wanted_by=by).exists()


# KEYS: one sorted set per window (member: a unique id, score: the call's time);
# ARGV: now, max wait, member, then count and seconds of each window. Returns the wait
# as a string (Lua numbers lose their fraction on the way out), "-" first when nothing
# was booked.
_BOOK = """
local now, max_wait, member = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
local start = now
for i, key in ipairs(KEYS) do
    local count, per = tonumber(ARGV[2 + 2 * i]), tonumber(ARGV[3 + 2 * i])
    redis.call('zremrangebyscore', key, '-inf', now - per)
    if redis.call('zcard', key) >= count then
        local nth = redis.call('zrevrange', key, count - 1, count - 1, 'WITHSCORES')
        local free = tonumber(nth[2]) + per
        if free > start then start = free end
    end
end
if start - now > max_wait then
    return '-' .. tostring(start - now)
end
for i, key in ipairs(KEYS) do
    local per = tonumber(ARGV[3 + 2 * i])
    redis.call('zadd', key, start, member)
    redis.call('expire', key, math.ceil(start - now + per) + 1)
end
return tostring(start - now)
"""
# KEYS: the windows the call was booked in; ARGV: member, end, then seconds of each
# window. The call counts from its end (XX: only if still there; GT: never earlier).
_FINISHED = """
for i, key in ipairs(KEYS) do
    local per = tonumber(ARGV[2 + i])
    redis.call('zadd', key, 'XX', 'GT', ARGV[2], ARGV[1])
    redis.call('expire', key, math.ceil(per) + 1)
end
return 1
"""
# KEYS[1] the permits' sorted set (member: holder, score: lease end); ARGV: now, limit,
# holder, lease end, seconds to keep the set.
_TAKE_PERMIT = """
redis.call('zremrangebyscore', KEYS[1], '-inf', ARGV[1])
if redis.call('zscore', KEYS[1], ARGV[3]) or redis.call('zcard', KEYS[1]) < tonumber(ARGV[2]) then
    redis.call('zadd', KEYS[1], ARGV[4], ARGV[3])
    redis.call('expire', KEYS[1], ARGV[5])
    return 1
end
return 0
"""
# KEYS[1] as above; ARGV: now, lease end, holders...: the lost ones come back.
_RENEW_PERMITS = """
local lost = {}
for i = 3, #ARGV do
    local score = redis.call('zscore', KEYS[1], ARGV[i])
    if score and tonumber(score) >= tonumber(ARGV[1]) then
        redis.call('zadd', KEYS[1], ARGV[2], ARGV[i])
    else
        table.insert(lost, ARGV[i])
    end
end
return lost
"""


class RedisStore:
    """Shared limits in Redis (``LIMITER "redis"``): a sorted set per rate window and
    per provider's permits, changed by Lua scripts (atomic on the server)."""

    name = "redis"

    def __init__(self, location: str, prefix: str) -> None:
        import redis  # noqa: PLC0415 - the optional redis extra

        # Short timeouts: a Redis that is down must cost a send a second at most, not
        # the client's default of waiting for TCP.
        self._redis = redis.Redis.from_url(location, socket_timeout=1.0,
                                           socket_connect_timeout=1.0)
        self.prefix = prefix
        self._book = self._redis.register_script(_BOOK)
        self._finished = self._redis.register_script(_FINISHED)
        self._take = self._redis.register_script(_TAKE_PERMIT)
        self._renew = self._redis.register_script(_RENEW_PERMITS)

    def _key(self, key: str) -> str:
        return f"{self.prefix}:{key}"

    def book(self, keys: Sequence[tuple[str, Rate]], max_wait: float,
             member: str) -> tuple[float, float]:
        now = time.time()
        args: list[Any] = [now, max_wait, member]
        for _, rate in keys:
            args += [rate.count, rate.per]
        answer = self._book([self._key(k) for k, _ in keys], args)
        text = answer.decode() if isinstance(answer, bytes) else str(answer)
        wait = float(text.lstrip("-"))
        return wait, now + wait  # the member names the call; its time need not be exact

    def finished(self, keys: Sequence[tuple[str, Rate]], member: str, start: float,
                 end: float) -> None:
        self._finished([self._key(k) for k, _ in keys],
                       [member, end, *(rate.per for _, rate in keys)])

    def take_permit(self, key: str, limit: int, holder: str, lease: float) -> bool:
        now = time.time()
        return bool(self._take([self._key(key)],
                               [now, limit, holder, now + lease, int(lease) + 60]))

    def renew_permits(self, key: str, holders: Sequence[str], lease: float) -> set[str]:
        now = time.time()
        lost = self._renew([self._key(key)], [now, now + lease, *holders])
        return {h.decode() if isinstance(h, bytes) else str(h) for h in lost or []}

    def return_permit(self, key: str, holder: str) -> None:
        self._redis.zrem(self._key(key), holder)

    def want(self, key: str, seconds: float, by: str) -> None:
        self._redis.set(self._key(key) + ":wanted", by, px=int(seconds * 1000))

    def wanted(self, key: str, by: str) -> bool:
        value = self._redis.get(self._key(key) + ":wanted")
        if isinstance(value, bytes):
            value = value.decode()
        return value is not None and value != by


# -- the limiter of this process -------------------------------------------------------


def _store_errors() -> tuple[type[BaseException], ...]:
    """What a store that cannot be reached raises."""
    errors: list[type[BaseException]] = [DatabaseError, OSError]
    try:
        from redis.exceptions import RedisError  # noqa: PLC0415 - the optional redis extra
    except ImportError:  # the redis extra is not installed: no Redis store either
        pass
    else:
        errors.append(RedisError)
    return tuple(errors)


@dataclass(frozen=True)
class Booking:
    """A call's slot in its provider's rate windows (:meth:`Limiter.acquire`)."""

    store: Any
    keys: Sequence[tuple[str, Rate]]
    member: str
    start: float


class Limiter:
    """The limits of this process: the configured store, and this process's own limits
    to fall back on while the store cannot be reached (thread-safe)."""

    #: Seconds between two checks of a store that failed (meanwhile: the fallback).
    RETRY_STORE_AFTER = 5.0

    def __init__(self, config: Any) -> None:
        self.config = config
        self.fallback = ProcessStore()
        self.store: Any = self.fallback if config.store == "process" else None
        self._errors = _store_errors()
        self._lock = threading.Lock()
        self._down_since: float | None = None
        self._retry_at = 0.0

    # -- store health -----------------------------------------------------------------

    def _current(self) -> Any:
        """The store to use now: the configured one, or the fallback while it is down."""
        if self.store is None:
            try:
                self.store = make_store(self.config)
            except self._errors as exc:
                self._failed(exc)
                return self.fallback
        if self._down_since is not None and time.monotonic() < self._retry_at:
            return self.fallback
        return self.store

    def _failed(self, exc: BaseException) -> None:
        with self._lock:
            self._retry_at = time.monotonic() + self.RETRY_STORE_AFTER
            if self._down_since is not None:
                return
            self._down_since = time.monotonic()
        # Loud, once per outage: limits now hold per process only, so N processes may
        # together send N times a provider's limit until the store is back.
        logger.error("The shared limiter store (%s) failed: %r. Provider limits now hold "
                     "per process only, until it answers again; mail keeps going.",
                     self.config.store, exc)

    def _ok(self, store: Any) -> None:
        if self._down_since is not None and store is self.store:
            with self._lock:
                down, self._down_since = self._down_since, None
            if down is not None:
                logger.warning("The shared limiter store (%s) answers again after %.0f s; "
                               "provider limits are shared again.", self.config.store,
                               time.monotonic() - down)

    def _call(self, action: Any) -> Any:
        """``action(store)`` on the current store; on the fallback if that fails."""
        store = self._current()
        if store is not self.fallback:
            try:
                result = action(store)
            except self._errors as exc:
                self._failed(exc)
            else:
                self._ok(store)
                return result
        return action(self.fallback)

    # -- rates ------------------------------------------------------------------------

    def acquire(self, alias: str, rates: Sequence[Rate], max_wait: float) -> Booking | None:
        """Book a slot of every window of ``rates`` for provider ``alias`` and wait for it
        when it is at most ``max_wait`` seconds away; raise :class:`RateLimited` (nothing
        booked) when it is further. Give the booking to :meth:`finished` when the call
        ends."""
        if not rates:
            return None
        keys = [(f"rate:{alias}:{rate.count}/{rate.per:g}", rate) for rate in rates]
        member = uuid.uuid4().hex
        used: list[Any] = []

        def book(store: Any) -> tuple[float, float]:
            used[:] = [store]
            return store.book(keys, max_wait, member)  # type: ignore[no-any-return]

        wait, start = self._call(book)
        if wait > max_wait:
            raise RateLimited(alias, self._full(rates, wait), wait)
        if wait > 0:
            time.sleep(wait)
        return Booking(used[-1], keys, member, start)

    def finished(self, booking: Booking | None) -> None:
        """The call booked by :meth:`acquire` ended now: its windows count it from now."""
        if booking is None:
            return
        try:
            booking.store.finished(booking.keys, booking.member, booking.start, time.time())
        except self._errors as exc:
            # Counted from its booking instead: the store is down, and the fallback
            # takes over for the next calls.
            self._failed(exc)

    @staticmethod
    def _full(rates: Sequence[Rate], wait: float) -> Rate:
        """The window that makes the caller wait ``wait`` (the widest that could)."""
        return max((r for r in rates if r.per >= wait), key=lambda r: r.per, default=rates[0])

    # -- permits ----------------------------------------------------------------------

    def take_permit(self, alias: str, limit: int) -> str | None:
        """A permit to open one more connection to ``alias`` (its holder id), or None."""
        holder = uuid.uuid4().hex

        def take(store: Any) -> str | None:
            ok = store.take_permit(_permit_key(alias), limit, holder, self.config.lease)
            return (holder if store is not self.fallback else "local:" + holder) if ok else None

        return self._call(take)  # type: ignore[no-any-return]

    def renew_permits(self, alias: str, holders: Iterable[str]) -> set[str]:
        """Renew the leases of ``holders``; those lost (expired and taken) come back."""
        holders = list(holders)
        shared = [h for h in holders if not h.startswith("local:")]
        local = [h[6:] for h in holders if h.startswith("local:")]
        lost: set[str] = set()
        key = _permit_key(alias)
        if local:
            lost |= {"local:" + h for h in
                     self.fallback.renew_permits(key, local, self.config.lease)}
        if shared:
            store = self._current()
            if store is not self.fallback:
                try:
                    lost |= store.renew_permits(key, shared, self.config.lease)
                except self._errors as exc:
                    self._failed(exc)
                else:
                    self._ok(store)
        return lost

    #: Seconds a waiter's "I want a permit" lasts (it says it again while it waits).
    WANT_SECONDS = 1.0

    def want_permit(self, alias: str) -> None:
        """A process waits for a permit of ``alias``: holders give theirs back when their
        connection is idle, rather than keep it warm."""
        key = _permit_key(alias)
        self._call(lambda store: store.want(key, self.WANT_SECONDS, _process()))

    def permit_wanted(self, alias: str) -> bool:
        """Whether another process waits for a permit of ``alias``."""
        key = _permit_key(alias)
        return bool(self._call(lambda store: store.wanted(key, _process())))

    def return_permit(self, alias: str, holder: str) -> None:
        key = _permit_key(alias)
        if holder.startswith("local:"):
            self.fallback.return_permit(key, holder[6:])
            return
        store = self.store
        if store is None or store is self.fallback:
            return
        try:
            store.return_permit(key, holder)
        except self._errors as exc:
            # Its lease ends it in PERMIT_LEASE_SECONDS.
            self._failed(exc)


class ProviderPermits:
    """Provider ``alias``'s connection permits, through this process's limiter (what
    :class:`kipekee.connections.ProviderPool` asks before it opens a connection)."""

    def __init__(self, alias: str) -> None:
        self.alias = alias

    @property
    def lease(self) -> float:
        return float(limiter().config.lease)

    def take(self, limit: int) -> str | None:
        return limiter().take_permit(self.alias, limit)

    def renew(self, holders: Sequence[str]) -> set[str]:
        return limiter().renew_permits(self.alias, holders)

    def give_back(self, holder: str) -> None:
        limiter().return_permit(self.alias, holder)

    def want(self) -> None:
        limiter().want_permit(self.alias)

    def wanted(self) -> bool:
        return limiter().permit_wanted(self.alias)


def permits(alias: str) -> ProviderPermits:
    return ProviderPermits(alias)


def _process() -> str:
    """This process, among all hosts'."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _permit_key(alias: str) -> str:
    return f"permits:{alias}"


def make_store(config: Any) -> Store:
    """The store ``KIPEKEE["LIMITER"]`` names."""
    if config.store == "redis":
        return RedisStore(config.location, config.key_prefix)
    if config.store == "database":
        return DatabaseStore()
    return ProcessStore()


_lock = threading.Lock()
_limiter: Limiter | None = None
_limiter_for: Any = None


def limiter() -> Limiter:
    """This process's limiter, for the settings in force."""
    global _limiter, _limiter_for
    config = conf.get().limiter
    with _lock:
        if _limiter is None or _limiter_for is not config:
            _limiter, _limiter_for = Limiter(config), config
        return _limiter


# -- the lanes' windows (per process) --------------------------------------------------


class SlidingWindow:
    """At most ``rate.count`` acquisitions in any ``rate.per`` seconds (thread-safe)."""

    def __init__(self, rate: Rate) -> None:
        self.rate = rate
        self._times: list[float] = []  # sorted
        self._lock = threading.Lock()

    def reserve(self) -> float:
        """Take a slot; return how many seconds the caller must wait before using it."""
        with self._lock:
            now = time.monotonic()
            del self._times[:bisect.bisect_right(self._times, now - self.rate.per)]
            if len(self._times) < self.rate.count:
                start = now
            else:
                # The slot frees when the oldest of the last `count` uses leaves the window.
                start = self._times[-self.rate.count] + self.rate.per
            bisect.insort(self._times, start)
            return max(0.0, start - now)

    def take(self, count: int) -> int:
        """Take up to ``count`` slots that are free now, without waiting; how many."""
        with self._lock:
            now = time.monotonic()
            del self._times[:bisect.bisect_right(self._times, now - self.rate.per)]
            granted = max(0, min(count, self.rate.count - len(self._times)))
            self._times.extend([now] * granted)  # now is the newest time: still sorted
            return granted

    def give_back(self, count: int) -> None:
        """Return ``count`` of the slots :meth:`take` just took (they were not used)."""
        with self._lock:
            del self._times[len(self._times) - min(count, len(self._times)):]

    def free_in(self) -> float:
        """Seconds until a slot is free (0: one is free now)."""
        with self._lock:
            now = time.monotonic()
            del self._times[:bisect.bisect_right(self._times, now - self.rate.per)]
            if len(self._times) < self.rate.count:
                return 0.0
            return self._times[-self.rate.count] + self.rate.per - now


_lanes: dict[tuple[str, str], SlidingWindow] = {}


def for_lane(name: str, rate: str) -> SlidingWindow:
    """The window of rows claimed from lane ``name`` (``KIPEKEE["LANES"][name]["LIMITS"]``),
    shared by the process: a row counts when it is claimed."""
    key = (name, rate)
    with _lock:
        window = _lanes.get(key)
        if window is None:
            window = _lanes[key] = SlidingWindow(Rate.parse(rate))
        return window


def reset() -> None:
    global _limiter, _limiter_for
    with _lock:
        _lanes.clear()
        _limiter, _limiter_for = None, None


# Limits come from KIPEKEE alone.
conf.reset_on_change(reset, {"KIPEKEE"})
