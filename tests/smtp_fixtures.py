"""Pytest fixtures for a real local SMTP server (kipekee.testing.LocalSMTPServer).

Loaded by tests/conftest.py through ``pytest_plugins``. TLS uses a throwaway CA from
``trustme``: clients trust it with ``ssl.create_default_context(cafile=smtp_ca_file)``
(or the ``smtp_client_ssl_context`` fixture), exactly as a deployment would trust a
private CA.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Protocol

import pytest
import trustme

from kipekee.testing import LocalSMTPServer


class SMTPServerFactory(Protocol):
    def __call__(self, **kwargs: Any) -> LocalSMTPServer: ...


@pytest.fixture(scope="session")
def smtp_ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="session")
def smtp_ca_file(smtp_ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("smtp-ca") / "ca.pem"
    smtp_ca.cert_pem.write_to_path(str(path))
    return path


@pytest.fixture(scope="session")
def server_ssl_context(smtp_ca: trustme.CA) -> ssl.SSLContext:
    """Server side: a certificate from ``smtp_ca`` for localhost, 127.0.0.1 and ::1."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    smtp_ca.issue_cert("localhost", "127.0.0.1", "::1").configure_cert(context)
    return context


@pytest.fixture(scope="session")
def smtp_client_ssl_context(smtp_ca_file: Path) -> ssl.SSLContext:
    """Client side: verifies certificates (and host names) against ``smtp_ca`` only."""
    return ssl.create_default_context(cafile=str(smtp_ca_file))


@pytest.fixture
def smtp_server(server_ssl_context: ssl.SSLContext) -> Iterator[SMTPServerFactory]:
    """``make(**kwargs)`` starts a LocalSMTPServer; all are stopped after the test.

    With ``tls="starttls"`` or ``"ssl"`` and no ``ssl_context``, the server uses
    ``server_ssl_context`` (the trustme certificate).
    """
    with ExitStack() as stack:

        def make(**kwargs: Any) -> LocalSMTPServer:
            if kwargs.get("tls", "none") != "none":
                kwargs.setdefault("ssl_context", server_ssl_context)
            # ExitStack: stopped in reverse order, and each one even if another's
            # stop() raised.
            return stack.enter_context(LocalSMTPServer(**kwargs))

        yield make


@pytest.fixture
def smtp_sink(smtp_server: SMTPServerFactory) -> LocalSMTPServer:
    """A started plain server (no TLS, no AUTH) that accepts everything."""
    return smtp_server()
