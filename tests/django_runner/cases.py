"""Tests as a project writes them, for Django's test runner (not collected by pytest).

Kipekee delivers when the transaction that wrote the outbox row commits. A ``TestCase``
never commits: ``captureOnCommitCallbacks(execute=True)`` runs what a commit would run,
as Django's documentation advises for on_commit. A ``TransactionTestCase`` commits.

Django's runner replaces the project's EMAIL_BACKEND (MAILERS on 6.1) with locmem, so
``send_mail`` goes straight to ``mail.outbox``, not through the drop-in; a test that wants
the production path (the outbox row, delivery on commit) puts the drop-in back with
``use_drop_in()``.
"""

import io

import django
from django.core import mail
from django.core.mail import EmailMessage, send_mail
from django.core.management import call_command
from django.db import transaction
from django.test import TestCase, TransactionTestCase, override_settings

import kipekee
from kipekee.models import OutboxEmail, Status
from tests.app.models import Quote

DROP_IN = "kipekee.backend.EmailBackend"


def use_drop_in():
    if django.VERSION >= (6, 1):
        return override_settings(MAILERS={"default": {"BACKEND": DROP_IN}})
    return override_settings(EMAIL_BACKEND=DROP_IN)


class MailInTheOutbox(TestCase):
    def test_kipekee_send(self):
        with self.captureOnCommitCallbacks(execute=True):
            receipt = kipekee.send(subject="Your order", text="Thanks!", to="ann@example.com")
        self.assertTrue(receipt.sent)
        self.assertEqual(len(mail.outbox), 1)
        self.assertEqual(mail.outbox[0].subject, "Your order")
        self.assertEqual(mail.outbox[0].to, ["ann@example.com"])
        self.assertEqual(mail.outbox[0].extra_headers["Message-ID"], receipt.message_id)

    def test_kipekee_notify(self):
        quote = Quote.objects.create(name="Ann", email="ann@example.com", trip="Serengeti")
        with self.captureOnCommitCallbacks(execute=True):
            kipekee.notify("quote_request.received", quote)
        self.assertEqual(sorted(m.to[0] for m in mail.outbox),
                         ["ann@example.com", "office@example.com"])

    def test_send_mail(self):
        # Django's runner swapped the drop-in for locmem: straight to the outbox list.
        self.assertEqual(send_mail("Hi", "body", None, ["bob@example.com"]), 1)
        self.assertEqual([m.subject for m in mail.outbox], ["Hi"])
        self.assertFalse(OutboxEmail.objects.exists())

    @use_drop_in()
    def test_send_mail_through_the_drop_in(self):
        with self.captureOnCommitCallbacks(execute=True):
            self.assertEqual(send_mail("Hi", "body", None, ["bob@example.com"]), 1)
            EmailMessage("Again", "body", to=["bob@example.com"]).send()
        self.assertEqual([m.subject for m in mail.outbox], ["Hi", "Again"])
        self.assertEqual(OutboxEmail.objects.filter(status=Status.SENT).count(), 2)

    def test_each_test_starts_with_an_empty_outbox(self):
        self.assertEqual(mail.outbox, [])

    def test_queued_mail_waits_for_an_engine(self):
        with self.captureOnCommitCallbacks(execute=True):
            receipt = kipekee.send(subject="Later", text="b", to="ann@example.com", mode="queue")
        self.assertEqual((receipt.status, mail.outbox), (Status.QUEUED, []))


@use_drop_in()
class CommittedTransactions(TransactionTestCase):
    def test_delivered_on_commit(self):
        with transaction.atomic():
            kipekee.send(subject="Committed", text="b", to="ann@example.com")
            self.assertEqual(mail.outbox, [])  # not before the commit
        self.assertEqual([m.subject for m in mail.outbox], ["Committed"])

    def test_queued_mail_is_delivered_by_an_engine(self):
        receipt = kipekee.send(subject="Later", text="b", to="ann@example.com", mode="queue")
        self.assertEqual(mail.outbox, [])
        call_command("kipekee_worker", "--once", stdout=io.StringIO(), stderr=io.StringIO())
        self.assertEqual([m.subject for m in mail.outbox], ["Later"])
        self.assertTrue(receipt.refresh().sent, receipt)

    def test_rolled_back_mail_is_never_delivered(self):
        try:
            with transaction.atomic():
                send_mail("Rolled back", "b", None, ["ann@example.com"])
                raise RuntimeError
        except RuntimeError:
            pass
        self.assertEqual(mail.outbox, [])
