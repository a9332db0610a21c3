"""The ``KIPEKEE`` setting: defaults, validation, and the one place it is read.

Everything in Kipekee reads settings through :func:`get`. The parsed value is cached and
dropped whenever Django's ``setting_changed`` fires, so ``override_settings`` works.

Example::

    KIPEKEE = {
        "PROVIDERS": {  # failover order
            "primary": {
                "BACKEND": "kipekee.backends.smtp.EmailBackend",
                "OPTIONS": {"host": "smtp.example.com", "use_tls": True,
                            "username": "...", "password": os.environ["SMTP_PASSWORD"]},
            },
            "backup": {"BACKEND": "...", "OPTIONS": {...}},
            # Or an entry of Django 6.1's MAILERS, not repeated here:
            "postmark": {"MAILER": "postmark", "LIMITS": {"RATE": "50/s"}},
        },
        "MODE": "hybrid",               # now | hybrid | queue
        "NOW_RETRY_DELAYS": [1, 2, 4],  # in-request retries (mode "now")
        "NOW_TIME_BUDGET": 10,          # seconds a request may spend on one email
    }
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Literal, cast
from urllib.parse import urlsplit

from django.conf import settings as django_settings
from django.core.exceptions import ValidationError
from django.core.signals import setting_changed
from django.core.validators import validate_email

from .exceptions import ConfigurationError, InvalidMessage, UnknownProvider

_RATE = re.compile(r"^\s*(\d+)\s*/\s*(\d*\.?\d*)\s*(s|m|h|d)\s*$")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400}


@dataclass(frozen=True, kw_only=True)
class Rate:
    """A rate limit: at most ``count`` in any ``per`` seconds (``LIMITS["RATE"]``, a
    lane's ``RATE``)."""

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


#: A delivery mode's name, as KIPEKEE["MODE"] and ``send(mode=...)`` take it (the
#: outbox column's choices are ``kipekee.models.Mode``).
ModeName = Literal["now", "hybrid", "queue"]
MODES: tuple[ModeName, ...] = ("now", "hybrid", "queue")

#: The dotted paths of Kipekee's own drop-in backend: a provider may never point here.
DROP_IN_BACKENDS = frozenset({"kipekee.backend.EmailBackend"})


@dataclass(frozen=True, kw_only=True)
class ProviderConfig:
    """One entry of ``KIPEKEE["PROVIDERS"]``: a Django email backend and its options."""

    alias: str
    backend: str
    # Not in repr: OPTIONS hold passwords and API keys, and reprs end up in logs.
    options: dict[str, Any] = field(default_factory=dict, repr=False)
    # Calls into the provider per window ("150/10s", "500/d"), shared (KIPEKEE["LIMITER"]).
    rate: tuple[Rate, ...] = ()
    concurrency: int | None = None  # connections open to it at once, shared likewise


@dataclass(frozen=True, kw_only=True)
class LimiterConfig:
    """``KIPEKEE["LIMITER"]``: where providers' limits are kept (:mod:`kipekee.limits`).

    ``store`` is ``"database"`` (the outbox's database: shared by every process and host
    using it), ``"redis"`` (``location`` a ``redis://`` URL, keys under ``key_prefix``)
    or ``"process"`` (each process on its own). ``lease``: seconds a connection permit
    outlives a process that died. ``max_wait``: seconds an engine's send waits for a rate
    slot before the mail is deferred instead.
    """

    store: Literal["database", "redis", "process"] = "database"
    location: str = ""
    key_prefix: str = "kipekee"
    lease: float = 30.0
    max_wait: float = 10.0


@dataclass(frozen=True, kw_only=True)
class RetryConfig:
    """How a queued message is retried after a transient failure.

    Defaults follow the spirit of Postfix and RFC 5321 for queued mail (minutes apart at
    first, at most an hour apart, give up after days), shortened at the start because
    transactional mail is wanted soon.
    """

    base_delay: float = 30.0
    max_delay: float = 3600.0
    max_attempts: int = 25
    lifetime: timedelta = timedelta(days=3)
    jitter: bool = True


@dataclass(frozen=True, kw_only=True)
class CircuitConfig:
    failures: int = 5
    cooldown: float = 30.0


@dataclass(frozen=True, kw_only=True)
class CeleryConfig:
    queue: str = "kipekee"
    # New rows get a task on commit; the sweep leaves them this long to be picked up first.
    sweep_grace: float = 30.0


@dataclass(frozen=True, kw_only=True)
class TasksConfig:
    """``KIPEKEE["TASKS"]``: where the ``tasks`` engine enqueues (:mod:`kipekee.engines.tasks`):
    a task backend alias of Django's ``TASKS`` setting and one of its queues."""

    backend: str = "default"
    queue: str = "default"
    # New rows get a task on commit; the sweep leaves them this long to be picked up first.
    sweep_grace: float = 30.0


@dataclass(frozen=True, kw_only=True)
class LaneConfig:
    """One entry of ``KIPEKEE["LANES"]``: a queue of mail within the outbox.

    Engines claim due rows lane by lane, the highest ``priority`` first (as Django's
    tasks: higher runs first), so a sign-in code never waits behind a newsletter.
    ``share`` (0 to 1) of every claim is kept for this lane while it has due rows, so
    a low-priority lane is slowed by the others, never starved. ``rate`` ("20/s")
    caps how many of its rows are claimed per window, per process.
    """

    name: str
    priority: int = 0
    share: float = 0.0
    rate: str | None = None


#: The lane of a message that names none (``kipekee.send``, ``notify``, the drop-in backend).
TRANSACTIONAL = "transactional"
#: The lane of ``kipekee.send_many`` and ``notify_many`` unless told otherwise.
BULK = "bulk"
#: Lanes every project has; ``KIPEKEE["LANES"]`` adds lanes and changes these.
DEFAULT_LANES = {
    TRANSACTIONAL: LaneConfig(name=TRANSACTIONAL, priority=0),
    BULK: LaneConfig(name=BULK, priority=-10, share=0.1),
}


@dataclass(frozen=True, kw_only=True)
class RetentionConfig:
    """``KIPEKEE["RETENTION"]``: what ``manage.py kipekee_purge`` does to old rows.

    Rows in a final status (sent, failed, suppressed, cancelled) created more than
    ``days`` ago are anonymised (the default): the row stays for statistics (status,
    mode, provider, template, dates, attempts, error kinds, recipients' domains) and
    bodies, subjects, addresses, metadata, error texts and attachments are erased. Or,
    with ``action="delete"``, deleted with their attempts (the command reports counts
    by status). ``days=None`` (the default) keeps everything.
    """

    days: int | None = None
    action: Literal["delete", "anonymise"] = "anonymise"
    batch_size: int = 1000


@dataclass(frozen=True, kw_only=True)
class CheckConfig:
    """``KIPEKEE["CHECK"]``: thresholds of ``manage.py kipekee_check``."""

    heartbeat_max_age: float = 60.0  # seconds since an engine's last beat
    oldest_due_max_age: float = 900.0  # seconds a due message may wait
    queue_depth_max: int = 10_000  # waiting rows
    failure_rate_max: float = 0.2  # failed / finished attempts in the last hour
    failure_rate_min_attempts: int = 20  # fewer attempts: a warning at most
    provider_timeout: float = 10.0  # seconds for each provider's connection test


@dataclass(frozen=True, kw_only=True)
class ConnectionsConfig:
    """``KIPEKEE["CONNECTIONS"]``: the warm provider connections of each process
    (:mod:`kipekee.connections`)."""

    pool_size: int = 4  # idle connections kept per provider; 0: close after each use
    idle_seconds: float = 10.0  # unused this long: probed (NOOP) before reuse
    max_age: float = 300.0  # open this long: closed and replaced


@dataclass(frozen=True, kw_only=True)
class UnsubscribeConfig:
    """``KIPEKEE["UNSUBSCRIBE"]``: the links that list mail carries (:mod:`kipekee.lists`).

    ``base_url`` is where ``kipekee.urls`` is served from (``"https://shop.example"``;
    the path comes from ``reverse``), ``mailto`` an address whose inbound mail reaches
    :func:`kipekee.lists.unsubscribe_by_mail` (none: no ``mailto:`` link), ``max_age``
    how long a link works.
    """

    base_url: str | None = None
    mailto: str | None = None
    max_age: timedelta = timedelta(days=180)


@dataclass(frozen=True, kw_only=True)
class KipekeeSettings:
    providers: tuple[ProviderConfig, ...]
    mode: ModeName = "hybrid"
    now_retry_delays: tuple[float, ...] = (1.0, 2.0, 4.0)
    now_time_budget: float = 10.0
    retry: RetryConfig = RetryConfig()
    circuit: CircuitConfig = CircuitConfig()
    engine: str | None = "thread"
    celery: CeleryConfig = CeleryConfig()
    tasks: TasksConfig = TasksConfig()
    lease: timedelta = timedelta(minutes=5)
    strict_templates: bool = True
    message_id_domain: str | None = None
    # Basic-auth "user:password" pairs delivery webhooks must carry (several: rotation).
    webhook_secrets: tuple[str, ...] = ()
    retention: RetentionConfig = RetentionConfig()
    check: CheckConfig = CheckConfig()
    metrics: bool = False
    connections: ConnectionsConfig = ConnectionsConfig()
    # Highest priority first (ties: by name, so the order never depends on the dict's).
    lanes: tuple[LaneConfig, ...] = tuple(
        sorted(DEFAULT_LANES.values(), key=lambda lane: (-lane.priority, lane.name)))
    # Bytes a message may take on the wire (attachments base64-encoded); None: no cap.
    max_message_size: int | None = 25_000_000
    unsubscribe: UnsubscribeConfig = UnsubscribeConfig()
    limiter: LimiterConfig = LimiterConfig()

    def lane(self, name: str) -> LaneConfig:
        """The lane called ``name``; ``InvalidMessage`` naming the known ones if none is."""
        for lane in self.lanes:
            if lane.name == name:
                return lane
        raise InvalidMessage(f"Unknown lane {name!r}; the lanes are "
                             f"{sorted(lane.name for lane in self.lanes)} (KIPEKEE[\"LANES\"]).")

    def provider(self, alias: str) -> ProviderConfig:
        for p in self.providers:
            if p.alias == alias:
                return p
        raise UnknownProvider(alias, [p.alias for p in self.providers])


_KNOWN_KEYS = {
    "PROVIDERS",
    "MODE",
    "NOW_RETRY_DELAYS",
    "NOW_TIME_BUDGET",
    "RETRY",
    "LEASE_SECONDS",
    "STRICT_TEMPLATES",
    "MESSAGE_ID_DOMAIN",
    "CIRCUIT_BREAKER",
    "ENGINE",
    "CELERY",
    "TASKS",
    "WEBHOOK_SECRET",
    "RETENTION",
    "CHECK",
    "METRICS",
    "CONNECTIONS",
    "LANES",
    "MAX_MESSAGE_SIZE",
    "UNSUBSCRIBE",
    "LIMITER",
}
_RETRY_KEYS = {"BASE_DELAY", "MAX_DELAY", "MAX_ATTEMPTS", "LIFETIME_SECONDS", "JITTER"}
_CIRCUIT_KEYS = {"FAILURES", "COOLDOWN_SECONDS"}
#: Where queued and deferred rows are delivered: None means "an engine you run yourself"
#: (kipekee_worker, Celery) and nothing is started in the web process.
ENGINES = ("thread", "worker", "celery", "tasks", None)


def parse(raw: Any) -> KipekeeSettings:
    """Validate a raw ``KIPEKEE`` dict; raise ``ConfigurationError`` saying what is wrong.

    One step a key or section, each named for what it reads; this only puts them together.
    """
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigurationError("KIPEKEE must be a dict.")
    unknown = set(raw) - _KNOWN_KEYS
    if unknown:
        raise ConfigurationError(
            f"KIPEKEE has unknown keys {sorted(unknown)}; known keys are {sorted(_KNOWN_KEYS)}."
        )
    # In this order, the order the keys have always been checked in: of two mistakes,
    # the same one is named first.
    return KipekeeSettings(
        providers=_parse_providers(raw),
        mode=_mode(raw),
        now_retry_delays=_now_retry_delays(raw),
        now_time_budget=_positive_number(raw, "NOW_TIME_BUDGET", 10.0),
        retry=_parse_retry(raw),
        circuit=_parse_circuit(raw),
        engine=_engine(raw),
        celery=_parse_celery(raw),
        tasks=_parse_tasks(raw),
        message_id_domain=_message_id_domain(raw),
        webhook_secrets=_webhook_secrets(raw),
        lease=timedelta(seconds=_positive_number(raw, "LEASE_SECONDS", 300.0)),
        strict_templates=bool(raw.get("STRICT_TEMPLATES", True)),
        connections=_parse_connections(raw),
        lanes=_parse_lanes(raw.get("LANES", {})),
        max_message_size=_max_message_size(raw),
        unsubscribe=_unsubscribe(raw),
        limiter=_parse_limiter(raw),
        **_parse_operations(raw),
    )


def _parse_providers(raw: dict[str, Any]) -> tuple[ProviderConfig, ...]:
    providers_raw = raw.get("PROVIDERS", {})
    if not isinstance(providers_raw, dict):
        raise ConfigurationError(
            'KIPEKEE["PROVIDERS"] must be a dict of {"alias": {"BACKEND": ..., "OPTIONS": {...}}}.'
        )
    return tuple(_parse_provider(alias, entry) for alias, entry in providers_raw.items())


def _parse_provider(alias: str, entry: Any) -> ProviderConfig:
    """``KIPEKEE["PROVIDERS"][alias]``."""
    where = f'KIPEKEE["PROVIDERS"][{alias!r}]'
    if isinstance(entry, dict) and "MAILER" in entry:
        entry = _from_mailers(where, entry)
    if not isinstance(entry, dict) or "BACKEND" not in entry:
        raise ConfigurationError(
            f"{where} must be a dict with a 'BACKEND' key (or a 'MAILER' key naming an "
            "entry of settings.MAILERS).")
    extra = set(entry) - {"BACKEND", "OPTIONS", "LIMITS"}
    if extra:
        raise ConfigurationError(f"{where} has unknown keys {sorted(extra)}.")
    options = entry.get("OPTIONS", {})
    if not isinstance(options, dict):
        raise ConfigurationError(f"{where}['OPTIONS'] must be a dict.")
    if "alias" in options:
        raise ConfigurationError(f"{where}['OPTIONS'] must not define 'alias'.")
    if entry["BACKEND"] in DROP_IN_BACKENDS:
        raise ConfigurationError(
            f"{where} uses Kipekee's own drop-in backend; a provider must deliver, "
            "not enqueue again (that would loop forever)."
        )
    rates, concurrency = _provider_limits(where, entry.get("LIMITS", {}))
    return ProviderConfig(alias=alias, backend=entry["BACKEND"], options=options,
                          rate=rates, concurrency=concurrency)


def _provider_limits(where: str, limits: Any) -> tuple[tuple[Rate, ...], int | None]:
    """A provider's ``LIMITS``: its rates and its concurrency."""
    if not isinstance(limits, dict) or set(limits) - {"RATE", "CONCURRENCY"}:
        raise ConfigurationError(
            f"{where}['LIMITS'] takes 'RATE' (e.g. '150/10s', or a list: "
            "['14/s', '50000/d']) and 'CONCURRENCY'.")
    if not isinstance(limits.get("RATE", ""), (str, list, tuple)):
        raise ConfigurationError(f"{where}['LIMITS']['RATE'] must be a rate like '150/10s' "
                                 "or a list of them.")
    rate = limits.get("RATE", ())
    rates = tuple(Rate.parse(r) for r in ((rate,) if isinstance(rate, str) else rate))
    concurrency = limits.get("CONCURRENCY")
    if concurrency is not None and (not isinstance(concurrency, int) or concurrency < 1):
        raise ConfigurationError(f"{where}['LIMITS']['CONCURRENCY'] must be an int >= 1.")
    return rates, concurrency


def _mode(raw: dict[str, Any]) -> ModeName:
    mode = raw.get("MODE", "hybrid")
    if mode not in MODES:
        raise ConfigurationError(f'KIPEKEE["MODE"] must be one of {MODES}, not {mode!r}.')
    return cast(ModeName, mode)


def _engine(raw: dict[str, Any]) -> str | None:
    engine = raw.get("ENGINE", "thread")
    if engine not in ENGINES:
        raise ConfigurationError(f'KIPEKEE["ENGINE"] must be one of {ENGINES}, not {engine!r}.')
    return cast("str | None", engine)


def _now_retry_delays(raw: dict[str, Any]) -> tuple[float, ...]:
    delays = raw.get("NOW_RETRY_DELAYS", (1, 2, 4))
    if not isinstance(delays, (list, tuple)) or not all(
        isinstance(d, (int, float)) and d >= 0 for d in delays
    ):
        raise ConfigurationError('KIPEKEE["NOW_RETRY_DELAYS"] must be a list of seconds >= 0.')
    return tuple(float(d) for d in delays)


def _parse_retry(raw: dict[str, Any]) -> RetryConfig:
    retry_raw = _section(raw, "RETRY", _RETRY_KEYS)
    default_retry = RetryConfig()
    return RetryConfig(
        base_delay=_positive_number(retry_raw, "BASE_DELAY", default_retry.base_delay, "RETRY"),
        max_delay=_positive_number(retry_raw, "MAX_DELAY", default_retry.max_delay, "RETRY"),
        max_attempts=int(
            _positive_number(retry_raw, "MAX_ATTEMPTS", default_retry.max_attempts, "RETRY")
        ),
        lifetime=timedelta(
            seconds=_positive_number(
                retry_raw, "LIFETIME_SECONDS", default_retry.lifetime.total_seconds(), "RETRY"
            )
        ),
        jitter=bool(retry_raw.get("JITTER", True)),
    )


def _parse_circuit(raw: dict[str, Any]) -> CircuitConfig:
    circuit_raw = _section(raw, "CIRCUIT_BREAKER", _CIRCUIT_KEYS)
    return CircuitConfig(
        failures=int(_positive_number(circuit_raw, "FAILURES", 5, "CIRCUIT_BREAKER")),
        cooldown=_positive_number(circuit_raw, "COOLDOWN_SECONDS", 30.0, "CIRCUIT_BREAKER"),
    )


def _parse_celery(raw: dict[str, Any]) -> CeleryConfig:
    celery_raw = raw.get("CELERY", {})
    if not isinstance(celery_raw, dict) or set(celery_raw) - {"QUEUE", "SWEEP_GRACE_SECONDS"}:
        raise ConfigurationError('KIPEKEE["CELERY"] takes "QUEUE" and "SWEEP_GRACE_SECONDS".')
    queue = celery_raw.get("QUEUE", "kipekee")
    if not isinstance(queue, str) or not queue:
        raise ConfigurationError('KIPEKEE["CELERY"]["QUEUE"] must be a queue name.')
    return CeleryConfig(queue=queue, sweep_grace=float(celery_raw.get("SWEEP_GRACE_SECONDS", 30)))


def _parse_tasks(raw: dict[str, Any]) -> TasksConfig:
    tasks_raw = raw.get("TASKS", {})
    if not isinstance(tasks_raw, dict) or set(tasks_raw) - {"BACKEND", "QUEUE",
                                                             "SWEEP_GRACE_SECONDS"}:
        raise ConfigurationError('KIPEKEE["TASKS"] takes "BACKEND", "QUEUE" and '
                                 '"SWEEP_GRACE_SECONDS".')
    for key in ("BACKEND", "QUEUE"):
        if key in tasks_raw and (not isinstance(tasks_raw[key], str) or not tasks_raw[key]):
            raise ConfigurationError(f'KIPEKEE["TASKS"]["{key}"] must be a name, not '
                                     f'{tasks_raw[key]!r}.')
    return TasksConfig(backend=tasks_raw.get("BACKEND", "default"),
                       queue=tasks_raw.get("QUEUE", "default"),
                       sweep_grace=_grace(tasks_raw.get("SWEEP_GRACE_SECONDS", 30.0)))


def _message_id_domain(raw: dict[str, Any]) -> str | None:
    domain = raw.get("MESSAGE_ID_DOMAIN")
    if domain is not None and (not isinstance(domain, str) or not domain or "\n" in domain):
        raise ConfigurationError('KIPEKEE["MESSAGE_ID_DOMAIN"] must be a domain name.')
    return domain


def _webhook_secrets(raw: dict[str, Any]) -> tuple[str, ...]:
    secrets = raw.get("WEBHOOK_SECRET", ())
    if isinstance(secrets, str):
        secrets = (secrets,)
    if not isinstance(secrets, (list, tuple)) or not all(
        isinstance(x, str) and ":" in x and x.split(":", 1)[1] for x in secrets
    ):
        raise ConfigurationError(
            'KIPEKEE["WEBHOOK_SECRET"] must be "user:password" or a list of them (the '
            "basic auth in the webhook URL you give the provider; list two to rotate)."
        )
    return tuple(secrets)


def _section(raw: dict[str, Any], name: str, keys: set[str]) -> dict[str, Any]:
    """``KIPEKEE[name]``: a dict (empty when not set) whose keys are among ``keys``."""
    section = raw.get(name, {})
    if not isinstance(section, dict) or set(section) - keys:
        raise ConfigurationError(
            f'KIPEKEE["{name}"] must be a dict with keys among {sorted(keys)}.')
    return section


def _parse_connections(raw: dict[str, Any]) -> ConnectionsConfig:
    section = _section(raw, "CONNECTIONS", {"POOL_SIZE", "IDLE_SECONDS", "MAX_AGE_SECONDS"})
    d = ConnectionsConfig()
    size = section.get("POOL_SIZE", d.pool_size)
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise ConfigurationError(
            f'KIPEKEE["CONNECTIONS"]["POOL_SIZE"] must be an int >= 0, not {size!r}.')
    return ConnectionsConfig(
        pool_size=size,
        idle_seconds=_positive_number(section, "IDLE_SECONDS", d.idle_seconds, "CONNECTIONS"),
        max_age=_positive_number(section, "MAX_AGE_SECONDS", d.max_age, "CONNECTIONS"),
    )


def _parse_limiter(raw: dict[str, Any]) -> LimiterConfig:
    section = _section(raw, "LIMITER", {"STORE", "LOCATION", "KEY_PREFIX",
                                        "PERMIT_LEASE_SECONDS", "MAX_WAIT_SECONDS"})
    d = LimiterConfig()
    store = section.get("STORE", d.store)
    if store not in ("database", "redis", "process"):
        raise ConfigurationError(
            'KIPEKEE["LIMITER"]["STORE"] must be "database" (shared through the outbox\'s '
            'database), "redis" (with a LOCATION) or "process" (each process on its own), '
            f"not {store!r}.")
    location = section.get("LOCATION", "")
    if store == "redis" and not (isinstance(location, str) and location.startswith(
            ("redis://", "rediss://", "unix://", "redis+unix://", "valkey://"))):
        raise ConfigurationError(
            'KIPEKEE["LIMITER"]["LOCATION"] must be a redis:// URL for STORE "redis" '
            f"(e.g. \"redis://127.0.0.1:6379/0\"), not {location!r}.")
    prefix = section.get("KEY_PREFIX", d.key_prefix)
    if not isinstance(prefix, str) or not prefix:
        raise ConfigurationError('KIPEKEE["LIMITER"]["KEY_PREFIX"] must be a non-empty string.')
    return LimiterConfig(
        store=store, location=location, key_prefix=prefix,
        lease=_positive_number(section, "PERMIT_LEASE_SECONDS", d.lease, "LIMITER"),
        max_wait=_positive_number(section, "MAX_WAIT_SECONDS", d.max_wait, "LIMITER"))


_LANE_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,31}$")


