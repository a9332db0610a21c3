"""Warm provider connections: a small pool of open backends per provider, per process.

A send in the request should cost the provider's round trips for the message, not for a
new session (TCP, greeting, EHLO, STARTTLS, TLS, EHLO, AUTH: ten round trips before the
first byte of mail). So a backend :class:`~kipekee.delivery.Deliverer` opened stays open
when it is done, in this module's pool, and the next send (the next request's, or the
next batch of an engine thread) takes it again.

- **Checkout, checkin.** A connection is used by one thread at a time: the Deliverer
  checks it out (:meth:`ProviderPool.checkout`), makes it ready (:meth:`ProviderPool.ready`)
  and checks it in when its call is done (:meth:`ProviderPool.checkin`). The most recently
  used connection is handed out first (the warmest; the others age and are closed).
- **Health without a round trip.** Before reuse, the backend's ``is_usable(probe=False)``
  looks at the socket: a server that closed the connection (idle timeout, ``421``, a
  restart) left it readable, and it is replaced at once. A connection unused for
  ``CONNECTIONS["IDLE_SECONDS"]`` is also probed (``is_usable(probe=True)``: one ``NOOP``),
  because a connection dropped by a NAT or firewall says nothing. Backends without
  ``is_usable`` (HTTP APIs: ``requests`` checks its own pooled sockets) are taken as they
  are. A connection open for ``MAX_AGE_SECONDS`` is closed and replaced.
- **A bound.** ``LIMITS["CONCURRENCY"]`` is the most connections to the provider this
  process has open at once (in use and idle); a checkout waits for one to come back.
  ``POOL_SIZE`` is how many idle connections per provider are kept once a burst is over
  (more are closed after ``IDLE_SECONDS`` unused).
- **Fork.** A child process never uses its parent's sockets (``os.register_at_fork``):
  it forgets the inherited connections, closing its copies of the sockets without a word
  on the wire (a ``QUIT`` would end the parent's session), and opens its own.
- **Exit.** Idle connections are closed (``QUIT``) at interpreter exit and when the
  settings change (``setting_changed``), and by :func:`close_all`.

- **Shared bound.** ``LIMITS["CONCURRENCY"]`` holds across every process and host that
  share ``KIPEKEE["LIMITER"]``'s store: each open connection holds a permit of
  :mod:`kipekee.limits` (:meth:`ProviderPool._take_permit`), taken before it opens and
  given back when it closes. A keeper thread renews the permits' leases while their
  connections are open and closes connections idle for ``IDLE_SECONDS``, so a process
  that sends nothing gives its permits back to those that do; a process that died
  leaves permits that expire with their lease (``PERMIT_LEASE_SECONDS``).

Connections themselves are per process (sockets are).
"""

from __future__ import annotations

import atexit
import logging
import os
import smtplib
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from django.core.mail.backends.base import BaseEmailBackend
from django.core.signals import setting_changed
from django.db import close_old_connections

from . import conf, limits, providers
from .registries import PerProvider

logger = logging.getLogger("kipekee.connections")

#: Seconds a probe of an idle connection may take before the connection is given up and
#: a new one opened: a provider answers a NOOP within a round trip, and a dead
#: connection would otherwise hold the send for the whole socket timeout.
PROBE_TIMEOUT = 2.0
#: Seconds an engine's Deliverer waits for a connection when all are in use (the
#: in-request path waits at most its time budget).
DEFAULT_WAIT = 60.0
#: Seconds a connection under a shared ``LIMITS["CONCURRENCY"]`` stays open unused
#: (``IDLE_SECONDS`` when lower): its permit may be wanted by another process.
SHARED_IDLE_SECONDS = 2.0


class ProviderBusy(limits.LocalLimit):
    """Every connection this process may open to the provider is in use, and none came
    back in time."""

    def __init__(self, alias: str, limit: int | None, waited: float) -> None:
        self.limit, self.waited = limit, waited
        super().__init__(alias, f"all {limit} connection(s) to provider {alias!r} in use "
                         f"(LIMITS['CONCURRENCY']); waited {waited:.1f} s")


class Permits(Protocol):
    """A bound on open connections shared beyond this process (:mod:`kipekee.limits`)."""

    @property
    def lease(self) -> float:
        """Seconds a permit lasts unless renewed."""
        ...

    def take(self, limit: int) -> str | None:
        """A permit (its holder id), or None when ``limit`` are out."""
        ...

    def renew(self, holders: Sequence[str]) -> set[str]:
        """Renew ``holders``' leases; those lost come back."""
        ...

    def give_back(self, holder: str) -> None: ...

    def want(self) -> None:
        """Say that this process waits for a permit."""
        ...

    def wanted(self) -> bool:
        """Whether another process waits for a permit."""
        ...


