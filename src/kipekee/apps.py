import importlib.util

from django.apps import AppConfig


class KipekeeConfig(AppConfig):
    name = "kipekee"
    verbose_name = "Kipekee email outbox"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        # Registers the system checks and the setting_changed receiver.
        from . import checks, conf, logs  # noqa: F401

        logs.connect()
        if importlib.util.find_spec("prometheus_client") is not None:
            # Optional extra; without it "METRICS": True is a system check error (E013).
            from . import metrics

            metrics.install()
