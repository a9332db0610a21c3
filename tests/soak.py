"""The random-fault soak (issue 17): N mails through two real SMTP servers that follow a
random fault schedule, real ``kipekee_worker`` processes killed -9 at random moments,
database errors, signal receivers that raise; then the outbox's promises are checked.

Used by ``tests/test_soak.py`` (N = 1,000, in ``make test`` on SQLite and PostgreSQL) and
``bench/soak.py`` (N = 10,000, figures). Everything random comes from one seed: the
schedule of faults, kills and database errors, the mails and their recipients. Threads
and processes interleave as the machine lets them, so a seed replays the same schedule,
not the same interleaving; a failure prints the seed and the figures.

What is injected (each a window of a random length, chosen independently per server):

- ``421`` at connect (busy banner), a connection that stalls past the client's timeout
  before the banner, the server stopped (connection refused, sessions cut);
- ``451`` / ``553`` to ``MAIL FROM`` (``553``: sender not owned, provider-level: fails over);
- ``451`` / ``452`` to a random third of the recipients (a partial refusal of a mail
  with several recipients writes a follow-up row);
- ``451`` / ``554`` after the data (``554``: the message is refused, a permanent failure
  of that message only), a connection dropped in the middle of the data;
- slow answers (every reply late, a DATA reply late but inside the timeout), an answer
  to a message the server has taken *after* the client's timeout (the reply after the
  final dot has a wait of its own, ``final_reply_timeout``: it must be received, the
  message sent once), and no answer at all within that wait (the one fault where a
  resend is the same message twice, by design: the sender cannot know);
- TLS failure on the STARTTLS server (no protocol both sides accept);
- worker processes killed with SIGKILL (and replaced), the workers' database sessions
  killed (PostgreSQL) or the database write-locked longer than the workers wait (SQLite);
- receivers of ``kipekee.signals`` that raise, in the workers (tests/app/apps.py).

Mails to "poison" recipients (refused ``550 5.1.1`` by both servers, always) run among
the rest: they must fail alone.

The promises checked (:func:`check`): every recipient of every mail is delivered, or
recorded failed with a reason (the row ``failed`` with its error, or the recipient's 5xx
reply on a ``sent`` row); no row left ``sending``, none ``deferred`` without a next time;
attempts on every row ≤ MAX_ATTEMPTS and one attempt log entry at most per attempt; an
extra copy of a message at the servers (counted per Message-ID and recipient) only for a
message that had an attempt whose outcome was never recorded (its worker killed or cut
off from the database mid-delivery), or whose acceptance never reached the client (the
server never answered within ``final_reply_timeout``, or the connection was cut before
it); claims per mail bounded by the retry policy (:func:`claim_bound`: no spin); a poison
mail never delivered, and failed for its own reason only; no other mail failed with the
poison's reason.
"""

from __future__ import annotations

import math
import os
import random
import re
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from django.db import connection
from django.utils import timezone

import kipekee
from kipekee.models import Attempt, OutboxEmail, Status
from kipekee.testing import Faults, LocalSMTPServer

ROOT = Path(__file__).resolve().parent.parent

POISON_REPLY = "550 5.1.1 soak: no such user"
TIMEOUT = 1.0  # the providers' inactivity timeout, seconds
# The wait for the reply after the final dot (the providers' ``final_reply_timeout``):
# RFC 5321's 10 minutes by default, shortened here so that a server that never answers
# costs the soak seconds, not minutes.
FINAL_REPLY_TIMEOUT = 4.0
LATE = TIMEOUT + 1.5  # an answer after the client's timeout, within FINAL_REPLY_TIMEOUT
NO_ANSWER = FINAL_REPLY_TIMEOUT + 1.5  # an answer after the client gave up waiting

SETTINGS: dict[str, Any] = {
    "ENGINE": None,  # the workers are processes of their own
    "RETRY": {"BASE_DELAY": 0.1, "MAX_DELAY": 1.0, "MAX_ATTEMPTS": 12, "LIFETIME_SECONDS": 3600},
    # Short, so a killed worker's rows come back quickly; a live worker renews its leases.
    "LEASE_SECONDS": 3,
    "CIRCUIT_BREAKER": {"FAILURES": 5, "COOLDOWN_SECONDS": 0.5},
}


