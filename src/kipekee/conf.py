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
        },
        "MODE": "hybrid",               # now | hybrid | queue
        "NOW_RETRY_DELAYS": [1, 2, 4],  # in-request retries (mode "now")
        "NOW_TIME_BUDGET": 10,          # seconds a request may spend on one email
    }
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Literal, cast

from django.conf import settings as django_settings
from django.core.signals import setting_changed
from django.dispatch import receiver

from .exceptions import ConfigurationError

Mode = Literal["now", "hybrid", "queue"]
MODES: tuple[Mode, ...] = ("now", "hybrid", "queue")

#: The dotted paths of Kipekee's own drop-in backend: a provider may never point here.
DROP_IN_BACKENDS = frozenset({"kipekee.backend.EmailBackend"})


@dataclass(frozen=True, kw_only=True)
class ProviderConfig:
    """One entry of ``KIPEKEE["PROVIDERS"]``: a Django email backend and its options."""

    alias: str
    backend: str
    # Not in repr: OPTIONS hold passwords and API keys, and reprs end up in logs.
    options: dict[str, Any] = field(default_factory=dict, repr=False)
    rate: str | None = None  # "150/10s": calls into the provider per window, per process
    concurrency: int | None = None  # threads of one process talking to it at once


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
class KipekeeSettings:
    providers: tuple[ProviderConfig, ...]
    mode: Mode = "hybrid"
    now_retry_delays: tuple[float, ...] = (1.0, 2.0, 4.0)
    now_time_budget: float = 10.0
    retry: RetryConfig = RetryConfig()
    circuit: CircuitConfig = CircuitConfig()
    engine: str | None = "thread"
    lease: timedelta = timedelta(minutes=5)
    strict_templates: bool = True
    message_id_domain: str | None = None

    def provider(self, alias: str) -> ProviderConfig:
        for p in self.providers:
            if p.alias == alias:
                return p
        from .exceptions import UnknownProvider

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
}
_RETRY_KEYS = {"BASE_DELAY", "MAX_DELAY", "MAX_ATTEMPTS", "LIFETIME_SECONDS", "JITTER"}
_CIRCUIT_KEYS = {"FAILURES", "COOLDOWN_SECONDS"}
#: Where queued and deferred rows are delivered: None means "an engine you run yourself"
#: (kipekee_worker, Celery) and nothing is started in the web process.
ENGINES = ("thread", "worker", "celery", None)


def parse(raw: Any) -> KipekeeSettings:
    """Validate a raw ``KIPEKEE`` dict; raise ``ConfigurationError`` saying what is wrong."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigurationError("KIPEKEE must be a dict.")
    unknown = set(raw) - _KNOWN_KEYS
    if unknown:
        raise ConfigurationError(
            f"KIPEKEE has unknown keys {sorted(unknown)}; known keys are {sorted(_KNOWN_KEYS)}."
        )

    providers_raw = raw.get("PROVIDERS", {})
    if not isinstance(providers_raw, dict):
        raise ConfigurationError(
            'KIPEKEE["PROVIDERS"] must be a dict of {"alias": {"BACKEND": ..., "OPTIONS": {...}}}.'
        )
    providers = []
    for alias, entry in providers_raw.items():
        where = f'KIPEKEE["PROVIDERS"][{alias!r}]'
        if not isinstance(entry, dict) or "BACKEND" not in entry:
            raise ConfigurationError(f"{where} must be a dict with a 'BACKEND' key.")
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
        limits = entry.get("LIMITS", {})
        if not isinstance(limits, dict) or set(limits) - {"RATE", "CONCURRENCY"}:
            raise ConfigurationError(f"{where}['LIMITS'] takes 'RATE' (e.g. '150/10s') and 'CONCURRENCY'.")
        rate = limits.get("RATE")
        if rate is not None:
            from .limits import Rate

            Rate.parse(rate)
        concurrency = limits.get("CONCURRENCY")
        if concurrency is not None and (not isinstance(concurrency, int) or concurrency < 1):
            raise ConfigurationError(f"{where}['LIMITS']['CONCURRENCY'] must be an int >= 1.")
        providers.append(ProviderConfig(alias=alias, backend=entry["BACKEND"], options=options,
                                        rate=rate, concurrency=concurrency))

    mode = raw.get("MODE", "hybrid")
    if mode not in MODES:
        raise ConfigurationError(f'KIPEKEE["MODE"] must be one of {MODES}, not {mode!r}.')

    delays = raw.get("NOW_RETRY_DELAYS", (1, 2, 4))
    if not isinstance(delays, (list, tuple)) or not all(
        isinstance(d, (int, float)) and d >= 0 for d in delays
    ):
        raise ConfigurationError('KIPEKEE["NOW_RETRY_DELAYS"] must be a list of seconds >= 0.')
    budget = _positive_number(raw, "NOW_TIME_BUDGET", 10.0)

    retry_raw = raw.get("RETRY", {})
    if not isinstance(retry_raw, dict) or set(retry_raw) - _RETRY_KEYS:
        raise ConfigurationError(f'KIPEKEE["RETRY"] must be a dict with keys among {sorted(_RETRY_KEYS)}.')
    default_retry = RetryConfig()
    retry = RetryConfig(
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
    circuit_raw = raw.get("CIRCUIT_BREAKER", {})
    if not isinstance(circuit_raw, dict) or set(circuit_raw) - _CIRCUIT_KEYS:
        raise ConfigurationError(
            f'KIPEKEE["CIRCUIT_BREAKER"] must be a dict with keys among {sorted(_CIRCUIT_KEYS)}.')
    circuit = CircuitConfig(
        failures=int(_positive_number(circuit_raw, "FAILURES", 5, "CIRCUIT_BREAKER")),
        cooldown=_positive_number(circuit_raw, "COOLDOWN_SECONDS", 30.0, "CIRCUIT_BREAKER"),
    )
    engine = raw.get("ENGINE", "thread")
    if engine not in ENGINES:
        raise ConfigurationError(f'KIPEKEE["ENGINE"] must be one of {ENGINES}, not {engine!r}.')
    domain = raw.get("MESSAGE_ID_DOMAIN")
    if domain is not None and (not isinstance(domain, str) or not domain or "\n" in domain):
        raise ConfigurationError('KIPEKEE["MESSAGE_ID_DOMAIN"] must be a domain name.')

    return KipekeeSettings(
        providers=tuple(providers),
        mode=cast(Mode, mode),
        now_retry_delays=tuple(float(d) for d in delays),
        now_time_budget=budget,
        retry=retry,
        circuit=circuit,
        engine=engine,
        lease=timedelta(seconds=_positive_number(raw, "LEASE_SECONDS", 300.0)),
        strict_templates=bool(raw.get("STRICT_TEMPLATES", True)),
        message_id_domain=domain,
    )


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


@receiver(setting_changed)
def _reset(*, setting: str, **kwargs: Any) -> None:
    global _cached
    if setting in {"KIPEKEE", "DEFAULT_FROM_EMAIL"}:
        _cached = None
        from . import circuit, limits, providers

        providers.reset()
        limits.reset()
        circuit.reset()
