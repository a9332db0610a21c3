"""SQLite's shared-cache table locks, waited out as SQLite waits out a database file's locks.

Django's test runner turns an in-memory SQLite database into a shared-cache one
(``file:memorydb_default?mode=memory&cache=shared``) so that every thread's connection sees
the same data. In a shared cache SQLite locks each table, and a statement that meets
another connection's table lock fails at once with ``SQLITE_LOCKED`` ("database table is
locked"): the busy timeout that makes a statement wait for a database *file*'s lock
(``SQLITE_BUSY``; Django's ``OPTIONS["timeout"]``, 5 s by default) does not apply to it,
and SQLite's own way to wait for a table lock, ``sqlite3_unlock_notify``, is not offered by
Python's ``sqlite3``. An engine's threads (its senders, its recorder, its lease keeper) and a
test's own connection then fail each other's statements whenever they meet: a claim, a
due time, the record of a mail that went out (left ``sending`` until its lease ends, then
sent again).

So on a shared-cache connection a statement that fails with ``SQLITE_LOCKED`` runs again
after a short sleep, for at most the connection's busy timeout. That is safe: SQLite undoes
a statement that fails so (the statement, not the transaction around it), and running it
again once the lock is gone is what ``sqlite3_unlock_notify``'s documented use does
(``sqlite3_blocking_step``). Two transactions that wait for each other still end, as on a
file: one gives up after the timeout and its transaction rolls back. ``executemany`` is
not retried (rows before the failing one took effect). Database files and PostgreSQL never
see this wrapper.
"""

from __future__ import annotations

import sqlite3
import time
from typing import Any

from django.db import OperationalError, connections
from django.db.backends.signals import connection_created

#: The busy timeout of Python's sqlite3 (and so Django's) when ``OPTIONS`` sets none.
DEFAULT_TIMEOUT = 5.0
#: The longest sleep between two tries: locks in a test are held for milliseconds.
MAX_SLEEP = 0.05


def shared_cache(connection: Any) -> bool:
    """Is ``connection`` an SQLite connection to a shared cache (Django's in-memory test
    database, or any ``cache=shared`` URI)?"""
    return connection.vendor == "sqlite" and "cache=shared" in str(
        connection.settings_dict.get("NAME") or "")


def table_locked(exc: BaseException) -> bool:
    """Did SQLite refuse the statement for another connection's table lock?"""
    cause = exc.__cause__ if isinstance(exc.__cause__, sqlite3.Error) else exc
    code = getattr(cause, "sqlite_errorcode", None)
    if code is not None:
        return bool(code & 0xFF == sqlite3.SQLITE_LOCKED)  # also SQLITE_LOCKED_SHAREDCACHE
    return "is locked" in str(cause) and "database is locked" not in str(cause)


def wait_for_table_locks(execute: Any, sql: str, params: Any, many: bool,
                         context: dict[str, Any]) -> Any:
    """A Django execute wrapper: run the statement again while another connection's table
    lock refuses it, up to the connection's busy timeout (see the module's docstring)."""
    if many:
        return execute(sql, params, many, context)
    deadline = None
    pause = 0.001
    while True:
        try:
            return execute(sql, params, many, context)
        except OperationalError as exc:
            if not table_locked(exc):
                raise
            now = time.monotonic()
            if deadline is None:
                options = context["connection"].settings_dict.get("OPTIONS") or {}
                deadline = now + float(options.get("timeout", DEFAULT_TIMEOUT))
            if now >= deadline:
                raise
            time.sleep(min(pause, deadline - now))
            pause = min(pause * 2, MAX_SLEEP)


def _on_connection_created(sender: Any, connection: Any, **kwargs: Any) -> None:
    if shared_cache(connection) and wait_for_table_locks not in connection.execute_wrappers:
        connection.execute_wrappers.append(wait_for_table_locks)


def install() -> None:
    """Wait out table locks on every shared-cache connection opened from now on."""
    connection_created.connect(_on_connection_created, dispatch_uid="kipekee-sqlite-locks")
    for connection in connections.all(initialized_only=True):  # opened before (this thread's)
        _on_connection_created(None, connection)
