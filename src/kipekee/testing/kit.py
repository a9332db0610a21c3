"""The outbox a test configures: :class:`TestOutbox`, behind the ``kipekee_outbox`` fixture
of :mod:`kipekee.testing.pytest_plugin`, usable without pytest too::

    class SignupTests(TransactionTestCase):
        def setUp(self):
            self.smtp = LocalSMTPServer()
            self.smtp.start()
            self.addCleanup(self.smtp.stop)
            self.outbox = TestOutbox(self.smtp)
            self.outbox.use()
            self.addCleanup(self.outbox.restore)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from django.conf import settings as django_settings
from django.test.utils import override_settings

from . import assertions
from .smtp import Faults, LocalSMTPServer, ReceivedMessage

__all__ = ["PROVIDER", "TestOutbox", "failing_smtp_server", "smtp_provider"]

#: The provider alias :meth:`TestOutbox.use` configures (the next ones: ``_1``, ``_2``, ...).
PROVIDER = "kipekee_test"
SMTP_BACKEND = "kipekee.backends.smtp.EmailBackend"
#: The reply of :func:`failing_smtp_server` to every message.
TRANSIENT_REFUSAL = "451 4.3.0 kipekee test server: try again later"


def smtp_provider(server: LocalSMTPServer, **options: Any) -> dict[str, Any]:
    """A ``KIPEKEE["PROVIDERS"]`` entry that delivers to a local test server."""
    return {"BACKEND": SMTP_BACKEND,
            "OPTIONS": {"host": server.host, "port": server.port, "timeout": 5, **options}}


def failing_smtp_server() -> LocalSMTPServer:
    """A local SMTP server (not started) that refuses every message with a transient
    ``451``; change ``server.faults`` while it runs to let mail through."""
    return LocalSMTPServer(faults=Faults(mail_reply=TRANSIENT_REFUSAL))


@dataclass
class TestOutbox:
    """Kipekee configured for one test to deliver at once to local SMTP servers.

    :meth:`use` applies the settings (``override_settings``, so Kipekee's cached
    configuration is rebuilt), :meth:`restore` takes them back. The assertion methods are
    those of :mod:`kipekee.testing.assertions`.
    """

    __test__ = False  # not a test class, whatever pytest's naming rules say

    server: LocalSMTPServer
    _override: override_settings | None = field(default=None, repr=False)

    @property
    def messages(self) -> list[ReceivedMessage]:
        """The messages :attr:`server` received, in order."""
        return list(self.server.messages)

    def use(self, *servers: LocalSMTPServer, **settings: Any) -> None:
        """Deliver through ``servers`` in this order (failover; default: :attr:`server`),
        with other ``KIPEKEE`` settings (``MODE="hybrid"``, ``RETRY={...}``) on top."""
        providers = {PROVIDER if index == 0 else f"{PROVIDER}_{index}": smtp_provider(server)
                     for index, server in enumerate(servers or (self.server,))}
        kipekee = {
            **getattr(django_settings, "KIPEKEE", {}),
            "PROVIDERS": providers,
            "MODE": "now",
            "ENGINE": None,  # no background thread delivering behind the test's back
            # Quick in-request retries: a test waits a fraction of a second, not seconds.
            "NOW_RETRY_DELAYS": [0.05, 0.1],
            "NOW_TIME_BUDGET": 5,
            **settings,
        }
        self.restore()
        self._override = override_settings(KIPEKEE=kipekee)
        self._override.enable()

    def restore(self) -> None:
        """Take back the settings :meth:`use` applied."""
        if self._override is not None:
            self._override.disable()
            self._override = None

    def deliver(self) -> int:
        """Deliver what waits for an engine now (mail sent in mode ``queue``)."""
        return assertions.deliver_outbox()

    def assert_sent(self, **criteria: Any) -> list[Any]:
        return assertions.assert_sent(**criteria)

    def assert_not_sent(self, **criteria: Any) -> None:
        assertions.assert_not_sent(**criteria)

    def assert_queued(self, **criteria: Any) -> list[Any]:
        return assertions.assert_queued(**criteria)

    def assert_suppressed(self, to: str, **criteria: Any) -> list[Any]:
        return assertions.assert_suppressed(to, **criteria)
