import importlib.util

from django.apps import AppConfig


class KipekeeConfig(AppConfig):
    name = "kipekee"
    verbose_name = "Kipekee email outbox"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        # Registers the system checks and the setting_changed receiver.
        from . import checks, conf  # noqa: F401

        if importlib.util.find_spec("anymail") is not None:
            # Delivery webhooks (anymail's tracking signal) update rows and suppressions.
            from . import webhooks  # noqa: F401
