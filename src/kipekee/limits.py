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

Rates go through the ``limits`` library's moving window (:class:`MovingWindowRateLimiter`)
on its own Redis and memory storages, or on :class:`DatabaseStorage`, a storage for
``limits`` kept in Django's database: ``limits`` has no SQL storage, and
``pyrate-limiter``'s SQLite and PostgreSQL buckets open their own connections (a SQLite
file of their own, a psycopg pool) instead of the project's database and its settings.
Neither library has a shared semaphore for connections, so the permits are Kipekee's
own: a row (or a Redis sorted-set member) per open connection, with a lease renewed while
the connection is open, so a process that dies frees its permits within
``PERMIT_LEASE_SECONDS``.

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
import random
import re
import threading
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from limits import RateLimitItem, RateLimitItemPerSecond
from limits.storage import MemoryStorage, MovingWindowSupport, Storage
from limits.strategies import MovingWindowRateLimiter

from .exceptions import ConfigurationError

logger = logging.getLogger("kipekee.limits")

_RATE = re.compile(r"^\s*(\d+)\s*/\s*(\d*\.?\d*)\s*(s|m|h|d)\s*$")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400}


@dataclass(frozen=True, kw_only=True)
class Rate:
    count: int
    per: float  # seconds, whole

    @classmethod
    def parse(cls, text: str) -> Rate:
        """``"150/10s"``, ``"15/s"``, ``"500/d"`` → a Rate (a window of whole seconds)."""
        match = _RATE.match(text) if isinstance(text, str) else None
        if not match or int(match[1]) <= 0:
            raise ConfigurationError(f"RATE must look like '150/10s' or '500/d', not {text!r}.")
        per = float(match[2] or 1) * _UNIT[match[3]]
        if per < 1 or per != int(per):
            raise ConfigurationError(
                f"RATE {text!r}: the window must be a whole number of seconds (1 or more).")
        return cls(count=int(match[1]), per=per)

    @property
    def item(self) -> RateLimitItem:
        """This rate as a ``limits`` item."""
        return RateLimitItemPerSecond(self.count, int(self.per))


class RateLimited(Exception):
    """A provider's ``LIMITS["RATE"]`` has no free slot for ``wait`` seconds: the mail is
    deferred until then, uncharged. A local limit, not a provider failure."""

    def __init__(self, alias: str, rate: Rate, wait: float) -> None:
        self.alias = alias
        self.rate = rate
        self.wait = wait
        super().__init__(f"rate limit of provider {alias!r} reached ({rate.count} per "
                         f"{rate.per:g} s, LIMITS['RATE']); next free slot in {wait:.1f} s")


# -- the stores ------------------------------------------------------------------------


class Store(Protocol):
    """Where shared limits live. ``rate_storage`` is a ``limits`` storage with moving-
    window support; the permit methods are Kipekee's own (see the module docstring)."""

    name: str
    rate_storage: Storage

    def take_permit(self, key: str, limit: int, holder: str, lease: float) -> bool:
        """Count ``holder`` as one of at most ``limit`` holders of ``key`` until
        ``lease`` seconds from now (a holder that already holds it: renewed)."""
        ...

    def renew_permits(self, key: str, holders: Sequence[str], lease: float) -> set[str]:
        """Extend the leases of ``holders``; return those that had lost theirs."""
        ...

    def return_permit(self, key: str, holder: str) -> None: ...


class ProcessStore:
    """Limits of this process alone (``LIMITER "process"``, and the fallback)."""

    name = "process"

    def __init__(self) -> None:
        self.rate_storage = MemoryStorage()
        self._lock = threading.Lock()
        self._permits: dict[str, dict[str, float]] = {}

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