@dataclass
class Config:
    n: int = 1000
    seed: int = 0
    workers: int = 2
    concurrency: int = 2
    batch_size: int = 10
    chaos_seconds: float = 30.0
    """Faults, kills and database errors stop after this long (or when every mail is
    settled); then the servers are healthy and the outbox must drain."""
    settle_seconds: float = 90.0
    kill_every: tuple[float, float] = (3.0, 8.0)
    """Seconds between two kills, drawn uniformly; (0, 0): no kills."""
    db_fault_every: tuple[float, float] = (2.0, 6.0)
    """Seconds between two database faults; (0, 0): none."""
    outage_every: tuple[float, float] = (4.0, 10.0)
    """Seconds between two outages of both servers at once."""
    poison_share: float = 0.02
    multi_share: float = 0.1
    """Mails with 2-3 recipients (partial refusals, follow-up rows)."""
    raise_share: float = 0.05
    """Share of signal deliveries whose receiver raises, in the workers."""


@dataclass
class Figures:
    seed: int
    database: str
    mails: int = 0
    recipients: int = 0
    rows: int = 0
    follow_ups: int = 0
    faults: Counter[str] = field(default_factory=Counter)
    kills: int = 0
    outages: int = 0
    db_faults: int = 0
    receiver_raises: int = 0
    delivered: int = 0
    failed_recipients: int = 0
    poison_failed: int = 0
    lost: int = 0
    extra_copies: int = 0
    extra_after_crash: int = 0
    extra_after_late_answer: int = 0
    extra_unexplained: int = 0
    unrecorded_attempts: int = 0
    max_attempts: int = 0
    attempts_per_mail: float = 0.0
    claims_per_mail: float = 0.0
    max_claims: int = 0
    spare_claims: int = 0
    """Claims that were not attempts (passed over for open circuits, given back by a
    stopping worker), over all mails."""
    max_spare_claims: int = 0
    closest_claims: tuple[int, int] = (0, 0)
    """(claims, bound) of the mail that came closest to its bound (:func:`claim_bound`)."""
    sent_rows: int = 0
    failed_rows: int = 0
    failed_reasons: Counter[str] = field(default_factory=Counter)
    wall_seconds: float = 0.0
    startup_seconds: float = 0.0
    chaos_seconds: float = 0.0
    violations: list[str] = field(default_factory=list)
    timeline: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        faults = ", ".join(f"{name} {count}" for name, count in sorted(self.faults.items()))
        reasons = ", ".join(f"{name} {count}" for name, count in self.failed_reasons.most_common())
        return [
            f"soak seed={self.seed} database={self.database}",
            (f"  mails {self.mails:,} ({self.recipients:,} recipients), rows {self.rows:,} "
             f"({self.follow_ups} follow-up rows); wall {self.wall_seconds:.1f} s "
             f"(mails written and workers up after {self.startup_seconds:.1f} s, faults "
             f"until {self.chaos_seconds:.1f} s)"),
            f"  fault windows: {faults}",
            (f"  outages of both servers {self.outages}, "
             f"worker kills (SIGKILL) {self.kills}, database faults {self.db_faults}, "
             f"receivers raised {self.receiver_raises}"),
            (f"  recipients delivered {self.delivered:,}, "
             f"recorded failed {self.failed_recipients:,} "
             f"(poison {self.poison_failed}), lost {self.lost}"),
            (f"  extra copies {self.extra_copies} (after a crash or a cut-off worker "
             f"{self.extra_after_crash}, after an acceptance that never reached the client "
             f"{self.extra_after_late_answer}, unexplained {self.extra_unexplained}); "
             f"attempts never recorded {self.unrecorded_attempts}"),
            (f"  attempts per mail: mean {self.attempts_per_mail:.2f}, max {self.max_attempts} "
             f"(MAX_ATTEMPTS {SETTINGS['RETRY']['MAX_ATTEMPTS']})"),
            (f"  claims per mail: mean {self.claims_per_mail:.2f}, max {self.max_claims}; "
             f"claims that were not attempts {self.spare_claims:,} (max {self.max_spare_claims} "
             f"for a mail); closest to its bound: {self.closest_claims[0]} claims "
             f"of {self.closest_claims[1]} allowed"),
            f"  rows sent {self.sent_rows:,}, failed {self.failed_rows:,}: {reasons or '-'}",
            "  outbox over time: " + " | ".join(self.timeline),
            *(f"  VIOLATION: {v}" for v in self.violations[:30]),
        ]

    def as_dict(self) -> dict[str, Any]:
        data = dict(vars(self))
        data["faults"] = dict(self.faults)
        data["failed_reasons"] = dict(self.failed_reasons)
        return data


