"""The demo's capture SMTP servers: real SMTP on 127.0.0.1 (kipekee.testing), each
message stored as a CapturedMessage as it arrives.

They run in the web process (``manage.py kipekee_demo_serve``), so the inbox page can take
a server down and bring it back: ``set_down("primary", True)`` closes its open sessions
and answers every new connection with ``421`` (a provider outage), and Kipekee fails
over to the next provider.

Mail to the newsletter's unsubscribe address (``KIPEKEE["UNSUBSCRIBE"]["MAILTO"]``: what a
mail client sends for the ``mailto:`` link of ``List-Unsubscribe``) is handed to
:func:`kipekee.lists.unsubscribe_by_mail`, as an ESP's inbound webhook would hand it over
in production (anymail's ``inbound`` signal).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from django.db import close_old_connections

from kipekee import lists
from kipekee.testing import Faults, LocalSMTPServer, ReceivedMessage

from .models import CapturedMessage

#: Addresses the servers refuse, for the "that address was refused" feedback.
REFUSED = {"refused@example.com": "550 5.1.1 refused@example.com: no such user here"}
DOWN_GREETING = "421 4.3.2 Service not available (taken down in the dev inbox)"

servers: dict[str, LocalSMTPServer] = {}


# on_message runs in the server's asyncio thread, where Django refuses database calls;
# one writer thread stores each message before the server replies 250 (so a message the
# sender saw accepted is already in the inbox).
_writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="devinbox-writer")


def _write(name: str, received: ReceivedMessage) -> None:
    close_old_connections()  # a long-lived thread, like a worker's
    CapturedMessage.objects.create(
        server=name, mail_from=received.mail_from, rcpt_tos=list(received.rcpt_tos),
        subject=received.subject or "", raw=received.data)
    # Not ours (None) unless it is to the unsubscribe address; a bad token changes nothing.
    lists.unsubscribe_by_mail(to=received.rcpt_tos, subject=received.subject or "")


def _store(name: str) -> Callable[[ReceivedMessage], None]:
    def store(received: ReceivedMessage) -> None:
        _writer.submit(_write, name, received).result()

    return store


def start(name: str, port: int) -> LocalSMTPServer:
    server = LocalSMTPServer(port=port, faults=Faults(refuse_recipients=dict(REFUSED)),
                             on_message=_store(name))
    server.start()
    servers[name] = server
    return server


def stop_all() -> None:
    for server in servers.values():
        server.stop()
    servers.clear()


def is_down(name: str) -> bool:
    return servers[name].faults.greeting is not None


def set_down(name: str, down: bool) -> None:
    server = servers[name]
    server.faults.greeting = DOWN_GREETING if down else None
    if down:
        # A provider that goes down ends the sessions it had too (Kipekee keeps a warm
        # one): they hear the same 421, and then the connection closes.
        server.drop_connections(DOWN_GREETING)
