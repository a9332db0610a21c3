"""The same assertions from Django's own ``TestCase``, without pytest's fixtures: the kit's
functions are plain functions."""

from __future__ import annotations

import uuid

from django.test import TestCase

import kipekee
from kipekee.testing.assertions import assert_queued, assert_sent, deliver_outbox
from kipekee.testing.kit import TestOutbox
from kipekee.testing.smtp import LocalSMTPServer
from shop.models import Order, QuoteRequest


class QuoteMailTests(TestCase):
    def setUp(self) -> None:
        server = LocalSMTPServer()
        server.start()
        self.addCleanup(server.stop)
        outbox = TestOutbox(server)
        outbox.use()
        self.addCleanup(outbox.restore)

    def test_quote_request(self) -> None:
        quote = QuoteRequest.objects.create(name="Ann Traveller", email="ann@example.com",
                                            tour="Zanzibar beaches", travellers=2,
                                            submission=uuid.uuid4())
        # A TestCase never commits: run the commit hooks, where Kipekee delivers.
        with self.captureOnCommitCallbacks(execute=True):
            kipekee.notify("quote.received", quote)
        assert_sent(to="ann@example.com", subject="We received your quote request for Zanzibar beaches")
        assert_sent(to="office@tours.example", count=1)

    def test_order_in_the_queue(self) -> None:
        order = Order.objects.create(customer_email="juma@example.com", customer_name="Juma",
                                     total="9.50", submission=uuid.uuid4())
        kipekee.notify("order.created", order)
        assert_queued(to="juma@example.com")
        deliver_outbox()
        assert_sent(to="juma@example.com", subject=f"Order #{order.pk} received")
