import os
import random

from django.apps import AppConfig


class TestAppConfig(AppConfig):
    name = "tests.app"
    label = "app"

    def ready(self) -> None:
        # Notifications are declared at start-up, as a project would in its own app.
        from . import notifications  # noqa: F401

        share = float(os.environ.get("KIPEKEE_SOAK_RAISE") or 0)
        if share:
            _connect_raising_receivers(share, random.Random(os.environ.get("KIPEKEE_SOAK_SEED")))


class SoakReceiverError(Exception):
    pass


def _connect_raising_receivers(share: float, rng: random.Random) -> None:
    """The soak's worker processes (tests/soak.py): receivers of kipekee's signals that
    raise for a ``share`` of the signals, as a project's buggy receiver would."""
    from kipekee import signals

    def receiver(sender, **kwargs) -> None:
        if rng.random() < share:
            raise SoakReceiverError("a project's receiver failed")

    for signal in (signals.sent, signals.deferred, signals.failed, signals.queued):
        signal.connect(receiver, weak=False, dispatch_uid=f"soak-raise-{id(signal)}")
