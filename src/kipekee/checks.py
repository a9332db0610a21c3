"""System checks: configuration problems reported at start, each with an id and a hint.

=============  ==============================================================
kipekee.E001   the KIPEKEE setting is invalid (the message says where)
kipekee.E002   a provider's BACKEND cannot be imported or is not an email backend
kipekee.E010   a provider's BACKEND routes back into Kipekee (a loop)
kipekee.E011   a provider's backend cannot be built from its OPTIONS
kipekee.E012   a provider's secret (password, API key, token) is empty
kipekee.E013   ``"METRICS": True`` without prometheus-client installed
kipekee.E014   ``"ENGINE": "tasks"`` without a task backend that can run it (none
               installed, an unknown ``TASKS`` alias or queue, a backend without defer)
kipekee.W001   no providers: mail is queued but never delivered
kipekee.W002   a provider whose service documents a request limit has no LIMITS["RATE"]
kipekee.W010   SMTP credentials sent without TLS to a host that is not local
kipekee.W011   a development backend (console, file, locmem, dummy) with DEBUG off
kipekee.W012   DEFAULT_FROM_EMAIL is Django's placeholder ``webmaster@localhost``
kipekee.W013   a boto3-based provider (anymail's Amazon SES) retries inside each send
kipekee.W014   ``UNSUBSCRIBE["BASE_URL"]`` is not https (one-click unsubscribe needs it)
kipekee.W015   rows wait in lanes no longer in ``KIPEKEE["LANES"]`` (with the database)
kipekee.E020   ``LIMITER`` store "redis" without the redis client installed
kipekee.W020   ``LIMITER`` store "process" while providers have LIMITS (not shared)
kipekee.W021   ``LIMITER["PERMIT_LEASE_SECONDS"]`` too short to be renewed in time
kipekee.E030   the database stopped part-way through the migrations a squashed one
               replaces, whose files are gone (with the database)
=============  ==============================================================

Checks never connect anywhere: ``manage.py kipekee_check`` does that. W015 reads the
outbox and E030 the migration history, so they run only when the checks are given a
database (``manage.py check --database default``, ``migrate``: E030 stops ``migrate``,
which would otherwise do nothing for Kipekee).
"""

from __future__ import annotations

import importlib.util
from typing import Any
from urllib.parse import urlsplit

from django.conf import settings
from django.core.checks import CheckMessage, Error, Warning, register
from django.db import DatabaseError, connections
from django.db.migrations.loader import MigrationLoader

from . import conf, health, outbox, providers
from .exceptions import ConfigurationError, RoutingLoop

#: Option names that hold a secret; an empty value is almost always an unset variable.
SECRET_OPTIONS = ("password", "api_key", "api_token", "token", "secret", "secret_key")
#: Django's backends that do not deliver: fine while developing, a silent sink in production.
DEVELOPMENT_BACKENDS = {
    "django.core.mail.backends.console.EmailBackend",
    "django.core.mail.backends.filebased.EmailBackend",
    "django.core.mail.backends.locmem.EmailBackend",
    "django.core.mail.backends.dummy.EmailBackend",
}
_LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1"}


