"""The test app's notifications, registered at start-up by TestAppConfig.ready()."""

from __future__ import annotations

from datetime import timedelta

from django.utils import timezone

from kipekee.notifications import Message, admins, register
from kipekee.qr import qr_attachment

from .models import Booking, Quote


def sample_booking() -> Booking:
    """An unsaved booking: enough for every template that mentions one."""
    return Booking(number="B-1001", email="ann@example.com", film="Queen of Katwe", seat="F7",
                   starts_at=timezone.now() + timedelta(days=2))


def ticket_data(booking: Booking) -> str:
    return f"BOOKING:{booking.number};SEAT:{booking.seat}"


register(
    "quote_request.received",
    Message("emails/quote_admin", name="admin", to=admins, reply_to=lambda q: q.email or None),
    Message("emails/quote_received", name="customer", to=lambda q: q.email,
            language=lambda q: q.language),
    # A saved quote (its subject shows the number): previews roll the row back.
    sample=lambda: Quote.objects.create(name="Ann Traveller", email="ann@example.com",
                                        trip="Serengeti, 5 days"),
)

register(
    "booking.confirmed",
    Message("emails/booking_confirmed", name="customer", to=lambda b: b.email,
            language=lambda b: b.language, context=lambda b: {"ticket": ticket_data(b)},
            attachments=lambda b: [qr_attachment(ticket_data(b), f"ticket-{b.number}.png")]),
    sample=sample_booking,
)

register(
    "booking.reminder",
    Message("emails/show_reminder", name="customer", to=lambda b: b.email,
            language=lambda b: b.language,
            at=lambda b: b.starts_at - timedelta(hours=24),
            when=lambda b: b.status == Booking.Status.CONFIRMED),
    model=Booking,
    sample=sample_booking,
)