class Connection:
    """One connection of a pool, checked out by one thread.

    ``backend`` is the opened backend, or ``None`` until :meth:`ProviderPool.ready` opens
    one. A checked-out connection holds a permit of the pool whether open or not.
    """

    __slots__ = ("backend", "checked", "opened_at", "permit", "pool", "used_at", "uses")

    def __init__(self, pool: ProviderPool, permit: str | None = None) -> None:
        self.pool = pool
        #: The shared permit this connection holds (None: no shared bound, or lost).
        self.permit = permit
        self.backend: BaseEmailBackend | None = None
        self.opened_at = 0.0
        self.used_at = 0.0
        #: Successful sends on this backend since it was opened: a failure on a
        #: connection with ``uses`` may be a server that closed it in between.
        self.uses = 0
        #: Made ready since this checkout (checked or opened): not checked again.
        self.checked = False


class ProviderPool:
    """The open connections of one provider in this process (thread-safe).

    ``max_open``: ``LIMITS["CONCURRENCY"]`` (None: no bound), held across processes
    with ``permits``; ``config``: ``KIPEKEE["CONNECTIONS"]`` (idle ones kept, probed, replaced).
    """

    def __init__(self, alias: str, build: Callable[[], BaseEmailBackend], *,
                 max_open: int | None, config: conf.ConnectionsConfig,
                 permits: Permits | None = None) -> None:
        self.alias = alias
        self.permits = permits
        self.max_open = max_open
        self.config = config
        self._build = build
        self._cond = threading.Condition()
        self._idle: list[Connection] = []  # least recently used first
        self._open = 0  # permits taken: connections checked out or idle
        self._closed = False
        # Connections holding a shared permit, checked out or idle (the keeper renews).
        self._permitted: set[Connection] = set()
        self._renewed_at = time.monotonic()
        self._waiters = 0  # threads waiting in checkout

    # -- the permits ----------------------------------------------------------------

    def _take_permit(self) -> Connection | None:
        """Room for one more open connection, or None: first this process's count
        (``max_open``), then the shared permit. Called without the lock held."""
        with self._cond:
            if self.max_open is not None and self._open >= self.max_open:
                return None
            self._open += 1
        if self.permits is None or self.max_open is None:
            return Connection(self)
        try:
            holder = self.permits.take(self.max_open)
        except BaseException:
            self._return_permit(None)
            raise
        if holder is None:
            self._return_permit(None)
            return None
        conn = Connection(self, holder)
        with self._cond:
            self._permitted.add(conn)
        return conn

    def _return_permit(self, conn: Connection | None) -> None:
        """A connection was closed (or never opened): its room and permit are free."""
        holder = None
        with self._cond:
            self._open -= 1
            if conn is not None:
                self._permitted.discard(conn)
                holder, conn.permit = conn.permit, None
            self._cond.notify()
        if holder is not None and self.permits is not None:
            self.permits.give_back(holder)

    def keep(self) -> None:
        """The keeper's round (every second or so, for pools with shared permits):
        close connections idle for ``idle_seconds`` (their permits go to others), and
        renew the leases of the others every third of a lease."""
        # (IDLE_SECONDS, or SHARED_IDLE_SECONDS when lower.)
        if self.permits is None:
            return
        now = time.monotonic()
        linger = min(self.config.idle_seconds, SHARED_IDLE_SECONDS)
        stale: list[Connection] = []
        with self._cond:
            while self._idle and now - self._idle[0].used_at >= linger:
                stale.append(self._idle.pop(0))
        for conn in stale:
            self._close(conn, quietly=False)
            self._return_permit(conn)
        if now - self._renewed_at < self.permits.lease / 3:
            return
        self._renewed_at = now
        with self._cond:
            held = {c.permit: c for c in self._permitted if c.permit}
        lost = self.permits.renew(list(held)) if held else set()
        for holder in lost:
            conn = held[holder]
            logger.warning("Provider %r: a connection's permit expired before it was renewed "
                           "(LIMITS['CONCURRENCY'] may be exceeded until it closes)", self.alias)
            with self._cond:
                idle = conn in self._idle
                if idle:
                    self._idle.remove(conn)
                conn.permit = None
                self._permitted.discard(conn)
            if idle:
                self._close(conn, quietly=False)
                with self._cond:
                    self._open -= 1
                    self._cond.notify()

    # -- checkout and checkin ------------------------------------------------------

    def checkout(self, timeout: float | None = DEFAULT_WAIT) -> Connection:
        """An idle connection (most recently used first), or room for a new one.

        Nothing goes over the network here: :meth:`ready` opens or checks it, so a caller
        can ask its circuit breaker in between. Waits up to ``timeout`` seconds while
        ``max_open`` connections are out, then raises :class:`ProviderBusy`.
        """
        started = time.monotonic()
        poll = 0.02
        wanted_at = -1.0
        waiting = False
        try:
            while True:
                with self._cond:
                    if self._idle:
                        conn = self._idle.pop()
                        conn.checked = False
                        return conn
                taken = self._take_permit()
                if taken is not None:
                    return taken
                waited = time.monotonic() - started
                left = None if timeout is None else timeout - waited
                if left is not None and left <= 0:
                    raise ProviderBusy(self.alias, self.max_open, waited)
                if not waiting:
                    waiting = True
                    with self._cond:
                        self._waiters += 1
                if self.permits is not None and time.monotonic() - wanted_at >= 0.5:
                    # Holders elsewhere then close their idle connections, not keep them.
                    self.permits.want()
                    wanted_at = time.monotonic()
                with self._cond:
                    if self.permits is None:
                        self._cond.wait(left)  # only a checkin here frees room
                    else:
                        # A checkin here wakes this at once; a permit freed by another
                        # process is seen at the next poll (backing off to 0.2 s).
                        self._cond.wait(poll if left is None else min(left, poll))
                        poll = min(poll * 2, 0.2)
        finally:
            if waiting:
                with self._cond:
                    self._waiters -= 1

    def ready(self, conn: Connection) -> BaseEmailBackend:
        """``conn``'s backend, open and fit to send: an idle one checked (and replaced if
        the server closed it, or it is too old), or a new one opened.

        Raises what opening raises (the caller then checks ``conn`` in with
        ``reusable=False``): that is a failure of the provider.
        """
        if conn.checked and conn.backend is not None:
            return conn.backend
        now = time.monotonic()
        backend = conn.backend
        if backend is not None:
            if now - conn.opened_at >= self.config.max_age:
                self._close(conn, quietly=False)
            elif not self._usable(backend, probe=now - conn.used_at >= self.config.idle_seconds):
                logger.debug("Provider %r: the server closed an idle connection; opening "
                             "another", self.alias)
                self._close(conn, quietly=True)
        if conn.backend is None:
            backend = self._build()
            try:
                backend.open()
            except BaseException:
                # A session that failed half-way (TLS, AUTH) still holds its socket.
                conn.backend = backend
                self._close(conn, quietly=True)
                raise
            conn.backend, conn.opened_at, conn.uses = backend, time.monotonic(), 0
        conn.checked = True
        assert conn.backend is not None
        return conn.backend

    def renew(self, conn: Connection) -> BaseEmailBackend:
        """Close ``conn``'s backend without a word and open a new one in its place (the
        server closed it between the check and the send)."""
        self._close(conn, quietly=True)
        conn.checked = False
        return self.ready(conn)

    def checkin(self, conn: Connection, *, reusable: bool = True) -> None:
        """Give ``conn`` back: kept warm if ``reusable`` (its session is in a known state),
        else closed."""
        surplus: list[Connection] = []
        now = time.monotonic()
        conn.used_at = now
        keep = (reusable and conn.backend is not None and not self._closed
                and self.config.pool_size > 0 and now - conn.opened_at < self.config.max_age
                # A connection whose shared permit was lost is not kept.
                and (conn.permit is not None or self.permits is None))
        if keep and self.permits is not None and not self._waiting_here():
            # Under a shared bound an idle connection is a permit another process may
            # be waiting for: closed then, unless a thread here takes it at once (warm,
            # no new session: the permit is in use either way).
            keep = not self.permits.wanted()
        if keep:
            with self._cond:
                self._idle.append(conn)
                # A burst is over: the least recently used beyond POOL_SIZE go once unused
                # for IDLE_SECONDS (not at once, or a busy engine would close and reopen).
                while (len(self._idle) > self.config.pool_size
                       and now - self._idle[0].used_at >= self.config.idle_seconds):
                    surplus.append(self._idle.pop(0))
                self._cond.notify()
        else:
            surplus.append(conn)
        for old in surplus:
            self._close(old, quietly=not reusable and old is conn)
            self._return_permit(old)

    def _waiting_here(self) -> bool:
        """Whether a thread of this process waits in :meth:`checkout`."""
        with self._cond:
            return self._waiters > 0

    def close(self) -> None:
        """Close the idle connections (``QUIT``); those checked out close at checkin."""
        with self._cond:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            self._close(conn, quietly=False)
            self._return_permit(conn)

    def forget(self) -> None:
        """In a forked child: drop the inherited connections, saying nothing on them.
        (Their permits are the parent's: it gives them back.)"""
        self._closed = True
        for conn in self._idle:
            _drop_socket(conn.backend)
        self._idle = []
        self._permitted = set()

    @property
    def open_count(self) -> int:
        """Connections of this pool open or reserved now (checked out or idle)."""
        with self._cond:
            return self._open

    # -- helpers -------------------------------------------------------------------

    def _usable(self, backend: BaseEmailBackend, *, probe: bool) -> bool:
        check = getattr(backend, "is_usable", None)
        if check is None:
            return True
        try:
            return bool(check(probe=probe, timeout=PROBE_TIMEOUT))
        except Exception as exc:  # noqa: BLE001 - a failed check means "open another"
            logger.debug("Provider %r: connection check raised %r", self.alias, exc)
            return False

    def _close(self, conn: Connection, *, quietly: bool) -> None:
        """Close ``conn``'s backend: politely (``QUIT``), or ``quietly`` for one that is
        broken: its socket is closed without a word, as waiting for the reply of a server
        that stopped answering would cost another timeout."""
        backend, conn.backend = conn.backend, None
        if backend is None:
            return
        try:
            if quietly:
                _drop_socket(backend)
            backend.close()
        except Exception as exc:  # noqa: BLE001 - closing must never mask a send's result
            (logger.debug if quietly else logger.warning)(
                "Closing a connection to provider %r failed: %r", self.alias, exc)