def _parse_lanes(raw: Any) -> tuple[LaneConfig, ...]:
    """``KIPEKEE["LANES"]``: ``{"name": {"PRIORITY": int, "SHARE": 0..1, "LIMITS": {"RATE":
    "20/s"}}}``, merged over :data:`DEFAULT_LANES` (an entry there changes a built-in lane)."""
    if not isinstance(raw, dict):
        raise ConfigurationError('KIPEKEE["LANES"] must be a dict of {"name": {"PRIORITY": ...}}.')
    lanes = dict(DEFAULT_LANES)
    for name, entry in raw.items():
        where = f'KIPEKEE["LANES"][{name!r}]'
        if not isinstance(name, str) or not _LANE_NAME.match(name):
            raise ConfigurationError(
                f"{where}: a lane name is 1 to 32 lower-case letters, digits, '_', '.' or '-'.")
        if not isinstance(entry, dict) or set(entry) - {"PRIORITY", "SHARE", "LIMITS"}:
            raise ConfigurationError(f"{where} must be a dict with keys among "
                                     "['LIMITS', 'PRIORITY', 'SHARE'].")
        base = lanes.get(name, LaneConfig(name=name))
        priority = entry.get("PRIORITY", base.priority)
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise ConfigurationError(f"{where}['PRIORITY'] must be an int (higher is claimed "
                                     f"first), not {priority!r}.")
        share = entry.get("SHARE", base.share)
        if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 <= share < 1:
            raise ConfigurationError(f"{where}['SHARE'] is the fraction of each claim kept for "
                                     f"this lane, 0 <= SHARE < 1, not {share!r}.")
        limits = entry.get("LIMITS", {})
        if not isinstance(limits, dict) or set(limits) - {"RATE"}:
            raise ConfigurationError(f"{where}['LIMITS'] takes 'RATE' (e.g. '20/s').")
        rate = limits.get("RATE", base.rate if "LIMITS" not in entry else None)
        if rate is not None:
            Rate.parse(rate)
        lanes[name] = LaneConfig(name=name, priority=priority, share=float(share), rate=rate)
    if sum(lane.share for lane in lanes.values()) >= 1:
        raise ConfigurationError(
            'KIPEKEE["LANES"]: the SHAREs add up to 1 or more; nothing would be left for the '
            "lanes in priority order.")
    return tuple(sorted(lanes.values(), key=lambda lane: (-lane.priority, lane.name)))


