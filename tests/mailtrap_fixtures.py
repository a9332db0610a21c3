"""Pytest fixtures for the local Mailtrap-contract server (kipekee.testing.LocalMailtrapServer).

Loaded by tests/conftest.py through ``pytest_plugins``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any, Protocol

import pytest

from kipekee.testing import LocalMailtrapServer

MAILTRAP_BACKEND = "kipekee.backends.mailtrap.EmailBackend"
TOKEN = "test-token"


class MailtrapServerFactory(Protocol):
    def __call__(self, **kwargs: Any) -> LocalMailtrapServer: ...


@pytest.fixture
def mailtrap_server() -> Iterator[MailtrapServerFactory]:
    """``mailtrap_server(**kwargs)`` starts a server (stopped after the test)."""
    with ExitStack() as stack:

        def start(**kwargs: Any) -> LocalMailtrapServer:
            kwargs.setdefault("tokens", {TOKEN})
            return stack.enter_context(LocalMailtrapServer(**kwargs))

        yield start


@pytest.fixture
def mailtrap(mailtrap_server: MailtrapServerFactory) -> LocalMailtrapServer:
    """A transactional-stream server with the default limit, no latency."""
    return mailtrap_server()


def mailtrap_provider(server: LocalMailtrapServer, *, limits: dict[str, Any] | None = None,
                      **options: Any) -> dict[str, Any]:
    """A KIPEKEE provider entry pointing Kipekee's Mailtrap backend at a local server."""
    entry: dict[str, Any] = {
        "BACKEND": MAILTRAP_BACKEND,
        "OPTIONS": {"api_token": TOKEN, "api_url": server.api_url, "timeout": 2, **options},
    }
    if limits:
        entry["LIMITS"] = limits
    return entry