def _drop_socket(backend: BaseEmailBackend | None) -> None:
    """Close this process's copy of ``backend``'s socket without sending anything."""
    connection = getattr(backend, "connection", None)
    if isinstance(connection, smtplib.SMTP):
        connection.close()  # smtplib's close() only closes the socket (quit() talks)
        return
    session = getattr(backend, "session", None)  # anymail's requests session
    close = getattr(session, "close", None)
    if close is not None:
        close()  # urllib3 closes its sockets; HTTP and TLS have nothing to say on close


def is_server_closed(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) says the server had closed the connection:
    a disconnect, a reset, or a ``421`` (the service closing the channel)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, (smtplib.SMTPServerDisconnected, ConnectionResetError,
                                BrokenPipeError, ConnectionAbortedError)):
            return True
        if isinstance(current, smtplib.SMTPResponseException) and current.smtp_code == 421:
            return True
        current = current.__cause__ or current.__context__
    return False


# -- the pools of this process ---------------------------------------------------------

def _new_pool(alias: str) -> ProviderPool:
    settings = conf.get()
    config = settings.provider(alias)
    pool = ProviderPool(
        alias, lambda: providers.build(alias), max_open=config.concurrency,
        config=settings.connections,
        permits=limits.permits(alias) if config.concurrency else None)
    if pool.permits is not None:
        _start_keeper()
    return pool