@register("kipekee")
def check_settings(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    try:
        parsed = conf.parse(getattr(settings, "KIPEKEE", {}))
    except ConfigurationError as exc:
        return [Error(str(exc), hint="See the KIPEKEE section of Kipekee's README.",
                      id="kipekee.E001")]
    messages: list[CheckMessage] = []
    if not parsed.providers:
        messages.append(Warning(
            'KIPEKEE["PROVIDERS"] is empty: emails will be queued but never delivered.',
            hint='Add at least one provider, e.g. {"BACKEND": '
                 '"kipekee.backends.smtp.EmailBackend", "OPTIONS": {"host": ...}}.',
            id="kipekee.W001"))
    for p in parsed.providers:
        messages.extend(_check_provider(p))
    if parsed.metrics and importlib.util.find_spec("prometheus_client") is None:
        messages.append(Error(
            'KIPEKEE["METRICS"] is True but prometheus-client is not installed.',
            hint="pip install 'django-kipekee[metrics]', or set METRICS to False.",
            id="kipekee.E013"))
    if getattr(settings, "DEFAULT_FROM_EMAIL", "") == "webmaster@localhost":
        messages.append(Warning(
            "DEFAULT_FROM_EMAIL is Django's placeholder 'webmaster@localhost': emails sent "
            "without a from_email will be refused or land in spam.",
            hint='Set DEFAULT_FROM_EMAIL = "Your Shop <orders@your-domain>", a domain your '
                 "providers are allowed to send for (SPF/DKIM).",
            id="kipekee.W012"))
    messages.extend(_check_unsubscribe(parsed.unsubscribe))
    if parsed.engine == "tasks":
        messages.extend(_check_tasks(parsed.tasks))
    messages.extend(_check_limiter(parsed))
    return messages


def _check_limiter(parsed: conf.KipekeeSettings) -> list[CheckMessage]:
    """The store that shares providers' limits between processes (kipekee.limits)."""
    limiter = parsed.limiter
    messages: list[CheckMessage] = []
    if limiter.store == "redis" and importlib.util.find_spec("redis") is None:
        messages.append(Error(
            'KIPEKEE["LIMITER"] keeps limits in Redis but the redis client is not installed: '
            "every process would fall back to limits of its own.",
            hint="pip install 'django-kipekee[redis]', or use the default store "
                 '"database".', id="kipekee.E020"))
    limited = [p.alias for p in parsed.providers if p.rate or p.concurrency]
    if limiter.store == "process" and limited:
        messages.append(Warning(
            f'KIPEKEE["LIMITER"]["STORE"] is "process": the LIMITS of {limited} hold in each '
            "process alone, so N processes together may send N times a provider's limit.",
            hint='Remove "STORE" (the default, "database", shares them through the outbox\'s '
                 'database) or use "redis".', id="kipekee.W020"))
    if limiter.lease < 3:
        messages.append(Warning(
            f'KIPEKEE["LIMITER"]["PERMIT_LEASE_SECONDS"] is {limiter.lease:g}: connection '
            "permits are renewed about once a second, so a lease this short may end under an "
            "open connection and let another process exceed LIMITS['CONCURRENCY'].",
            hint="Use 10 s or more (the default is 30 s: how long a dead process's permits "
                 "stay taken).", id="kipekee.W021"))
    return messages


def _check_tasks(tasks: conf.TasksConfig) -> list[CheckMessage]:
    """The tasks engine needs django.tasks (or the backport) and a backend that can run
    its tasks later (scheduled sends, retries: ``run_after``) on its queue."""
    hint = ("pip install 'django-kipekee[tasks]' and configure TASKS with a backend that "
            "supports defer, e.g. django_tasks_db.DatabaseBackend (see the README).")
    try:
        # Django 6.0's task framework, else the django-tasks package: both optional.
        from django.tasks import task_backends  # noqa: PLC0415
    except ImportError:
        try:
            from django_tasks import task_backends  # type: ignore[assignment]  # noqa: PLC0415
        except ImportError:
            return [Error('KIPEKEE["ENGINE"] is "tasks" but neither django.tasks (Django '
                          "6.0+) nor the django-tasks backport is installed.", hint=hint,
                          id="kipekee.E014")]
    try:
        backend = task_backends[tasks.backend]
    except Exception as exc:  # noqa: BLE001 - InvalidTaskBackend and import errors alike
        return [Error(f'KIPEKEE["TASKS"]["BACKEND"] {tasks.backend!r}: {exc}', hint=hint,
                      id="kipekee.E014")]
    problems = []
    if not backend.supports_defer:
        problems.append(f"{type(backend).__name__} cannot run a task later (run_after)")
    queues = getattr(backend, "queues", None)
    if queues and tasks.queue not in queues:
        problems.append(f"its QUEUES {sorted(queues)} lack {tasks.queue!r}")
    return [Error(f'KIPEKEE["ENGINE"] is "tasks" but the task backend {tasks.backend!r}: '
                  f"{problem}.", hint=hint, id="kipekee.E014") for problem in problems]


def _check_unsubscribe(unsubscribe: conf.UnsubscribeConfig) -> list[CheckMessage]:
    base = urlsplit(unsubscribe.base_url or "")
    if not base.scheme or base.scheme == "https" or base.hostname in _LOCAL_HOSTS:
        return []
    return [Warning(
        f'KIPEKEE["UNSUBSCRIBE"]["BASE_URL"] is {unsubscribe.base_url!r}: mailbox providers '
        "make the one-click unsubscribe POST only to an https link (RFC 8058), and show no "
        "unsubscribe button otherwise.",
        hint="Give the https address your site is served from.", id="kipekee.W014")]


def _check_provider(p: conf.ProviderConfig) -> list[CheckMessage]:
    where = f'KIPEKEE["PROVIDERS"][{p.alias!r}]'
    try:
        cls = providers._backend_class(p.backend)
    except RoutingLoop as exc:
        return [Error(f"{where}: {exc}",
                      hint="A provider's BACKEND must deliver: Kipekee's SMTP backend, "
                           "django's SMTP backend, an anymail backend… Kipekee's drop-in "
                           "belongs in EMAIL_BACKEND only.",
                      id="kipekee.E010")]
    except ConfigurationError as exc:
        return [Error(f"{where}: {exc}",
                      hint="BACKEND must be the dotted path of a Django email backend that "
                           "delivers (not Kipekee's drop-in).",
                      id="kipekee.E002")]
    empty = [name for name in SECRET_OPTIONS if name in p.options and not p.options[name]]
    if empty:
        return [Error(f"{where}: OPTIONS {empty} {'is' if len(empty) == 1 else 'are'} empty.",
                      hint="Secrets come from the environment "
                           '(os.environ["SMTP_PASSWORD"]): is the variable set where this '
                           "process runs?",
                      id="kipekee.E012")]
    messages: list[CheckMessage] = []
    # A backend may declare the request limit its service documents (Mailtrap: 150/10s).
    documented = getattr(cls, "documented_rate", None)
    if documented and not p.rate:
        messages.append(Warning(
            f"{where} has no LIMITS[\"RATE\"]; the service allows {documented} requests, "
            "and a burst beyond it is answered 429.",
            hint=f'Add "LIMITS": {{"RATE": "{documented}"}} to the provider.',
            id="kipekee.W002"))
    try:
        backend = cls(alias=p.alias, **p.options)
    except (ConfigurationError, TypeError, ValueError) as exc:
        return [Error(f"{where}: cannot build {p.backend}: {exc}",
                      hint="Compare OPTIONS with the backend's arguments (Kipekee's SMTP "
                           "backend: host, port, username, password, use_tls, use_ssl, "
                           "timeout, ca_file, ipv4_only, …).",
                      id="kipekee.E011")]
    host = getattr(backend, "host", None)
    if (getattr(backend, "username", None) and not getattr(backend, "use_tls", False)
            and not getattr(backend, "use_ssl", False) and host not in _LOCAL_HOSTS):
        messages.append(Warning(
            f"{where}: logs in to {host} without TLS: the password crosses the network "
            "in clear.",
            hint='Set "use_tls": True (STARTTLS, port 587) or "use_ssl": True (port 465).',
            id="kipekee.W010"))
    config = (getattr(backend, "client_params", None) or {}).get("config")
    if config is not None and getattr(config, "retries", None) is None:
        messages.append(Warning(
            f"{where}: boto3 retries a throttled (429) or failed request up to five times "
            "inside one send, with its own backoff and blind to Retry-After.",
            hint='Use "BACKEND": "kipekee.backends.amazon_ses.EmailBackend" (anymail\'s, with '
                 "boto3's retries off), or set retries in OPTIONS['client_params']['config'].",
            id="kipekee.W013"))
    if p.backend in DEVELOPMENT_BACKENDS and not settings.DEBUG:
        messages.append(Warning(
            f"{where}: {p.backend} does not deliver, and DEBUG is off: every email it "
            "'sends' is marked sent and lost.",
            hint="Use a real provider in production; keep development backends in the "
                 "development settings.",
            id="kipekee.W011"))
    return messages


@register("kipekee", "database")
def check_stray_lanes(app_configs: Any = None, databases: Any = None,
                      **kwargs: Any) -> list[CheckMessage]:
    """Rows waiting in lanes that are not configured: engines move them to the default
    lane (``kipekee.outbox.adopt_stray_lanes``); say so, since their lane's priority,
    share and rate no longer apply."""
    if not databases:
        return []
    messages: list[CheckMessage] = []
    for alias in databases:
        try:
            strays = outbox.stray_lanes(using=alias)
        except (DatabaseError, ConfigurationError):
            continue  # not migrated yet, or the settings are invalid (E001 says so)
        if strays:
            total = sum(strays.values())
            lanes = ", ".join(f"{lane!r} ({count})" for lane, count in sorted(strays.items()))
            messages.append(Warning(
                f"{total} outbox {'row waits' if total == 1 else 'rows wait'} in lanes that "
                "are not in "
                f'KIPEKEE["LANES"]: {lanes} (database {alias!r}).',
                hint=f"Engines deliver them in the {conf.TRANSACTIONAL!r} lane; put the lane "
                     "back in the settings if they should keep its priority, share and rate.",
                id="kipekee.W015"))
    return messages


@register("kipekee", "database")
def check_migration_history(app_configs: Any = None, databases: Any = None,
                            **kwargs: Any) -> list[CheckMessage]:
    """An install stopped between two migrations that a squashed one replaces, once their
    files are gone: ``migrate`` would apply nothing of Kipekee's and say all is well."""
    messages: list[CheckMessage] = []
    for alias in databases or ():
        try:
            stopped = health.stopped_part_way(MigrationLoader(connections[alias]))
        except DatabaseError:
            continue  # unreachable: migrate and kipekee_check say so themselves
        if stopped:
            messages.append(Error(f"Database {alias!r}: kipekee's migrations {stopped}.",
                                  id="kipekee.E030"))
    return messages
