"""Kipekee's pytest plugin: fixtures for the tests of projects that use Kipekee.

Installed with Kipekee (entry point ``pytest11``), so pytest finds it by itself; the
fixtures need the ``kipekee[testing]`` extra (the local SMTP server) and a configured
Django (pytest-django). Their names all start with ``kipekee_``:

- ``kipekee_smtp``: a started local SMTP server (:class:`~kipekee.testing.LocalSMTPServer`)
  that accepts every message; ``.messages`` is what it received.
- ``kipekee_outbox``: Kipekee configured for the test to deliver at once (mode ``now``,
  no engine) to ``kipekee_smtp``: a :class:`~kipekee.testing.kit.TestOutbox` with the
  assertions of :mod:`kipekee.testing.assertions`, and ``deliver()`` for mail sent in
  mode ``queue``.
- ``kipekee_failing_smtp``: a local SMTP server that refuses every message with a
  transient ``451``; ``kipekee_outbox.use(kipekee_failing_smtp, kipekee_smtp)`` shows
  failover, ``kipekee_outbox.use(kipekee_failing_smtp)`` deferral.

Delivery happens when the test's transaction commits, as in production: mark the test
``@pytest.mark.django_db(transaction=True)``, or send inside
``django_capture_on_commit_callbacks(execute=True)``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from .kit import TestOutbox
    from .smtp import LocalSMTPServer

# The imports inside the fixtures are deliberate: pytest loads this plugin in every
# project that installed Kipekee, before Django is configured (kipekee.models cannot be
# imported then), and the SMTP server needs the optional "testing" extra (aiosmtpd),
# which a project without it must not need just to run pytest.


@pytest.fixture
def kipekee_smtp() -> Iterator[LocalSMTPServer]:
    """A started local SMTP server that accepts every message; stopped after the test."""
    from .smtp import LocalSMTPServer

    with LocalSMTPServer() as server:
        yield server


@pytest.fixture
def kipekee_failing_smtp() -> Iterator[LocalSMTPServer]:
    """A started local SMTP server that refuses every message with ``451 4.3.0``
    (transient); ``server.faults.mail_reply = None`` lets mail through again."""
    from .kit import failing_smtp_server

    with failing_smtp_server() as server:
        yield server


@pytest.fixture
def kipekee_outbox(kipekee_smtp: LocalSMTPServer) -> Iterator[TestOutbox]:
    """Kipekee delivering at once (mode ``now``, no engine) to ``kipekee_smtp``."""
    from .kit import TestOutbox

    outbox = TestOutbox(kipekee_smtp)
    outbox.use()
    try:
        yield outbox
    finally:
        outbox.restore()
