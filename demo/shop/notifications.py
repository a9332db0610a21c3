"""Every email event of the four seed systems, declared once (ShopConfig.ready())."""

from __future__ import annotations

from datetime import timedelta

from django.conf import settings

from kipekee.notifications import Message, admins, register
from kipekee.qr import qr_attachment

from .models import Booking

# Tours (001): the office and the customer, in the request (hybrid: instant feedback).
register(
    "quote.received",
    Message("emails/quote_admin", name="admin", to=admins, reply_to=lambda q: q.email,
            context=lambda q: {"quote": q}),
    Message("emails/quote_received", name="customer", to=lambda q: q.email,
            context=lambda q: {"quote": q}),
)
register(
    "application.received",
    Message("emails/application", name="careers", to=lambda a: settings.DEMO_CAREERS_EMAIL,
            reply_to=lambda a: a.email,
            attachments=lambda a: [(a.cv_name, bytes(a.cv), "application/pdf")]),
)
register("newsletter.subscribed", Message("emails/welcome", name="welcome", to=lambda s: s.email))

# Marketplace (003): each transition one email, delivered by the engine, not the request.
# (emails/order_status.subject.txt words each event.)
ORDER_EVENTS = ("order.created", "order.accepted", "order.delivered", "order.paid", "order.cancelled")
for _event in ORDER_EVENTS:
    register(_event, Message("emails/order_status", name="customer", to=lambda o: o.customer_email,
                             mode="queue", context=lambda o, e=_event: {"event": e}))


def ticket(booking: Booking) -> str:
    return f"BOOKING:{booking.number};SEAT:{booking.seat}"


# Cinema (004): the ticket (QR inline and attached), payment failed, the reminder.
register(
    "booking.confirmed",
    Message("emails/booking_confirmed", name="customer", to=lambda b: b.email,
            context=lambda b: {"ticket": ticket(b)},
            attachments=lambda b: [qr_attachment(ticket(b), f"ticket-{b.number}.png")]),
)
register("booking.payment_failed",
         Message("emails/payment_failed", name="customer", to=lambda b: b.email))
register(
    "booking.reminder",
    Message("emails/show_reminder", name="customer", to=lambda b: b.email,
            at=lambda b: b.show.starts_at - timedelta(hours=24),
            when=lambda b: b.status == Booking.Status.CONFIRMED),
    model=Booking,
)