def _max_message_size(raw: dict[str, Any]) -> int | None:
    """``MAX_MESSAGE_SIZE``: 25 MB by default, on the wire. Mailgun takes 25 MB, SendGrid
    30, Gmail and Microsoft 365 about 35, SES 40; Postmark 10 and a default Postfix
    (10,240,000 bytes) take less: set it to your smallest provider's."""
    value = raw.get("MAX_MESSAGE_SIZE", 25_000_000)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ConfigurationError(
            f'KIPEKEE["MAX_MESSAGE_SIZE"] must be a number of bytes (an int >= 1) or None '
            f"(no cap), not {value!r}.")
    return value


def _unsubscribe(raw: dict[str, Any]) -> UnsubscribeConfig:
    value = _section(raw, "UNSUBSCRIBE", {"BASE_URL", "MAILTO", "MAX_AGE_DAYS"})
    base_url = value.get("BASE_URL")
    if base_url is not None:
        parts = urlsplit(base_url) if isinstance(base_url, str) else None
        if (parts is None or parts.scheme not in ("https", "http") or not parts.hostname
                or parts.query or parts.fragment or any(c.isspace() for c in base_url)
                or not base_url.isascii()):
            # ASCII: the link goes into a header as it is (an IDN host in its xn-- form).
            raise ConfigurationError(
                'KIPEKEE["UNSUBSCRIBE"]["BASE_URL"] must be the https:// address your site is '
                f"served from (e.g. \"https://shop.example\"; a non-ASCII domain in its "
                f"xn-- form), not {base_url!r}.")
        base_url = base_url.rstrip("/")
    mailto = value.get("MAILTO")
    if mailto is not None:
        try:
            if not isinstance(mailto, str) or not mailto.isascii():
                raise ValidationError("not an ASCII string")
            validate_email(mailto)
        except ValidationError:
            raise ConfigurationError(
                'KIPEKEE["UNSUBSCRIBE"]["MAILTO"] must be one plain address '
                f"(unsubscribe@shop.example), not {mailto!r}.") from None
    days = _positive_number(value, "MAX_AGE_DAYS", 180, "UNSUBSCRIBE")
    return UnsubscribeConfig(base_url=base_url, mailto=mailto, max_age=timedelta(days=days))