class DatabaseStorage(Storage, MovingWindowSupport):
    """A ``limits`` storage in Django's database (SQLite, PostgreSQL, any backend Django
    has), for the moving window: one :class:`~kipekee.models.LimiterHit` row per call.

    A take runs in one short transaction that first locks the key's
    :class:`~kipekee.models.LimiterKey` row (an UPDATE: the row lock on PostgreSQL, the
    write lock on SQLite), so two processes never both see the last free slot. Times are
    ``time.time()`` of the taking host, as in ``limits``' own Redis storage: keep the
    hosts' clocks in sync (NTP).
    """

    STORAGE_SCHEME = None

    def __init__(self, using: str | None = None) -> None:
        super().__init__()
        self.using = using

    @property
    def base_exceptions(self) -> type[Exception] | tuple[type[Exception], ...]:
        from django.db import DatabaseError

        return DatabaseError

    def _db(self) -> str:
        if self.using is not None:
            return self.using
        from django.db import router

        from .models import LimiterHit

        return router.db_for_write(LimiterHit)

    def acquire_entry(self, key: str, limit: int, expiry: int, amount: int = 1) -> bool:
        from django.db import transaction

        from .models import LimiterHit

        if amount > limit:
            return False
        db = self._db()
        with transaction.atomic(using=db):
            lock_key(db, key)
            now = time.time()
            hits = LimiterHit.objects.using(db).filter(key=key)
            # The oldest of the newest `limit - amount + 1` calls: still in the window,
            # there is no room for `amount` more.
            nth = list(hits.order_by("-at").values_list("at", flat=True)
                       [limit - amount:limit - amount + 1])
            if nth and nth[0] > now - expiry:
                return False
            hits.filter(at__lte=now - expiry).delete()
            LimiterHit.objects.using(db).bulk_create(
                [LimiterHit(key=key, at=now) for _ in range(amount)])
            return True

    def get_moving_window(self, key: str, limit: int, expiry: int) -> tuple[float, int]:
        from .models import LimiterHit

        now = time.time()
        times = list(LimiterHit.objects.using(self._db()).filter(key=key, at__gt=now - expiry)
                     .order_by("-at").values_list("at", flat=True)[:limit])
        return (times[-1], len(times)) if times else (now, 0)

    # The counter API of `limits` (fixed windows); the moving window does not use it.

    def incr(self, key: str, expiry: int, amount: int = 1) -> int:
        raise NotImplementedError("DatabaseStorage serves the moving window only")

    def get(self, key: str) -> int:
        raise NotImplementedError("DatabaseStorage serves the moving window only")

    def get_expiry(self, key: str) -> float:
        raise NotImplementedError("DatabaseStorage serves the moving window only")

    def check(self) -> bool:
        from .models import LimiterKey

        LimiterKey.objects.using(self._db()).exists()
        return True

    def reset(self) -> int | None:
        from .models import LimiterHit, LimiterKey

        db = self._db()
        count, _ = LimiterHit.objects.using(db).all().delete()
        LimiterKey.objects.using(db).all().delete()
        return count

    def clear(self, key: str) -> None:
        from .models import LimiterHit

        LimiterHit.objects.using(self._db()).filter(key=key).delete()


def lock_key(db: str, key: str) -> None:
    """Lock ``key``'s :class:`~kipekee.models.LimiterKey` row for the rest of the
    transaction (made on first use)."""
    from django.db.models import F

    from .models import LimiterKey

    rows = LimiterKey.objects.using(db).filter(key=key)
    if not rows.update(takes=F("takes") + 1):
        LimiterKey.objects.using(db).bulk_create([LimiterKey(key=key)], ignore_conflicts=True)
        rows.update(takes=F("takes") + 1)