# --- the fault schedule ----------------------------------------------------------------


def _profiles(addresses: list[str]) -> list[tuple[str, int, Callable[[random.Random], Faults]]]:
    """(name, weight, make) of each fault window; ``make`` builds the server's Faults."""

    def some(rng: random.Random, replies: list[str]) -> dict[str, str]:
        return {a: rng.choice(replies) for a in rng.sample(addresses, len(addresses) // 3)}

    return [
        ("healthy", 40, lambda rng: Faults()),
        ("421 at connect", 4, lambda rng: Faults(greeting="421 4.3.2 soak: busy")),
        ("stall before banner", 2, lambda rng: Faults(stall_greeting=LATE)),
        ("451 to MAIL", 4, lambda rng: Faults(mail_reply="451 4.3.0 soak: local error")),
        ("553 to MAIL (provider-level)", 3,
         lambda rng: Faults(mail_reply="553 5.7.1 soak: sender not owned by this account")),
        ("451/452 to RCPT", 5, lambda rng: Faults(refuse_recipients=some(
            rng, ["451 4.2.1 soak: mailbox busy", "452 4.2.2 soak: mailbox full"]))),
        ("451 after DATA", 4, lambda rng: Faults(
            data_replies=["451 4.3.0 soak: queue full"] * rng.randint(1, 20))),
        ("554 after DATA", 2, lambda rng: Faults(
            data_replies=["554 5.7.1 soak: message refused"] * rng.randint(1, 3))),
        ("drop mid-DATA", 4, lambda rng: Faults(drop_mid_data=True)),
        ("slow answers", 4, lambda rng: Faults(reply_latency=rng.uniform(0.02, 0.1),
                                               stall_before_data_reply=rng.uniform(0, 0.3))),
        ("answer after the timeout", 2, lambda rng: Faults(stall_before_data_reply=LATE)),
        ("no answer after the data", 1, lambda rng: Faults(stall_before_data_reply=NO_ANSWER)),
        ("server down", 3, lambda rng: Faults()),  # the server is stopped for the window
        ("TLS failure", 3, lambda rng: Faults()),  # the STARTTLS server offers no usable TLS
    ]


def broken_tls_context() -> Any:
    """A server context with no certificate: every handshake fails (no shared cipher)."""
    import ssl

    return ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)


class Chaos:
    """Changes one server's faults at random moments, from its own seeded generator."""

    def __init__(self, server: LocalSMTPServer, rng: random.Random, addresses: list[str],
                 poison: dict[str, str], figures: Figures, label: str) -> None:
        self.server, self.rng, self.poison, self.figures = server, rng, poison, figures
        self.label = label
        self.profiles = [p for p in _profiles(addresses)
                         if p[0] != "TLS failure" or server.tls == "starttls"]
        self.good_tls = server.ssl_context
        # (name, start, end) of each window and the moments the server was stopped, on
        # time.monotonic(): copies taken just then may never have been acknowledged.
        self.windows: list[tuple[str, float, float]] = []
        self.stops: list[float] = []
        self.stopping = threading.Event()
        self._wake = threading.Event()  # a forced window, or the end
        self._forced: tuple[str, float] | None = None
        self.thread = threading.Thread(target=self._run, name=f"chaos-{label}", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        self._wake.set()
        self.thread.join(30)
        self._apply("healthy", Faults())

    def unacknowledged(self, at: float) -> bool:
        """Whether a copy the server took at ``at`` may never have reached the client as
        accepted: taken in a "no answer after the data" window (the server answers after
        the client stopped waiting), or while the server held its answer when it was
        stopped (the longest hold: an answer after the timeout)."""
        margin = 0.05
        return any(name == "no answer after the data" and start - margin <= at <= end + margin
                   for name, start, end in self.windows) or any(
            stop - LATE - margin <= at <= stop + margin for stop in self.stops)

    def _apply(self, name: str, faults: Faults) -> None:
        faults.refuse_recipients = {**faults.refuse_recipients, **self.poison}
        now = time.monotonic()
        if self.windows:
            self.windows[-1] = (*self.windows[-1][:2], now)
        self.windows.append((name, now, float("inf")))
        if name == "server down" and self.server.running:
            self.stops.append(time.monotonic())
            self.server.stop()
        elif not self.server.running:
            self.server.start()
        self.server.ssl_context = (broken_tls_context() if name == "TLS failure"
                                   else self.good_tls)
        self.server.faults = faults

    def force(self, name: str, seconds: float) -> None:
        """The next window is ``name``, for ``seconds`` (both servers at once: an outage
        failover cannot route around, which spends attempts)."""
        self._forced = (name, seconds)
        self._wake.set()

    def _run(self) -> None:
        names = [p[0] for p in self.profiles]
        weights = [p[1] for p in self.profiles]
        makers = {p[0]: p[2] for p in self.profiles}
        while not self.stopping.is_set():
            forced, self._forced = self._forced, None
            if forced is not None:
                name, seconds = forced
            else:
                [name] = self.rng.choices(names, weights)
                seconds = self.rng.uniform(0.2, 1.5)
            if name != "healthy":
                self.figures.faults[name] += 1
            self._apply(name, makers[name](self.rng))
            self._wake.wait(seconds)
            self._wake.clear()


# --- workers, kills, database faults ---------------------------------------------------


def worker_env(kipekee_settings: dict[str, Any], config: Config, index: int) -> dict[str, str]:
    from .conftest import subprocess_env

    return {**subprocess_env(kipekee_settings), "KIPEKEE_LOG_LEVEL": "WARNING",
            "KIPEKEE_SOAK_RAISE": str(config.raise_share),
            "KIPEKEE_SOAK_SEED": str(config.seed * 1000 + index),
            # Shorter than the soak's write locks: a worker sees "database is locked".
            "KIPEKEE_SQLITE_TIMEOUT": "0.5"}


class Workers:
    def __init__(self, kipekee_settings: dict[str, Any], config: Config, log_dir: Path) -> None:
        self.settings, self.config, self.log_dir = kipekee_settings, config, log_dir
        self.procs: list[subprocess.Popen[str]] = []
        self.started = 0

    def spawn(self) -> subprocess.Popen[str]:
        index = self.started
        self.started += 1
        log = open(self.log_dir / f"worker-{index}.log", "w+")  # noqa: SIM115 - closed in stop()
        proc = subprocess.Popen(
            [sys.executable, "-m", "django", "kipekee_worker", "--concurrency",
             str(self.config.concurrency), "--batch-size", str(self.config.batch_size),
             "--poll-interval", "0.2", "--name", f"soak-{index}"],
            cwd=ROOT, env=worker_env(self.settings, self.config, index), stdout=log,
            stderr=subprocess.STDOUT, text=True)
        proc.log = log  # type: ignore[attr-defined]
        proc.engine_name = f"soak-{index}"  # type: ignore[attr-defined]
        self.procs.append(proc)
        return proc

    def live(self) -> list[subprocess.Popen[str]]:
        return [p for p in self.procs if p.poll() is None]

    def running(self) -> list[subprocess.Popen[str]]:
        """Live workers past their start-up (they wrote a heartbeat): a kill while
        Django is still importing would test nothing."""
        from kipekee.models import EngineHeartbeat

        beating = set(EngineHeartbeat.objects.values_list("name", flat=True))
        return [p for p in self.live() if p.engine_name in beating]  # type: ignore[attr-defined]

    def stop(self) -> list[str]:
        for p in self.live():
            p.send_signal(signal.SIGTERM)
        problems = []
        for p in self.procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
                problems.append(f"worker {p.pid} did not stop within 60 s of SIGTERM")
        return problems

    def output(self) -> str:
        text = []
        for p in self.procs:
            p.log.seek(0)  # type: ignore[attr-defined]
            text.append(p.log.read())  # type: ignore[attr-defined]
        return "\n".join(text)


def kill_database_sessions() -> None:
    """PostgreSQL: end every session of the test database but this one (a restart, a
    failover, an idle reaper). SQLite: see :class:`SqliteLock`."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                       "WHERE datname = current_database() AND pid <> pg_backend_pid()")


def lock_sqlite(path: str, seconds: float) -> None:
    """Hold SQLite's write lock for ``seconds``: writers that wait less get "database is
    locked" (an OperationalError), as from a long migration or a backup."""
    db = sqlite3.connect(path, timeout=30, isolation_level=None)
    try:
        db.execute("BEGIN IMMEDIATE")
        time.sleep(seconds)
        db.execute("ROLLBACK")
    finally:
        db.close()


# --- the run ---------------------------------------------------------------------------


def enqueue(config: Config, rng: random.Random
            ) -> tuple[dict[str, list[str]], set[str], dict[str, str]]:
    """Write the mails (send_many, in chunks); (Message-ID → recipients, poison
    Message-IDs, poison address → reply)."""
    mails: dict[str, list[str]] = {}
    poison_ids: set[str] = set()
    poison: dict[str, str] = {}
    batch: list[tuple[kipekee.Email, bool]] = []

    def flush() -> None:
        receipts = kipekee.send_many([email for email, _ in batch], mode="queue")
        for receipt, (email, is_poison) in zip(receipts, batch, strict=True):
            mails[receipt.message_id] = list(email.to)
            if is_poison:
                poison_ids.add(receipt.message_id)
        batch.clear()

    for i in range(config.n):
        is_poison = rng.random() < config.poison_share
        count = rng.choice([2, 3]) if rng.random() < config.multi_share else 1
        to = [f"c{i}-{k}@soak.example" for k in range(count)]
        if is_poison:
            to = [f"nobody{i}@soak.example"]
            poison[to[0]] = POISON_REPLY
        batch.append((kipekee.Email(to=to, subject=f"Soak {i}", text=f"mail {i}",
                                    html=f"<p>mail {i}</p>"), is_poison))
        if len(batch) == 250:
            flush()
    if batch:
        flush()
    return mails, poison_ids, poison


def run(config: Config, primary: LocalSMTPServer, backup: LocalSMTPServer,
        kipekee_settings: dict[str, Any], addresses_hint: int | None = None) -> Figures:
    """Run the soak against the two (started) servers; the settings name them as the
    providers ``primary`` and ``backup``. Returns the figures, violations included."""
    figures = Figures(seed=config.seed, database=connection.vendor)
    rng = random.Random(config.seed)
    started = time.monotonic()
    # The recipients are known before the mails are written: fault windows refuse some.
    mails_rng = random.Random(rng.random())
    mails, poison_ids, poison = enqueue(config, mails_rng)
    addresses = [a for to in mails.values() for a in to]
    arrivals: dict[tuple[str, str], list[tuple[int, float]]] = defaultdict(list)

    def arrived(index: int) -> Callable[[Any], None]:
        def on_message(message: Any) -> None:
            at = time.monotonic()
            for rcpt in message.rcpt_tos:
                arrivals[(message.message_id or "", rcpt.lower())].append((index, at))
        return on_message

    for index, server in enumerate((primary, backup)):
        server.faults = Faults(refuse_recipients=dict(poison))
        server.on_message = arrived(index)
    chaos = [Chaos(server, random.Random(rng.random()), addresses, poison, figures, label)
             for server, label in ((primary, "primary"), (backup, "backup"))]
    log_dir = Path(tempfile.mkdtemp(prefix="kipekee-soak-"))
    workers = Workers(kipekee_settings, config, log_dir)
    for _ in range(config.workers):
        workers.spawn()
    schedule = random.Random(rng.random())
    sqlite_path = connection.settings_dict["NAME"] if connection.vendor == "sqlite" else None
    problems: list[str] = []
    up_by = time.monotonic() + 120
    while len(workers.running()) < config.workers and time.monotonic() < up_by:
        time.sleep(0.2)
    figures.startup_seconds = time.monotonic() - started
    for c in chaos:
        c.start()
    try:
        chaos_end = time.monotonic() + config.chaos_seconds
        next_kill = time.monotonic() + schedule.uniform(*config.kill_every)
        next_db_fault = time.monotonic() + schedule.uniform(*config.db_fault_every)
        next_outage = time.monotonic() + schedule.uniform(*config.outage_every)
        # The first of each also falls, at the latest, when a random 5-30 % of the mails
        # are settled, while mail is surely in flight: a fast drain (1,000 mails settle
        # in 2 s on a quiet machine) must not end before the first kill, database fault
        # or outage, whatever the machine's speed.
        first_kill, first_db_fault, first_outage = (schedule.uniform(0.05, 0.3)
                                                    for _ in range(3))
        next_sample = time.monotonic()
        while time.monotonic() < chaos_end and _unsettled():
            now = time.monotonic()
            if not (figures.kills and figures.db_faults and figures.outages):
                settled = _settled_share(config.n)  # a COUNT: only while a first is due
                if not figures.kills and settled >= first_kill:
                    next_kill = min(next_kill, now)
                if not figures.db_faults and settled >= first_db_fault:
                    next_db_fault = min(next_db_fault, now)
                if not figures.outages and settled >= first_outage:
                    next_outage = min(next_outage, now)
            if config.kill_every[0] and now >= next_kill:
                running = workers.running()
                # Only when every worker is up: one keeps sending while the other restarts.
                if len(running) >= config.workers:
                    victim = schedule.choice(running)
                    victim.kill()  # SIGKILL: no chance to record or release anything
                    victim.wait()
                    figures.kills += 1
                    workers.spawn()
                next_kill = now + schedule.uniform(*config.kill_every)
            if now >= next_outage:
                # Both providers failing at once (failover cannot help): attempts are spent.
                name = schedule.choice(["451 to MAIL", "451 after DATA", "421 at connect",
                                        "drop mid-DATA"])
                seconds = schedule.uniform(1.0, 4.0)
                figures.outages += 1
                for c in chaos:
                    c.force(name, seconds)
                next_outage = now + seconds + schedule.uniform(*config.outage_every)
            if now >= next_sample:
                figures.timeline.append(_sample(now - started))
                next_sample = now + 5
            if config.db_fault_every[0] and now >= next_db_fault:
                figures.db_faults += 1
                if sqlite_path is None:
                    kill_database_sessions()
                else:
                    lock_sqlite(sqlite_path, schedule.uniform(0.6, 1.5))
                next_db_fault = time.monotonic() + schedule.uniform(*config.db_fault_every)
            time.sleep(0.1)
        figures.chaos_seconds = time.monotonic() - started
        for c in chaos:
            c.stop()
        settle_end = time.monotonic() + config.settle_seconds
        while _unsettled() and time.monotonic() < settle_end:
            if time.monotonic() >= next_sample:
                figures.timeline.append(_sample(time.monotonic() - started))
                next_sample = time.monotonic() + 5
            time.sleep(0.2)
        figures.timeline.append(_sample(time.monotonic() - started))
    finally:
        for c in chaos:
            c.stopping.set()
        problems += workers.stop()
    figures.wall_seconds = time.monotonic() - started
    output = workers.output()
    figures.receiver_raises = output.count("raised for outbox email")
    def unacknowledged(key: tuple[str, str]) -> int:
        return sum(1 for index, at in arrivals.get(key, ()) if chaos[index].unacknowledged(at))

    check(figures, mails, poison_ids, [primary, backup], problems, unacknowledged,
          workers_started=workers.started)
    if figures.violations:
        (log_dir / "figures.txt").write_text("\n".join(figures.lines()))
        figures.violations.append(f"worker logs in {log_dir}")
    return figures


def _sample(at: float) -> str:
    from django.db.models import Max, Min

    counts = Counter(OutboxEmail.objects.values_list("status", flat=True))
    text = (f"{at:5.1f} s: " + ", ".join(f"{status} {counts[status]}" for status in
            ("sent", "failed", "deferred", "queued", "sending") if counts[status]))
    if counts["deferred"]:
        due = OutboxEmail.objects.filter(status=Status.DEFERRED).aggregate(
            first=Min("due_at"), last=Max("due_at"))
        now = timezone.now()
        text += (f" (due in {(due['first'] - now).total_seconds():.1f}"
                 f"..{(due['last'] - now).total_seconds():.1f} s)")
    return text


def _settled_share(mails: int) -> float:
    """The share of the mails whose rows are settled (sent, failed or suppressed)."""
    return OutboxEmail.objects.filter(
        status__in=[Status.SENT, Status.FAILED, Status.SUPPRESSED]).count() / mails


def _unsettled() -> bool:
    return OutboxEmail.objects.exclude(
        status__in=[Status.SENT, Status.FAILED, Status.SUPPRESSED]).exists()


def check(figures: Figures, mails: dict[str, list[str]], poison_ids: set[str],
          servers: list[LocalSMTPServer], problems: list[str],
          unacknowledged: Callable[[tuple[str, str]], int], *, workers_started: int = 0) -> None:
    """Check the promises; fill ``figures`` (violations included)."""
    ended = timezone.now()
    v = figures.violations
    v.extend(problems)
    max_attempts = SETTINGS["RETRY"]["MAX_ATTEMPTS"]
    copies: Counter[tuple[str, str]] = Counter()
    for server in servers:
        for message in server.messages:
            for rcpt in message.rcpt_tos:
                copies[(message.message_id or "", rcpt.lower())] += 1
    rows = list(OutboxEmail.objects.order_by("pk"))
    attempts: dict[int, list[Attempt]] = defaultdict(list)
    for attempt in Attempt.objects.order_by("pk"):
        attempts[attempt.email_id].append(attempt)
    by_message: dict[str, list[OutboxEmail]] = defaultdict(list)
    for row in rows:
        by_message[row.message_id].append(row)
    figures.mails = len(mails)
    figures.recipients = sum(len(to) for to in mails.values())
    figures.rows = len(rows)
    figures.follow_ups = sum(1 for r in rows if "recipients_of" in r.metadata)
    unknown = set(by_message) - set(mails)
    if unknown:
        v.append(f"{len(unknown)} row(s) with Message-IDs the soak never wrote")
    strays = {mid for mid, _ in copies} - set(mails)
    if strays:
        v.append(f"{len(strays)} message(s) at the servers the soak never wrote")

    for row in rows:
        figures.max_attempts = max(figures.max_attempts, row.attempts)
        logged = [a.number for a in attempts[row.pk]]
        if row.attempts > max_attempts:
            v.append(f"row {row.pk}: {row.attempts} attempts > MAX_ATTEMPTS {max_attempts}")
        if len(logged) != len(set(logged)) or any(n > row.attempts for n in logged):
            v.append(f"row {row.pk}: attempt log {logged} for {row.attempts} attempts")
        if row.status == Status.SENDING:
            v.append(f"row {row.pk} left sending")
        elif row.status in (Status.QUEUED, Status.DEFERRED):
            if row.due_at is None:
                v.append(f"row {row.pk} {row.status} without a next time")
            elif row.attempts >= max_attempts:
                v.append(f"row {row.pk} {row.status} with no attempts left")
            else:
                v.append(f"row {row.pk} still {row.status} after the soak settled")
        elif row.status == Status.FAILED:
            figures.failed_rows += 1
            if not row.last_error or not row.error_kind:
                v.append(f"row {row.pk} failed without a recorded reason")
            figures.failed_reasons[_reason(row.last_error)] += 1
        elif row.status == Status.SENT:
            figures.sent_rows += 1
        else:
            v.append(f"row {row.pk} ended {row.status}")

    total_attempts = total_claims = 0
    closest = -1.0
    for mid, to in mails.items():
        family = by_message.get(mid, [])
        if not family:
            v.append(f"{mid}: no outbox row")
            continue
        # Attempts are numbered across a message's rows (a follow-up counts on).
        numbers = {a.number for row in family for a in attempts[row.pk]}
        made = max(row.attempts for row in family)
        total_attempts += made
        # Claims are counted per row (a follow-up starts at 0): every claim of the
        # message, attempts or not. No spin: see claim_bound().
        claims = sum(row.claims for row in family)
        spare = claims - made
        total_claims += claims
        figures.max_claims = max(figures.max_claims, claims)
        figures.spare_claims += spare
        figures.max_spare_claims = max(figures.max_spare_claims, spare)
        done = max((row.sent_at for row in family if row.sent_at), default=None) or ended
        lifetime = (done - min(row.created_at for row in family)).total_seconds()
        bound = claim_bound(made, lifetime, workers_started)
        if claims > bound:
            v.append(f"{mid}: claimed {claims} times ({made} attempts) in {lifetime:.0f} s, "
                     f"more than {bound}: a spin "
                     f"(rows {[(r.pk, r.status, r.attempts, r.claims) for r in family]})")
        if claims / bound > closest:
            closest = claims / bound
            figures.closest_claims = (claims, bound)
        unrecorded = sum(1 for n in range(1, made + 1) if n not in numbers)
        figures.unrecorded_attempts += unrecorded
        # Attempts where a provider's answer never reached the client (it timed out, or
        # the connection was cut, after the data may have been taken): on a loaded
        # machine an ordinary answer can come after the timeout too. The attempt log
        # keeps every provider's failure, a successful attempt's included.
        unanswered = sum(1 for row in family for a in attempts[row.pk]
                         if _UNANSWERED.search(a.error))
        for rcpt in to:
            key = rcpt.lower()
            got = copies[(mid, key)]
            final = _final_row(family, key)
            failed_reason = _failed_for(final, key) if final is not None else None
            if mid in poison_ids:
                if got:
                    v.append(f"poison {mid} delivered {got} time(s)")
                if failed_reason is None or "5.1.1 soak" not in failed_reason:
                    v.append(f"poison {mid} not recorded failed for its own reason: "
                             f"{failed_reason!r}")
                else:
                    figures.poison_failed += 1
            elif failed_reason is not None and "5.1.1 soak" in failed_reason:
                v.append(f"{mid} -> {rcpt} failed with the poison's reason: {failed_reason}")
            if failed_reason is not None:
                figures.failed_recipients += 1
                extra = got  # a copy of a mail recorded failed is an extra copy
            elif got == 0:
                figures.lost += 1
                v.append(f"{mid} -> {rcpt}: not delivered and not recorded failed "
                         f"(rows {[(r.pk, r.status, r.to) for r in family]})")
                continue
            else:
                figures.delivered += 1
                extra = got - 1
            if not extra:
                continue
            # Each extra copy needs a cause: an attempt of this message whose outcome was
            # never recorded (its worker killed, or cut off from the database, while it
            # sent), or a copy the server took without the client learning it was taken.
            figures.extra_copies += extra
            by_crash = min(extra, unrecorded)
            by_late = min(extra - by_crash, unacknowledged((mid, key)) + unanswered)
            figures.extra_after_crash += by_crash
            figures.extra_after_late_answer += by_late
            if extra - by_crash - by_late:
                figures.extra_unexplained += extra - by_crash - by_late
                v.append(f"{mid} -> {rcpt}: {extra} extra copies, {unrecorded} unrecorded "
                         f"attempt(s), {unacknowledged((mid, key))} unacknowledged copies, "
                         f"{unanswered} unanswered attempt(s) "
                         f"(rows {[(r.pk, r.status, r.attempts) for r in family]})")
    figures.attempts_per_mail = total_attempts / max(len(mails), 1)
    figures.claims_per_mail = total_claims / max(len(mails), 1)


def claim_bound(attempts: int, lifetime: float, workers_started: int) -> int:
    """The most claims a mail may have had, ``attempts`` made in ``lifetime`` seconds from
    its enqueue to its end, by the retry policy:

    - each attempt is one claim (a claim whose worker was killed, or whose lease
      expired, counts as an attempt: it is not given back);
    - a claim that is not an attempt is one passed over because every provider's circuit
      was open: the row then waits until the next trial plus a random part of a
      cool-down (``CircuitBreaker.postpone_for``), at least half a cool-down on average,
      so at most two such claims per cool-down of the mail's life; or one a stopping
      worker gave back (once per worker process at most); three more for the draws.

    A spin breaks it: a row taken again at once, again and again (issue 17 item 1's
    half-open breaker had rows re-claimed at the 0.2 s poll interval: five claims a
    second, the bound allows four), or claimed at every poll while a limiter defers it.
    """
    cooldown = float(SETTINGS["CIRCUIT_BREAKER"]["COOLDOWN_SECONDS"])
    return attempts + workers_started + 2 * math.ceil(lifetime / cooldown) + 3


_UNANSWERED = re.compile(r"timed out|deadline|disconnected|reset by peer", re.IGNORECASE)


def _final_row(family: list[OutboxEmail], rcpt: str) -> OutboxEmail | None:
    """The newest row of a message that has ``rcpt`` (a follow-up takes over)."""
    holding = [r for r in family if rcpt in {a.lower() for a in (*r.to, *r.cc, *r.bcc)}]
    return holding[-1] if holding else None


def _failed_for(row: OutboxEmail, rcpt: str) -> str | None:
    """Why ``rcpt`` of ``row`` will not get the mail, or None if it was (or will be) sent."""
    if row.status == Status.FAILED:
        return row.last_error or "(no reason)"
    refused = {k.lower(): str(why) for k, why in (row.refused or {}).items()}
    reply = refused.get(rcpt)
    if row.status == Status.SENT and reply is not None and reply[:1] == "5":
        return reply
    return None


def _reason(error: str) -> str:
    for pattern, name in ((r"5\.1\.1 soak", "poison 550"), (r"554 5\.7\.1 soak", "554 after DATA"),
                          (r"attempt", "attempts exhausted"), (r"lifetime|expired", "expired")):
        if re.search(pattern, error):
            return name
    return error[:60]


def seed_from_env() -> int:
    value = os.environ.get("KIPEKEE_SOAK_SEED")
    return int(value) if value else random.SystemRandom().randrange(1, 2**31)
