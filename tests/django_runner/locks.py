"""Engines on the database Django's test runner makes of an in-memory SQLite database
(``file:memorydb_default?mode=memory&cache=shared``), run by tests/test_testmode.py.

Every thread's connection shares one cache there, and SQLite's shared-cache locks are
per table: a statement that meets another connection's lock fails at once with
``SQLITE_LOCKED`` ("database table is locked"), where a database file would wait its
busy timeout. These tests hold such a lock from a second connection, as a project's own
test (or another sender thread of the worker) would, at the moment Kipekee writes.
"""

import io
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from django.core import mail
from django.core.mail import EmailMessage
from django.core.mail.backends import locmem
from django.core.management import call_command
from django.db import connection, transaction
from django.test import TransactionTestCase, override_settings

import kipekee
from kipekee import outbox
from kipekee.delivery import Deliverer
from kipekee.models import Attempt, OutboxEmail
from kipekee.recording import record_many

#: How long the other connection holds its lock: far less than the wait Kipekee allows.
HOLD_SECONDS = 0.3


def _hold_the_outbox(write: bool, holding: threading.Event, release: threading.Event,
                     failed: list[BaseException]) -> None:
    """In a transaction of this thread's own connection: read (or write) the outbox
    table, then keep the table's lock until ``release`` or ``HOLD_SECONDS``."""
    table = OutboxEmail._meta.db_table
    sql = (f"UPDATE {table} SET attempts = attempts WHERE id = -1" if write
           else f"SELECT COUNT(*) FROM {table}")
    try:
        with transaction.atomic():
            with connection.cursor() as cursor:
                cursor.execute(sql)
                cursor.fetchall()
            holding.set()
            release.wait(HOLD_SECONDS)
    except BaseException as exc:  # noqa: BLE001 - raised in the test's thread
        failed.append(exc)
    finally:
        holding.set()


@contextmanager
def another_connection_holding_the_outbox(*, write: bool = False) -> Iterator[None]:
    """Another thread's connection holds a lock on the outbox table (a read lock, or a
    write lock with ``write``) from the start of the block for ``HOLD_SECONDS``."""
    holding, release = threading.Event(), threading.Event()
    failed: list[BaseException] = []
    other = threading.Thread(target=_hold_the_outbox, args=(write, holding, release, failed),
                             name="other-connection")
    other.start()
    holding.wait(5)
    if failed:
        other.join()
        raise failed[0]
    try:
        yield
    finally:
        other.join(5)


class HoldingBackend(locmem.EmailBackend):
    """Django's locmem backend; once it has sent, another connection starts reading the
    outbox table and holds its lock while the worker records what was sent."""

    def send_messages(self, messages: Sequence[EmailMessage]) -> int:
        count = super().send_messages(messages)
        holding = threading.Event()
        threading.Thread(target=_hold_the_outbox, args=(False, holding, threading.Event(), []),
                         name="other-connection", daemon=True).start()
        holding.wait(5)
        return count


class SharedCacheLocks(TransactionTestCase):
    def test_a_record_waits_for_another_connections_lock(self):
        receipt = kipekee.send(subject="Locked", text="b", to="ann@example.com", mode="queue")
        rows = outbox.claim_batch(10, engine="test")
        with Deliverer() as deliverer:
            outcomes = deliverer.deliver_many(rows)
        with another_connection_holding_the_outbox():
            with transaction.atomic():
                self.assertEqual(record_many(rows, outcomes), [True])
        self.assertTrue(receipt.refresh().sent, receipt)
        self.assertEqual(Attempt.objects.filter(email_id=receipt.id).count(), 1)

    def test_a_claim_and_a_due_time_wait_for_another_connections_lock(self):
        receipt = kipekee.send(subject="Locked", text="b", to="ann@example.com", mode="queue")
        with another_connection_holding_the_outbox():
            self.assertEqual([row.pk for row in outbox.claim_batch(10, engine="test")],
                             [receipt.id])
        # A writer's lock keeps readers out too, until it commits.
        with another_connection_holding_the_outbox(write=True):
            self.assertIsNotNone(outbox.next_due_at())

    @override_settings(KIPEKEE={"ENGINE": None, "PROVIDERS": {"primary": {
        "BACKEND": "tests.django_runner.locks.HoldingBackend"}}})
    def test_the_worker_records_what_it_sent_while_another_connection_reads(self):
        receipt = kipekee.send(subject="Later", text="b", to="ann@example.com", mode="queue")
        out, err = io.StringIO(), io.StringIO()
        call_command("kipekee_worker", "--once", stdout=out, stderr=err)
        self.assertEqual([m.subject for m in mail.outbox], ["Later"])
        self.assertTrue(receipt.refresh().sent, (receipt, out.getvalue()))
        self.assertEqual(Attempt.objects.filter(email_id=receipt.id).count(), 1)
        self.assertNotIn("locked", out.getvalue())
