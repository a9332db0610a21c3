"""Notifications and reminders: events → emails linked to the business object, reminders
that follow their booking. Delivered to a real SMTP server."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import timedelta

import pytest
from django.utils import dateformat, timezone

import kipekee
from kipekee import notifications, outbox, recording
from kipekee.delivery import Deliverer
from kipekee.exceptions import InvalidMessage
from kipekee.models import OutboxEmail, Status
from kipekee.notifications import Message

from .app.models import Booking, Quote
from .conftest import rows
from .mime import decode_qr

pytestmark = pytest.mark.django_db(transaction=True)


def make_quote(**kw: object) -> Quote:
    fields = {"name": "Amina", "email": "amina@example.com", "trip": "Kilimanjaro Trek",
              "language": "fr", **kw}
    return Quote.objects.create(**fields)


def make_booking(starts_in: timedelta = timedelta(days=3), **kw: object) -> Booking:
    fields = {"number": "BK-1042", "email": "sam@example.com", "film": "Sarafina",
              "seat": "F7", "starts_at": timezone.now() + starts_in, **kw}
    return Booking.objects.create(**fields)


def reminders(booking: Booking) -> list[OutboxEmail]:
    return list(notifications.rows("booking.reminder", booking).order_by("id"))


def deliver_due(pk: int) -> OutboxEmail:
    """What an engine does with a due row: claim, deliver, record."""
    row = outbox.claim(pk)
    assert row is not None, "not due"
    recording.record(row, Deliverer().deliver(row))
    return OutboxEmail.objects.get(pk=pk)


# --- notifications ---------------------------------------------------------------------

def test_notify_sends_admin_copy_and_customer_confirmation(sink_provider):
    quote = make_quote()
    receipts = kipekee.notify("quote_request.received", quote)
    assert [r.sent for r in receipts] == [True, True], receipts
    admin, customer = (m.message for m in sink_provider.wait_for(2))
    assert admin["To"] == "office@tours.example"
    assert admin["Reply-To"] == "amina@example.com"
    assert admin["Subject"] == f"New quote request #{quote.pk} from Amina"
    assert customer["To"] == "amina@example.com"
    assert customer["Subject"] == "Kilimanjaro Trek: Oui"  # in the customer's language
    # "Were the admin and user emails sent for quote 42?" is a query.
    assert notifications.status("quote_request.received", quote) == {
        "admin": "sent", "customer": "sent"}
    linked = OutboxEmail.objects.for_object(quote)
    assert linked.count() == 2
    assert {r.event for r in linked} == {"quote_request.received"}
    assert linked.filter(event="quote_request.received").statuses() == {
        "emails/quote_admin": "sent", "emails/quote_received": "sent"}
    assert all(r.target == quote for r in linked)


def test_notify_twice_sends_once(sink_provider):
    quote = make_quote()
    first = kipekee.notify("quote_request.received", quote)
    again = kipekee.notify("quote_request.received", quote)
    assert [r.created for r in again] == [False, False]
    assert [r.id for r in again] == [r.id for r in first]
    assert rows() == 2
    sink_provider.wait_for(2)
    assert len(sink_provider.messages) == 2


def test_rows_of_one_object_are_not_mixed_with_another(sink_provider):
    one, two = make_quote(), make_quote(name="Baraka", email="baraka@example.com")
    kipekee.notify("quote_request.received", one)
    assert notifications.status("quote_request.received", two) == {
        "admin": None, "customer": None}
    assert OutboxEmail.objects.for_object(two).count() == 0
    kipekee.notify("quote_request.received", two)
    assert OutboxEmail.objects.for_object(two).count() == 2


def test_bad_message_writes_nothing_not_even_the_admin_copy(sink_provider):
    quote = make_quote(email="")
    with pytest.raises(InvalidMessage, match="no recipient"):
        kipekee.notify("quote_request.received", quote)
    assert rows() == 0
    with pytest.raises(InvalidMessage, match="Unknown notification 'quote.nope'"):
        kipekee.notify("quote.nope", quote)


def test_booking_confirmed_carries_an_inline_qr_and_a_ticket_that_decode(sink_provider):
    booking = make_booking(language="de")
    [receipt] = kipekee.notify("booking.confirmed", booking)
    assert receipt.sent, receipt
    received = sink_provider.wait_for(1)[0].message
    parts = {p.get_filename(): p for p in received.walk() if p.get_filename()}
    expected = f"BOOKING:{booking.number};SEAT:{booking.seat}"
    assert decode_qr(parts["qr-code.png"].get_content()) == expected
    assert decode_qr(parts[f"ticket-{booking.number}.png"].get_content()) == expected
    row = OutboxEmail.objects.get(pk=receipt.id)
    # A UUID primary key is stored as text.
    assert row.object_id == str(booking.pk) and row.target == booking


def test_register_refuses_duplicates_and_unnamed_twins():
    from kipekee.exceptions import ConfigurationError

    with pytest.raises(ConfigurationError, match="already registered"):
        notifications.register("booking.confirmed", Message("emails/welcome", to="a@b.c"))
    with pytest.raises(ConfigurationError, match="share a name"):
        notifications.register("x.y", Message("emails/welcome", to="a@b.c"),
                               Message("emails/welcome", to="d@b.c"))


# --- reminders -------------------------------------------------------------------------

def test_saving_a_booking_schedules_its_reminder_24h_before(sink_provider):
    booking = make_booking()
    [row] = reminders(booking)
    assert row.status == Status.QUEUED
    assert row.due_at == booking.starts_at - timedelta(hours=24)
    assert row.object_id == str(booking.pk)
    # Not due: nothing claims it, nothing is sent.
    assert outbox.claim(row.pk) is None
    assert sink_provider.messages == []
    booking.seat = "F8"  # a change that does not move the time: the same reminder
    booking.save()
    assert [r.pk for r in reminders(booking)] == [row.pk]


def test_a_due_reminder_is_sent(sink_provider):
    booking = make_booking()
    [row] = reminders(booking)
    # Time passes: the reminder becomes due (moving due_at stands in for 2 days of waiting).
    OutboxEmail.objects.filter(pk=row.pk).update(due_at=timezone.now() - timedelta(seconds=1))
    assert deliver_due(row.pk).status == Status.SENT
    received = sink_provider.wait_for(1)[0].message
    assert received["Subject"] == "Tomorrow: Sarafina"
    assert "seat F7" in received.get_body(("plain",)).get_content()
    assert notifications.status("booking.reminder", booking) == {"customer": "sent"}


def test_moving_the_show_rewrites_the_reminder_for_the_new_time(sink_provider):
    booking = make_booking()
    [old] = reminders(booking)
    before = dateformat.format(booking.starts_at, "l j F Y, H:i")
    booking.starts_at += timedelta(days=1)
    booking.save()
    after = dateformat.format(booking.starts_at, "l j F Y, H:i")
    old.refresh_from_db()
    # The reminder's text names the time, so a fresh one replaces it.
    assert old.status == Status.CANCELLED and before in old.body
    [_, new] = reminders(booking)
    assert new.status == Status.QUEUED
    assert new.due_at == booking.starts_at - timedelta(hours=24)
    assert after in new.body and before not in new.body


@pytest.fixture
def timeless_reminder() -> Iterator[None]:
    """A reminder whose text does not name the time: moving it keeps its row."""
    notifications.register(
        "booking.followup",
        Message("emails/htmlonly", to=lambda b: b.email, context=lambda b: {"name": b.film},
                at=lambda b: b.starts_at + timedelta(hours=2)),
        model=Booking,
    )
    yield
    notifications.unregister("booking.followup")


def test_moving_a_reminder_whose_text_is_unchanged_moves_its_row(sink_provider,
                                                                 timeless_reminder):
    booking = make_booking()
    [row] = notifications.rows("booking.followup", booking)
    booking.starts_at += timedelta(hours=5)
    booking.save()
    [moved] = notifications.rows("booking.followup", booking)
    assert moved.pk == row.pk and moved.message_id == row.message_id
    assert moved.status == Status.QUEUED
    assert moved.due_at == booking.starts_at + timedelta(hours=2)


def test_cancelling_the_booking_cancels_the_reminder(sink_provider):
    booking = make_booking()
    booking.status = Booking.Status.CANCELLED
    booking.save()
    assert [r.status for r in reminders(booking)] == [Status.CANCELLED]


def test_deleting_the_booking_cancels_the_reminder(sink_provider):
    booking = make_booking()
    [row] = reminders(booking)
    booking.delete()
    row.refresh_from_db()
    assert row.status == Status.CANCELLED


def test_no_late_reminder_for_a_show_that_is_too_close(sink_provider):
    booking = make_booking(starts_in=timedelta(hours=2))
    assert reminders(booking) == []
    assert kipekee.notify("booking.reminder", booking) == []


def test_a_reminder_a_person_cancelled_stays_cancelled(sink_provider):
    booking = make_booking()
    [row] = reminders(booking)
    assert outbox.cancel(row.pk)
    booking.seat = "A1"
    booking.save()
    assert [r.status for r in reminders(booking)] == [Status.CANCELLED]


@pytest.fixture
def soon_reminder() -> Iterator[None]:
    """A reminder 24 h before a show, for bookings made 24 h and 1 s before it: due a
    second after the booking is saved."""
    notifications.register(
        "booking.soon",
        Message("emails/show_reminder", to=lambda b: b.email,
                at=lambda b: b.starts_at - timedelta(hours=24),
                when=lambda b: b.status == Booking.Status.CONFIRMED),
        model=Booking,
    )
    yield
    notifications.unregister("booking.soon")


def _due_reminder() -> tuple[Booking, OutboxEmail]:
    booking = make_booking(starts_in=timedelta(hours=24, seconds=1))
    [row] = notifications.rows("booking.soon", booking)
    time.sleep(1.1)  # its time comes; no engine runs in these tests to send it
    return booking, row


def test_saving_the_booking_keeps_a_due_reminder_not_sent_yet(sink_provider, soon_reminder):
    """Before the fix any save of the booking cancelled a reminder whose time had come
    but which no engine had sent yet: "too late to remind"."""
    booking, row = _due_reminder()
    booking.seat = "F8"  # the reminder's time does not change
    booking.save()
    assert [(r.pk, r.status) for r in notifications.rows("booking.soon", booking)] == [
        (row.pk, Status.QUEUED)]
    assert deliver_due(row.pk).status == Status.SENT


def test_saving_the_booking_keeps_a_deferred_reminder(smtp_server, kipekee_settings,
                                                      soon_reminder):
    """A reminder whose first try met a busy server is deferred (its due_at is now the
    retry's); a save that does not move the show keeps it, to be sent on the retry."""
    from kipekee.testing import Faults

    from .conftest import smtp_provider

    server = smtp_server(faults=Faults(data_replies=["451 4.3.0 busy"]))
    kipekee_settings(primary=smtp_provider(server))
    booking, row = _due_reminder()
    assert deliver_due(row.pk).status == Status.DEFERRED
    booking.seat = "F8"
    booking.save()
    kipekee.notify("booking.soon", booking)  # the same: it is already there
    [kept] = notifications.rows("booking.soon", booking)
    assert (kept.pk, kept.status, kept.attempts) == (row.pk, Status.DEFERRED, 1)
    # Moving the show does change the reminder: too late now for the new time.
    booking.starts_at -= timedelta(minutes=30)
    booking.save()
    kept.refresh_from_db()
    assert kept.status == Status.CANCELLED
    assert [r.pk for r in notifications.rows("booking.soon", booking)] == [row.pk]


def test_reschedule_moves_only_waiting_rows(sink_provider):
    booking = make_booking()
    [row] = reminders(booking)
    later = row.due_at + timedelta(hours=1)
    assert outbox.reschedule(row.pk, later)
    OutboxEmail.objects.filter(pk=row.pk).update(due_at=timezone.now())
    deliver_due(row.pk)
    assert not outbox.reschedule(row.pk, later)  # sent: stays sent, where it was
    row.refresh_from_db()
    assert row.status == Status.SENT and row.due_at != later


def test_a_plain_send_can_be_linked_to_an_object_too(sink_provider):
    quote = make_quote()
    receipt = kipekee.send(subject="About your trip", text="x", to=[quote.email],
                           event="quote.followup", target=quote)
    row = OutboxEmail.objects.for_object(quote).get()
    assert (row.pk, row.event, row.target) == (receipt.id, "quote.followup", quote)
    with pytest.raises(InvalidMessage, match="not saved"):
        kipekee.send(subject="x", text="x", to=["a@example.com"], target=Quote(name="new"))
    assert rows() == 1