_pools = PerProvider(_new_pool)


def pool_for(alias: str) -> ProviderPool:
    """Provider ``alias``'s pool in this process (made on first use)."""
    return _pools.get(alias)


_keeper: threading.Thread | None = None
_keeper_pid = 0
#: Seconds between the keeper's rounds.
KEEP_EVERY = 1.0


def _start_keeper() -> None:
    """Start this process's keeper thread (called while ``_pools`` is locked, making a
    pool: so there is one)."""
    global _keeper, _keeper_pid
    if _keeper is not None and _keeper_pid == os.getpid() and _keeper.is_alive():
        return
    _keeper_pid = os.getpid()
    _keeper = threading.Thread(target=_keep, name="kipekee-connections-keeper", daemon=True)
    _keeper.start()


def _keep() -> None:
    """Renew the shared permits of this process's open connections, and close the idle
    ones after ``IDLE_SECONDS`` (see :meth:`ProviderPool.keep`)."""
    while os.getpid() == _keeper_pid:
        time.sleep(KEEP_EVERY)
        for pool in [p for p in _pools.all() if p.permits is not None]:
            try:
                pool.keep()
            except Exception:  # noqa: BLE001 - the keeper must outlive any one failure
                logger.exception("Keeping the connections of provider %r failed", pool.alias)
        close_old_connections()


def close_all() -> None:
    """Close every idle connection of this process; later sends open new ones."""
    for pool in _pools.clear():
        pool.close()


_owner = os.getpid()


def _at_exit() -> None:
    if os.getpid() == _owner:
        close_all()


def _after_fork_in_child() -> None:
    global _owner, _keeper
    _owner = os.getpid()
    _keeper = None  # the parent's thread is not in the child
    for pool in _pools.clear_after_fork():
        pool.forget()


atexit.register(_at_exit)
os.register_at_fork(after_in_child=_after_fork_in_child)

#: Settings whose change may change what a provider's backend connects to.
_RESET_ON = {"KIPEKEE", "DEFAULT_FROM_EMAIL", "ANYMAIL"}


def _reset(*, setting: str, **kwargs: Any) -> None:
    if setting in _RESET_ON or setting.startswith("EMAIL_"):
        close_all()


setting_changed.connect(_reset, dispatch_uid="kipekee.connections")
