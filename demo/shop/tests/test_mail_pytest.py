"""The demo's emails, tested as a project that uses Kipekee tests its own: with the
``kipekee_outbox`` fixture of Kipekee's pytest plugin and its assertions."""

from __future__ import annotations

import uuid
from decimal import Decimal

import pytest

import kipekee
from kipekee import suppression
from kipekee.testing.assertions import assert_not_sent, assert_queued, assert_sent, assert_suppressed
from kipekee.testing.kit import TestOutbox
from kipekee.testing.smtp import LocalSMTPServer
from shop.models import Order, QuoteRequest

# Delivery happens when the transaction commits, as in production.
pytestmark = pytest.mark.django_db(transaction=True)


def quote(email: str = "ann@example.com") -> QuoteRequest:
    return QuoteRequest.objects.create(name="Ann Traveller", email=email, tour="Zanzibar beaches",
                                       travellers=2, submission=uuid.uuid4())


def test_a_quote_request_mails_the_office_and_the_customer(kipekee_outbox: TestOutbox) -> None:
    kipekee.notify("quote.received", quote())

    assert_sent(to="office@tours.example", subject="New quote request from Ann Traveller")
    [row] = assert_sent(to="Ann@Example.com", subject="We received your quote request for Zanzibar beaches")
    assert row.event == "quote.received"
    # What reached the SMTP server, for the checks the outbox cannot answer.
    assert {m.subject for m in kipekee_outbox.messages} == {
        "New quote request from Ann Traveller", "We received your quote request for Zanzibar beaches"}


def test_order_mail_waits_for_the_engine(kipekee_outbox: TestOutbox) -> None:
    order = Order.objects.create(customer_email="juma@example.com", customer_name="Juma",
                                 total=Decimal("120.00"), submission=uuid.uuid4())
    kipekee.notify("order.created", order)  # mode "queue" in the demo's notifications

    kipekee_outbox.assert_queued(to="juma@example.com", subject=f"Order #{order.pk} received")
    assert_not_sent(to="juma@example.com")
    assert kipekee_outbox.deliver() == 1  # one engine pass, here
    kipekee_outbox.assert_sent(to="juma@example.com", subject=f"Order #{order.pk} received", count=1)


def test_a_suppressed_customer_gets_nothing_and_the_office_still_does(
        kipekee_outbox: TestOutbox) -> None:
    suppression.add("ann@example.com")
    kipekee.notify("quote.received", quote())

    assert_suppressed("ann@example.com", template="emails/quote_received")
    assert_not_sent(to="ann@example.com")
    assert_sent(to="office@tours.example")


def test_a_provider_that_is_down_leaves_the_mail_queued_then_failover_sends_it(
        kipekee_outbox: TestOutbox, kipekee_failing_smtp: LocalSMTPServer) -> None:
    kipekee_outbox.use(kipekee_failing_smtp)
    kipekee.notify("quote.received", quote())
    # Transient refusals: deferred for an engine, nothing lost, nothing sent.
    assert_queued(to="ann@example.com", status="deferred")
    assert kipekee_failing_smtp.messages == []

    kipekee_outbox.use(kipekee_failing_smtp, kipekee_outbox.server)  # a backup provider
    kipekee.notify("quote.received", quote("baraka@example.com"))
    [row] = assert_sent(to="baraka@example.com")
    assert row.sent_by == "kipekee_test_1"


def test_a_failed_assertion_says_what_the_outbox_holds(kipekee_outbox: TestOutbox) -> None:
    kipekee.notify("quote.received", quote())
    with pytest.raises(AssertionError) as raised:
        assert_sent(to="nobody@example.com")
    assert "No email sent matching to='nobody@example.com'" in str(raised.value)
    assert "We received your quote request for Zanzibar beaches" in str(raised.value)
