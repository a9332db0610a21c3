"""``manage.py kipekee_worker``: a thin shell around :class:`kipekee.engines.worker.Worker`."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Callable
from functools import partial
from types import FrameType
from typing import Any

from django.core.management.base import BaseCommand, CommandError

from kipekee.engines.worker import Prefork, Worker


def _positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return number


def _positive_float(value: str) -> float:
    number = float(value)
    if number <= 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return number


class Command(BaseCommand):
    help = "Deliver queued and deferred emails from the Kipekee outbox."

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--processes", type=_positive_int, default=1,
                            help="worker processes, each with --concurrency sender threads; "
                                 "more than one uses more than one core (1)")
        parser.add_argument("--concurrency", type=_positive_int, default=4,
                            help="sender threads per process, each with its own provider "
                                 "connections (4)")
        parser.add_argument("--batch-size", type=_positive_int, default=10,
                            help="rows a sender claims at a time (10)")
        parser.add_argument("--poll-interval", type=_positive_float, default=1.0,
                            help="seconds between polls when idle; "
                                 "PostgreSQL also wakes on NOTIFY (1)")
        parser.add_argument("--once", action="store_true",
                            help="deliver everything due now, then exit")
        parser.add_argument("--name", help="engine name in heartbeats (kind@host:pid)")

    def handle(self, *args: Any, **options: Any) -> None:
        if not logging.getLogger("kipekee").handlers and not logging.getLogger().handlers:
            handler = logging.StreamHandler(self.stdout)
            handler.setFormatter(
                logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
            logging.getLogger("kipekee").addHandler(handler)
            logging.getLogger("kipekee").setLevel(logging.INFO)
        if options["processes"] == 1:
            self._run_worker(options)
            return
        prefork = Prefork(options["processes"], partial(self._run_worker, options, child=True),
                          once=options["once"])
        # Each process: the first signal stops, a second exits at once.
        self._on_stop_signals((signal.SIGTERM, signal.SIGINT),
                              "the worker processes finish the batches in hand",
                              on_first=prefork.stop, on_later=prefork.stop)
        failed = prefork.run()
        if failed:
            raise CommandError(f"{failed} worker process(es) exited with an error (see the log)")

    def _run_worker(self, options: dict[str, Any], child: bool = False) -> None:
        """One worker in this process, stopped by SIGTERM (and SIGINT, unless it is one of
        ``--processes``: then the supervisor forwards a Ctrl-C as SIGTERM)."""
        worker = Worker(concurrency=options["concurrency"], batch_size=options["batch_size"],
                        poll_interval=options["poll_interval"], once=options["once"],
                        name=(options["name"] if options["processes"] == 1 or not options["name"]
                              else f"{options['name']}:{os.getpid()}"))
        self._on_stop_signals((signal.SIGTERM,) if child else (signal.SIGTERM, signal.SIGINT),
                              "finishing the batches in hand", on_first=worker.stop,
                              on_later=_exit_now)
        worker.run()

    def _on_stop_signals(self, signums: tuple[signal.Signals, ...], saying: str, *,
                         on_first: Callable[[], None], on_later: Callable[[], None]) -> None:
        """On the first of ``signums``, say ``saying`` and call ``on_first``; on any later
        one, call ``on_later``."""
        stops = 0

        def on_signal(signum: int, frame: FrameType | None) -> None:
            nonlocal stops
            stops += 1
            if stops == 1:
                self.stderr.write(f"{signal.Signals(signum).name}: {saying} "
                                  "(again to exit at once)")
                on_first()
            else:
                on_later()

        for signum in signums:
            signal.signal(signum, on_signal)


def _exit_now() -> None:
    # Rows still leased are reclaimed by any engine when their lease expires.
    sys.stderr.flush()
    os._exit(1)
