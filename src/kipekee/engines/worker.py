"""``Worker``: the dedicated engine behind ``manage.py kipekee_worker``.

``concurrency`` sender threads each claim batches and deliver them over their own
provider connections. The worker wakes promptly: on PostgreSQL it LISTENs for the
``NOTIFY`` that enqueue sends (delivered when the enqueuing transaction commits);
elsewhere it polls every ``poll_interval`` seconds. ``stop()`` (the first SIGTERM) lets
every thread finish the batch it holds and exit; the command exits at once on a second.
"""

from __future__ import annotations

import logging
import threading
import time

from django.db import connection, connections, router

from ..models import OutboxEmail
from . import Sender, Stats, beat, engine_name

logger = logging.getLogger("kipekee.worker")

NOTIFY_CHANNEL = "kipekee_outbox"
HEARTBEAT_SECONDS = 5.0
LOG_SECONDS = 10.0


class Worker:
    def __init__(self, *, concurrency: int = 1, batch_size: int = 10,
                 poll_interval: float = 1.0, once: bool = False, name: str | None = None,
                 kind: str = "worker") -> None:
        if concurrency < 1 or batch_size < 1 or poll_interval <= 0:
            raise ValueError("concurrency and batch_size must be >= 1, poll_interval > 0")
        self.concurrency = concurrency
        self.batch_size = batch_size
        self.poll_interval = poll_interval
        self.once = once
        self.kind = kind
        self.name = name or engine_name(kind)
        self.stats = Stats()
        self._stopping = threading.Event()
        self._wake = threading.Event()
        self._idle: list[bool] = [False] * concurrency

    def stop(self) -> None:
        """Finish the batches in hand, then return from :meth:`run`."""
        self._stopping.set()
        self._wake.set()

    def run(self) -> None:
        beat(self.name, self.kind, self.stats)
        logger.info("%s started: %d sender thread(s), batches of %d", self.name,
                    self.concurrency, self.batch_size)
        threads = [threading.Thread(target=self._send_loop, args=(i,), name=f"kipekee-sender-{i}",
                                    daemon=True) for i in range(self.concurrency)]
        for thread in threads:
            thread.start()
        listener = None if self.once else _Listener.start(self._wake, self.poll_interval)
        started = last_log = last_beat = time.monotonic()
        logged = (0, 0, 0)
        try:
            while any(t.is_alive() for t in threads):
                for t in threads:
                    t.join(timeout=0.2)
                now = time.monotonic()
                if now - last_beat >= HEARTBEAT_SECONDS:
                    beat(self.name, self.kind, self.stats)
                    last_beat = now
                if now - last_log >= LOG_SECONDS:
                    logged = self._log(logged, now - last_log)
                    last_log = now
        finally:
            if listener is not None:
                listener.stop()
            beat(self.name, self.kind, self.stats, stopped=True)
            sent, deferred, failed = self.stats.snapshot()
            logger.info("%s stopped: sent=%d deferred=%d failed=%d in %.1f s", self.name,
                        sent, deferred, failed, time.monotonic() - started)
            connection.close()

    def _log(self, before: tuple[int, int, int], seconds: float) -> tuple[int, int, int]:
        now = self.stats.snapshot()
        rate = (now[0] - before[0]) / seconds if seconds else 0.0
        logger.info("%s: sent=%d deferred=%d failed=%d (%.1f sent/s)", self.name, *now, rate)
        return now

    def _send_loop(self, index: int) -> None:
        sender = Sender(engine=self.name, batch_size=self.batch_size, stats=self.stats)
        try:
            while not self._stopping.is_set():
                try:
                    handled = sender.drain(self._stopping)
                except Exception:  # noqa: BLE001 - a database blip must not kill the thread
                    logger.exception("%s sender %d: batch failed; its rows are retried after "
                                     "their lease", self.name, index)
                    handled = 0
                    self._stopping.wait(self.poll_interval)
                if handled:
                    self._idle[index] = False
                    continue
                self._idle[index] = True
                if self.once and all(self._idle):
                    return
                self._wake.wait(self.poll_interval)
                self._wake.clear()
        finally:
            sender.close()


class _Listener:
    """LISTEN for enqueue notifications on PostgreSQL, setting ``wake`` for each."""

    def __init__(self, wake: threading.Event, poll_interval: float, db: str) -> None:
        self.wake = wake
        self._db = db
        self.poll_interval = poll_interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kipekee-listen", daemon=True)

    @classmethod
    def start(cls, wake: threading.Event, poll_interval: float) -> _Listener | None:
        db = router.db_for_write(OutboxEmail)
        if connections[db].vendor != "postgresql":
            return None  # polling only
        listener = cls(wake, poll_interval, db)
        listener._thread.start()
        return listener

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.poll_interval + 1)

    def _run(self) -> None:
        import psycopg

        params = connections[self._db].get_connection_params()
        params.pop("cursor_factory", None)
        params.pop("context", None)
        try:
            with psycopg.connect(**params, autocommit=True) as conn:
                conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
                while not self._stop.is_set():
                    for _ in conn.notifies(timeout=self.poll_interval, stop_after=1):
                        self.wake.set()
        except psycopg.Error as exc:
            # Without LISTEN the senders still poll every poll_interval: slower, not lost.
            logger.warning("LISTEN %s failed (%s); falling back to polling", NOTIFY_CHANNEL, exc)


def notify_if_listening(using: str) -> None:
    """Inside the enqueuing transaction: wake LISTENing workers when it commits."""
    if connections[using].vendor == "postgresql":
        with connections[using].cursor() as cursor:
            cursor.execute(f"NOTIFY {NOTIFY_CHANNEL}")


__all__ = ["Worker", "notify_if_listening"]