#: What Django 6.1 uses for a MAILERS entry without "BACKEND".
DEFAULT_MAILER_BACKEND = "django.core.mail.backends.smtp.EmailBackend"


def _from_mailers(where: str, entry: dict[str, Any]) -> dict[str, Any]:
    """A provider given as ``{"MAILER": "alias", "LIMITS": {...}}``: the backend and options
    of ``settings.MAILERS["alias"]`` (Django 6.1's setting; read the same way on 5.2), so
    one configuration serves ``django.core.mail.mailers`` and Kipekee."""
    extra = set(entry) - {"MAILER", "LIMITS"}
    if extra:
        raise ConfigurationError(
            f"{where} names a MAILERS entry; it takes only 'MAILER' and 'LIMITS', not "
            f"{sorted(extra)} (the backend and its options come from settings.MAILERS).")
    name = entry["MAILER"]
    mailers = getattr(django_settings, "MAILERS", None)
    if not isinstance(mailers, dict) or name not in mailers:
        known = sorted(mailers) if isinstance(mailers, dict) else []
        raise ConfigurationError(
            f"{where}['MAILER'] is {name!r}, which is not an alias of settings.MAILERS "
            f"(its aliases: {known}).")
    mailer = mailers[name]
    if not isinstance(mailer, dict):
        raise ConfigurationError(f"settings.MAILERS[{name!r}] must be a dict.")
    resolved = {"BACKEND": mailer.get("BACKEND", DEFAULT_MAILER_BACKEND),
                "OPTIONS": mailer.get("OPTIONS", {})}
    if "LIMITS" in entry:
        resolved["LIMITS"] = entry["LIMITS"]
    return resolved


