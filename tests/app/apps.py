from django.apps import AppConfig


class TestAppConfig(AppConfig):
    name = "tests.app"
    label = "app"

    def ready(self) -> None:
        # Notifications are declared at start-up, as a project would in its own app.
        from . import notifications  # noqa: F401
