"""The test app's notifications, registered at start-up by TestAppConfig.ready()."""

from __future__ import annotations

from datetime import timedelta

from kipekee.notifications import Message, admins, register
from kipekee.qr import qr_attachment

from .models import Booking


def ticket_data(booking: Booking) -> str:
    return f"BOOKING:{booking.number};SEAT:{booking.seat}"


register(
    "quote_request.received",
    Message("emails/quote_admin", name="admin", to=admins, reply_to=lambda q: q.email or None),
    Message("emails/quote_received", name="customer", to=lambda q: q.email,
            language=lambda q: q.language),
)

register(
    "booking.confirmed",
    Message("emails/booking_confirmed", name="customer", to=lambda b: b.email,
            language=lambda b: b.language, context=lambda b: {"ticket": ticket_data(b)},
            attachments=lambda b: [qr_attachment(ticket_data(b), f"ticket-{b.number}.png")]),
)

register(
    "booking.reminder",
    Message("emails/show_reminder", name="customer", to=lambda b: b.email,
            language=lambda b: b.language,
            at=lambda b: b.starts_at - timedelta(hours=24),
            when=lambda b: b.status == Booking.Status.CONFIRMED),
    model=Booking,
)
