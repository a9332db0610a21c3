"""Every email event of the four seed systems, declared once (ShopConfig.ready()), each
with the sample it is previewed with (the admin's Previews, ``manage.py kipekee_render``).
Samples are unsaved objects: previews never write."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal

from django.conf import settings
from django.utils import timezone

from kipekee import previews
from kipekee.notifications import Message, admins, register
from kipekee.qr import qr_attachment

from .models import (
    NEWSLETTER,
    Booking,
    JobApplication,
    NewsletterIssue,
    Order,
    QuoteRequest,
    Show,
    Subscriber,
)

SAMPLE_PDF = b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF\n"


def sample_quote() -> QuoteRequest:
    return QuoteRequest(name="Ann Traveller", email="ann@example.com", tour="Serengeti, 5 days",
                        travellers=2, message="Vegetarian meals, please.")


def sample_application() -> JobApplication:
    return JobApplication(name="Baraka Mwangi", email="baraka@example.com", position="Tour guide",
                          cv_name="cv-baraka.pdf", cv=SAMPLE_PDF)


def sample_subscriber() -> Subscriber:
    return Subscriber(email="zawadi@example.com", mailbox="zawadi@example.com")


def sample_order() -> Order:
    return Order(pk=1042, customer_email="juma@example.com", customer_name="Juma",
                 total=Decimal("120.00"), status=Order.Status.ACCEPTED, paid=True)


def sample_booking() -> Booking:
    show = Show(film="Queen of Katwe", starts_at=timezone.now() + timedelta(days=2))
    return Booking(show=show, name="Amani", email="amani@example.com", seat="F7",
                   number="5EA7F00D", status=Booking.Status.CONFIRMED)


# Tours (001): the office and the customer, in the request (hybrid: instant feedback).
register(
    "quote.received",
    Message("emails/quote_admin", name="admin", to=admins, reply_to=lambda q: q.email,
            context=lambda q: {"quote": q}),
    Message("emails/quote_received", name="customer", to=lambda q: q.email,
            context=lambda q: {"quote": q}),
    sample=sample_quote,
)
register(
    "application.received",
    Message("emails/application", name="careers", to=lambda a: settings.DEMO_CAREERS_EMAIL,
            reply_to=lambda a: a.email,
            attachments=lambda a: [(a.cv_name, bytes(a.cv), "application/pdf")]),
    sample=sample_application,
)
# The welcome is list mail too (its footer offers the way out), sent in the request and in
# the transactional lane: the subscriber waits for it. The issues: views.newsletter_issue.
register("newsletter.subscribed",
         Message("emails/welcome", name="welcome", to=lambda s: s.email, mailing_list=NEWSLETTER,
                 lane="transactional"),
         sample=sample_subscriber)

# Marketplace (003): each transition one email, delivered by the engine, not the request.
# (emails/order_status.subject.txt words each event.)
ORDER_EVENTS = ("order.created", "order.accepted", "order.delivered", "order.paid", "order.cancelled")
for _event in ORDER_EVENTS:
    register(_event, Message("emails/order_status", name="customer", to=lambda o: o.customer_email,
                             mode="queue", context=lambda o, e=_event: {"event": e}),
             sample=sample_order)


def ticket(booking: Booking) -> str:
    return f"BOOKING:{booking.number};SEAT:{booking.seat}"


# Cinema (004): the ticket (QR inline and attached), payment failed, the reminder.
register(
    "booking.confirmed",
    Message("emails/booking_confirmed", name="customer", to=lambda b: b.email,
            context=lambda b: {"ticket": ticket(b)},
            attachments=lambda b: [qr_attachment(ticket(b), f"ticket-{b.number}.png")]),
    sample=sample_booking,
)
register("booking.payment_failed",
         Message("emails/payment_failed", name="customer", to=lambda b: b.email),
         sample=sample_booking)
register(
    "booking.reminder",
    Message("emails/show_reminder", name="customer", to=lambda b: b.email,
            at=lambda b: b.show.starts_at - timedelta(hours=24),
            when=lambda b: b.status == Booking.Status.CONFIRMED),
    model=Booking,
    sample=sample_booking,
)

# Templates sent with kipekee.send: their sample contexts.
previews.register_template("emails/otp", to="admin@payments.example",
                           sample=lambda: {"code": "042917", "minutes": 5, "attempts": 5})
previews.register_template("emails/notice", sample=lambda: {
    "notice_subject": "Maintenance tonight",
    "notice_body": "Payments pause from 23:00 to 23:30 UTC.\nNothing to do on your side."})
previews.register_template("emails/order_created", to="juma@example.com",
                           sample=lambda: {"order": sample_order()})
previews.register_template("emails/newsletter_issue", to="zawadi@example.com",
                           mailing_list=NEWSLETTER, sample=lambda: {
                               "issue": NewsletterIssue(title="The great migration is on"),
                               "subscriber": sample_subscriber()})