def _parse_operations(raw: dict[str, Any]) -> dict[str, Any]:
    """``RETENTION``, ``CHECK`` and ``METRICS``: the settings of running Kipekee."""
    retention_raw = _section(raw, "RETENTION", {"DAYS", "ACTION", "BATCH_SIZE"})
    days = retention_raw.get("DAYS")
    if days is not None and (isinstance(days, bool) or not isinstance(days, int) or days < 1):
        raise ConfigurationError(
            f'KIPEKEE["RETENTION"]["DAYS"] must be an int >= 1 or None, not {days!r}.')
    action = retention_raw.get("ACTION", "anonymise")
    if action not in ("delete", "anonymise"):
        raise ConfigurationError(
            f'KIPEKEE["RETENTION"]["ACTION"] must be "delete" or "anonymise", not {action!r}.')
    batch = int(_positive_number(retention_raw, "BATCH_SIZE", 1000, "RETENTION"))

    check_raw = _section(raw, "CHECK", {"HEARTBEAT_MAX_AGE", "OLDEST_DUE_MAX_AGE",
                                        "QUEUE_DEPTH_MAX", "FAILURE_RATE_MAX",
                                        "FAILURE_RATE_MIN_ATTEMPTS", "PROVIDER_TIMEOUT"})
    d = CheckConfig()

    def number(key: str, default: float) -> float:
        return _positive_number(check_raw, key, default, "CHECK")

    rate = number("FAILURE_RATE_MAX", d.failure_rate_max)
    if rate > 1:
        raise ConfigurationError('KIPEKEE["CHECK"]["FAILURE_RATE_MAX"] is a fraction (0.2 = 20 %).')
    check = CheckConfig(
        heartbeat_max_age=number("HEARTBEAT_MAX_AGE", d.heartbeat_max_age),
        oldest_due_max_age=number("OLDEST_DUE_MAX_AGE", d.oldest_due_max_age),
        queue_depth_max=int(number("QUEUE_DEPTH_MAX", d.queue_depth_max)),
        failure_rate_max=rate,
        failure_rate_min_attempts=int(number("FAILURE_RATE_MIN_ATTEMPTS",
                                             d.failure_rate_min_attempts)),
        provider_timeout=number("PROVIDER_TIMEOUT", d.provider_timeout),
    )
    metrics = raw.get("METRICS", False)
    if not isinstance(metrics, bool):
        raise ConfigurationError('KIPEKEE["METRICS"] must be True or False.')
    return {
        "retention": RetentionConfig(days=days, action=action, batch_size=batch),
        "check": check,
        "metrics": metrics,
    }


