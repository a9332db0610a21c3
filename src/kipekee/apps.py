import importlib.util

from django.apps import AppConfig


class KipekeeConfig(AppConfig):
    name = "kipekee"
    verbose_name = "Kipekee email outbox"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        # Registers the system checks and the setting_changed receiver.
        from django.core.signals import request_started

        from . import checks, conf, logs, sqlite  # noqa: F401

        logs.connect()
        # Django's in-memory SQLite test database: engine threads wait for each other's
        # table locks instead of failing at once (kipekee.sqlite).
        sqlite.install()
        if importlib.util.find_spec("prometheus_client") is not None:
            # Optional extra; without it "METRICS": True is a system check error (E013).
            from . import metrics

            metrics.install()
        if importlib.util.find_spec("anymail") is not None:
            # Delivery events (anymail's tracking signal) update rows and suppressions.
            from . import tracking  # noqa: F401
            # The mailto: unsubscribe link's email, when an ESP forwards inbound mail
            # to anymail's inbound webhook.
            from anymail.signals import inbound

            from . import lists

            inbound.connect(lists.on_inbound, dispatch_uid="kipekee-lists-inbound")

        # The thread engine starts with the first request of a process (not at import,
        # which also happens in migrate, shell and friends), so rows left deferred by a
        # previous deploy are picked up without waiting for a new email. Later requests
        # only check that it runs: a commit that queued mail is what wakes it.
        request_started.connect(_start_thread_engine, dispatch_uid="kipekee-thread-engine")


def _start_thread_engine(**kwargs: object) -> None:
    from . import engines

    engines.start()