class DatabaseStore:
    """Shared limits in the outbox's database (``LIMITER "database"``)."""

    name = "database"

    def __init__(self) -> None:
        self.rate_storage = DatabaseStorage()

    def take_permit(self, key: str, limit: int, holder: str, lease: float) -> bool:
        from django.db import transaction

        from .models import ProviderPermit

        db = self.rate_storage._db()
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
        from .models import ProviderPermit

        db = self.rate_storage._db()
        now = time.time()
        permits = ProviderPermit.objects.using(db).filter(key=key, holder__in=list(holders),
                                                          lease_until__gte=now)
        kept = set(permits.values_list("holder", flat=True))
        permits.update(lease_until=now + lease)
        return set(holders) - kept

    def return_permit(self, key: str, holder: str) -> None:
        from .models import ProviderPermit

        ProviderPermit.objects.using(self.rate_storage._db()).filter(
            key=key, holder=holder).delete()


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
    """Shared limits in Redis (``LIMITER "redis"``): ``limits``' Redis storage for the
    rates, a sorted set per provider for the permits."""

    name = "redis"

    def __init__(self, location: str, prefix: str) -> None:
        from limits.storage import RedisStorage

        # Short timeouts: a Redis that is down must cost a send milliseconds, not the
        # client's default of waiting for TCP.
        self.rate_storage = RedisStorage(location, key_prefix=prefix, socket_timeout=1.0,
                                         socket_connect_timeout=1.0)
        self.prefix = prefix
        self._redis = self.rate_storage.storage
        self._take = self._redis.register_script(_TAKE_PERMIT)
        self._renew = self._redis.register_script(_RENEW_PERMITS)

    def _key(self, key: str) -> str:
        return f"{self.prefix}:{key}"

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


# -- the limiter of this process -------------------------------------------------------


def _store_errors() -> tuple[type[BaseException], ...]:
    """What a store that cannot be reached raises."""
    from django.db import DatabaseError
    from limits.errors import StorageError

    errors: list[type[BaseException]] = [DatabaseError, StorageError, OSError]
    try:
        from redis.exceptions import RedisError
    except ImportError:  # the redis extra is not installed: no Redis store either
        pass
    else:
        errors.append(RedisError)
    return tuple(errors)


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
        self._strategies: dict[int, MovingWindowRateLimiter] = {}

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

    def _strategy(self, store: Any) -> MovingWindowRateLimiter:
        strategy = self._strategies.get(id(store))
        if strategy is None:
            strategy = self._strategies[id(store)] = MovingWindowRateLimiter(store.rate_storage)
        return strategy

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

    def take(self, alias: str, rates: Sequence[Rate]) -> tuple[float, Rate | None]:
        """Take one slot of every window of ``rates`` for provider ``alias``: ``(0, None)``
        when taken, else the seconds until the window that is full may have one, and
        that window."""
        result: tuple[float, Rate | None] = self._call(
            lambda store: self._take(store, alias, rates))
        return result

    def _take(self, store: Any, alias: str,
              rates: Sequence[Rate]) -> tuple[float, Rate | None]:
        strategy = self._strategy(store)
        # The shortest window first: when a longer one (a daily quota) is full, the slot
        # already taken of the shorter one is lost, and a short window soon forgets it;
        # the other way round each refused try would cost a slot of the quota.
        for rate in sorted(rates, key=lambda r: r.per):
            if not strategy.hit(rate.item, "provider", alias):
                reset = strategy.get_window_stats(rate.item, "provider", alias).reset_time
                return max(0.01, reset - time.time()), rate
        return 0.0, None

    def acquire(self, alias: str, rates: Sequence[Rate], max_wait: float) -> None:
        """Take a slot of ``rates``, waiting for one up to ``max_wait`` seconds; raise
        :class:`RateLimited` when none frees in time."""
        if not rates:
            return
        deadline = time.monotonic() + max_wait
        while True:
            wait, full = self.take(alias, rates)
            if full is None:
                return
            left = deadline - time.monotonic()
            if wait > left:
                raise RateLimited(alias, full, wait)
            # Others wait for the same slot: spread the retries a little.
            time.sleep(min(left, wait + random.uniform(0, 0.02)))

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


def permits(alias: str) -> ProviderPermits:
    return ProviderPermits(alias)


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
    from . import conf

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