def _grace(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ConfigurationError('KIPEKEE["TASKS"]["SWEEP_GRACE_SECONDS"] must be a number '
                                 f">= 0, not {value!r}.")
    return float(value)


def _positive_number(raw: dict[str, Any], key: str, default: float, parent: str = "") -> float:
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        name = f'KIPEKEE["{parent}"]["{key}"]' if parent else f'KIPEKEE["{key}"]'
        raise ConfigurationError(f"{name} must be a number > 0, not {value!r}.")
    return float(value)


_lock = threading.Lock()
_cached: KipekeeSettings | None = None


def get() -> KipekeeSettings:
    """The parsed ``KIPEKEE`` setting (cached until a ``setting_changed`` signal)."""
    global _cached
    current = _cached
    if current is None:
        with _lock:
            current = _cached = parse(getattr(django_settings, "KIPEKEE", {}))
    return current


#: The Django settings read here: when one changes (``override_settings``), the parsed
#: settings are read again, and each module that built something from them (providers'
#: backend classes, circuit breakers, limits) forgets it, through its own receiver
#: (:func:`reset_on_change`).
SETTINGS = frozenset({"KIPEKEE", "DEFAULT_FROM_EMAIL", "MAILERS"})


def reset_on_change(reset: Callable[[], None], settings: Collection[str] = SETTINGS) -> None:
    """Call ``reset`` whenever one of ``settings`` changes (``setting_changed``, as
    ``override_settings`` sends it): how a module forgets what it built from them, each
    module its own, as ``django/tasks/signals.py`` does."""

    def on_change(*, setting: str, **kwargs: Any) -> None:
        if setting in settings:
            reset()

    setting_changed.connect(on_change, weak=False,
                            dispatch_uid=f"kipekee:{reset.__module__}.{reset.__qualname__}")


def _forget_parsed() -> None:
    global _cached
    _cached = None


reset_on_change(_forget_parsed)
