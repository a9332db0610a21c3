"""``kipekee.send_many`` and ``notify_many``: many messages in one transaction and a fixed
number of queries, with everything ``send`` guarantees one by one."""

from __future__ import annotations

import threading
import time
from datetime import datetime
from datetime import timezone as dt_timezone

import pytest
from django.db import connection, transaction
from django.test.utils import CaptureQueriesContext

import kipekee
from kipekee import outbox, suppression
from kipekee.exceptions import InvalidMessage, TemplateError
from kipekee.models import Attachment, OutboxEmail, Status

from .app.models import Quote
from .conftest import rows

pytestmark = pytest.mark.django_db(transaction=True)


def email(i: int, **kw: object) -> kipekee.Email:
    fields: dict[str, object] = {"subject": f"Tour news {i}", "text": f"Hello {i}",
                                 "html": f"<p>Hello {i}</p>", "to": f"guest{i}@example.com",
                                 **kw}
    return kipekee.Email(**fields)  # type: ignore[arg-type]


def test_a_thousand_messages_in_at_most_ten_queries(sink_provider):
    emails = [email(i, attachments=[("terms.txt", b"terms", "text/plain")] if i % 10 == 0
                    else (), idempotency_key=f"news-{i}" if i % 2 else None)
              for i in range(1000)]
    suppression.add("guest7@example.com")
    with CaptureQueriesContext(connection) as captured:
        receipts = kipekee.send_many(emails)
    assert len(captured.captured_queries) <= 10, [q["sql"][:80] for q in captured]
    assert rows() == 1000 and Attachment.objects.count() == 100
    # In input order, each its own new row.
    by_id = OutboxEmail.objects.in_bulk([r.id for r in receipts])
    assert [by_id[r.id].subject for r in receipts] == [f"Tour news {i}" for i in range(1000)]
    assert all(r.created for r in receipts)
    assert receipts[7].suppressed and by_id[receipts[7].id].status == Status.SUPPRESSED
    assert by_id[receipts[10].id].attachments.get().content == b"terms"


def test_queries_do_not_grow_with_the_number_of_messages(sink_provider):
    def queries(n: int, tag: str) -> int:
        batch = [email(i, idempotency_key=f"{tag}-{i}",
                       attachments=[("a.txt", b"x", "text/plain")]) for i in range(n)]
        with CaptureQueriesContext(connection) as captured:
            kipekee.send_many(batch)
        return len(captured.captured_queries)

    assert queries(3, "small") == queries(300, "large")


def test_every_message_lands_in_the_bulk_lane_unless_it_names_its_own(sink_provider):
    receipts = kipekee.send_many([email(1), email(2, lane="transactional")])
    assert [OutboxEmail.objects.get(pk=r.id).lane for r in receipts] == ["bulk", "transactional"]
    assert OutboxEmail.objects.get(pk=kipekee.send(subject="s", text="t", to="a@x.org",
                                                   mode="queue").id).lane == "transactional"


def test_an_unknown_lane_is_refused_at_the_call_site(sink_provider):
    with pytest.raises(InvalidMessage, match="Message 1: Unknown lane 'newsletter'"):
        kipekee.send_many([email(0), email(1, lane="newsletter")])
    assert rows() == 0


def test_a_key_already_in_the_outbox_gives_its_first_row(sink_provider):
    first = kipekee.send(subject="s", text="t", to="a@x.org", idempotency_key="k1", mode="queue")
    receipts = kipekee.send_many([email(1, idempotency_key="k1"), email(2)])
    assert (receipts[0].id, receipts[0].created) == (first.id, False)
    assert receipts[1].created and rows() == 2


def test_a_key_given_twice_in_one_call_is_written_once(sink_provider):
    receipts = kipekee.send_many([email(1, idempotency_key="k"), email(2),
                                  email(3, idempotency_key="k")])
    assert receipts[0].id == receipts[2].id
    assert [r.created for r in receipts] == [True, True, False]
    assert OutboxEmail.objects.get(pk=receipts[0].id).subject == "Tour news 1"
    assert rows() == 2


def test_suppressed_recipients_are_taken_off_each_message(sink_provider):
    suppression.add("Guest1@Example.com", source="test")
    receipts = kipekee.send_many([
        email(1),
        email(2, cc=["guest1@example.com"]),
    ])
    assert receipts[0].suppressed and "guest1@example.com" in receipts[0].error
    row = OutboxEmail.objects.get(pk=receipts[1].id)
    assert row.status == Status.QUEUED and row.cc == [] and row.to == ["guest2@example.com"]
    assert "guest1@example.com" in row.refused


def test_suppression_matches_any_spelling_of_a_mailbox(sink_provider):
    suppression.add("user@bücher.example")
    receipts = kipekee.send_many([email(1, to="USER@xn--bcher-kva.example"),
                                  email(2, to='"user"@Bu\u0308cher.example'), email(3)])
    assert [r.suppressed for r in receipts] == [True, True, False]


def test_a_bad_message_is_named_and_nothing_is_written(sink_provider):
    emails = [email(i) for i in range(5)] + [email(5, to="not an address")]
    with pytest.raises(InvalidMessage, match=r"^Message 5: to: Invalid address"):
        kipekee.send_many(emails)
    with pytest.raises(TemplateError, match="^Message 1: "):
        kipekee.send_many([email(0), kipekee.Email("emails/quote_admin", to="a@x.org")])
    with pytest.raises(InvalidMessage, match="^Message 0: send_many takes kipekee.Email"):
        kipekee.send_many([{"subject": "s", "text": "t", "to": "a@x.org"}])  # type: ignore[list-item]
    assert rows() == 0


def test_one_transaction_with_the_callers(sink_provider):
    with pytest.raises(RuntimeError), transaction.atomic():
        kipekee.send_many([email(i) for i in range(10)])
        raise RuntimeError("the order failed")
    assert rows() == 0


def test_queued_messages_are_sent_by_an_engine(sink_provider):
    receipts = kipekee.send_many([email(i) for i in range(25)])
    assert {r.status for r in receipts} == {Status.QUEUED}
    while outbox.claim_batch(10):  # what an engine does, without delivering
        pass
    assert OutboxEmail.objects.filter(status=Status.SENDING).count() == 25


def test_hybrid_delivers_after_commit_and_updates_the_receipts(sink_provider):
    with transaction.atomic():
        receipts = kipekee.send_many([email(i) for i in range(30)], mode="hybrid")
        assert not sink_provider.messages and {r.status for r in receipts} == {"queued"}
    assert [r.status for r in receipts] == ["sent"] * 30
    got = sorted(m.message["Subject"] for m in sink_provider.wait_for(30))
    assert got == sorted(f"Tour news {i}" for i in range(30))
    assert set(OutboxEmail.objects.values_list("status", flat=True)) == {Status.SENT}


def test_mode_now_is_refused_for_many(sink_provider):
    with pytest.raises(InvalidMessage, match="mode must be one of"):
        kipekee.send_many([email(1)], mode="now")
    with pytest.raises(InvalidMessage, match="^Message 1: mode must be one of"):
        kipekee.send_many([email(0), email(1, mode="now")])
    assert rows() == 0


@pytest.mark.postgres
def test_a_key_committed_elsewhere_meanwhile_gives_that_row(sink_provider):
    """Another transaction writes the same key after send_many looked for it: the INSERT
    waits for that transaction and fails on the key; send_many looks again."""
    inserted, commit = threading.Event(), threading.Event()
    theirs: list[int] = []

    def other() -> None:
        try:
            with transaction.atomic():
                theirs.append(kipekee.send(subject="theirs", text="t", to="a@x.org",
                                           idempotency_key="race", mode="queue").id)
                inserted.set()
                commit.wait(10)
        finally:
            connection.close()

    thread = threading.Thread(target=other)
    thread.start()
    assert inserted.wait(10)
    # Their row is not committed: send_many does not see the key and INSERTs it, which
    # waits on their lock; they commit a moment later.
    threading.Timer(0.5, commit.set).start()
    started = time.monotonic()
    receipts = kipekee.send_many([email(1, idempotency_key="race"), email(2)])
    thread.join()
    assert time.monotonic() - started >= 0.4  # it did wait for them
    assert (receipts[0].id, receipts[0].created) == (theirs[0], False)
    assert receipts[1].created and rows() == 2


# --- notify_many --------------------------------------------------------------------------

def test_notify_many_writes_every_objects_messages_once(sink_provider):
    quotes = [Quote.objects.create(name=f"Q{i}", email=f"q{i}@example.com", trip="Trek")
              for i in range(20)]
    per_object = kipekee.notify_many("quote_request.received", quotes)
    assert [len(receipts) for receipts in per_object] == [2] * 20
    assert rows() == 40
    customer = OutboxEmail.objects.get(pk=per_object[3][1].id)
    assert customer.to == ["q3@example.com"] and customer.lane == "bulk"
    assert customer.target == quotes[3]
    again = kipekee.notify_many("quote_request.received", quotes)
    assert [[r.id for r in rs] for rs in again] == [[r.id for r in rs] for rs in per_object]
    assert not any(r.created for rs in again for r in rs) and rows() == 40


def test_notify_many_queries_do_not_grow_with_the_objects(sink_provider):
    def queries(n: int) -> int:
        quotes = [Quote.objects.create(name=f"Q{i}", email=f"q{i}@example.com", trip="T")
                  for i in range(n)]
        with CaptureQueriesContext(connection) as captured:
            kipekee.notify_many("quote_request.received", quotes)
        return len(captured.captured_queries)

    queries(1)  # the first looks up the Quote content type (then cached, as Django does)
    assert queries(2) == queries(40)


def test_hybrid_goes_through_a_providers_batch_api(mailtrap, kipekee_settings):
    """Delivered in the request the way engines deliver a claimed batch: 120 messages to
    Mailtrap are one /api/batch request, not 120 /api/send."""
    from .mailtrap_fixtures import mailtrap_provider

    kipekee_settings(mailtrap=mailtrap_provider(mailtrap))
    receipts = kipekee.send_many([email(i) for i in range(120)], mode="hybrid")
    assert {r.status for r in receipts} == {"sent"}
    assert [r.path for r in mailtrap.requests] == ["/api/batch"]
    assert len(mailtrap.requests[0].json["requests"]) == 120


def test_notify_many_writes_reminders_in_bulk(sink_provider):
    from datetime import timedelta

    from django.utils import timezone

    from .app.models import Booking

    def bookings(n: int, tag: str, **kw: object) -> list[Booking]:
        # bulk_create: no post_save, so no reminder is written for them yet.
        fields = {"film": "Sarafina", "seat": "F7",
                  "starts_at": timezone.now() + timedelta(days=3), **kw}
        return Booking.objects.bulk_create(
            Booking(number=f"{tag}-{i}", email=f"{tag}{i}@example.com", **fields)
            for i in range(n))

    kipekee.notify_many("booking.reminder", bookings(1, "warm"))  # content type cached
    due = bookings(20, "due")
    too_close = bookings(1, "close", starts_at=timezone.now() + timedelta(hours=2))
    cancelled = bookings(1, "off", status=Booking.Status.CANCELLED)
    few = bookings(2, "few")
    with CaptureQueriesContext(connection) as captured:
        per_object = kipekee.notify_many("booking.reminder", due + too_close + cancelled)
    assert [len(r) for r in per_object] == [1] * 20 + [0, 0]
    rows_by_id = OutboxEmail.objects.in_bulk([rs[0].id for rs in per_object[:20]])
    for booking, (receipt,) in zip(due, per_object[:20], strict=True):
        row = rows_by_id[receipt.id]
        assert row.due_at == booking.starts_at - timedelta(hours=24)
        assert row.to == [booking.email] and row.status == Status.QUEUED
    with CaptureQueriesContext(connection) as two:
        kipekee.notify_many("booking.reminder", few)
    assert len(two.captured_queries) == len(captured.captured_queries)
    # Written: a second call keeps them (one object at a time, as a save would).
    again = kipekee.notify_many("booking.reminder", due)
    assert [rs[0].id for rs in again] == [rs[0].id for rs in per_object[:20]]
    assert not any(rs[0].created for rs in again)


def test_rows_written_in_bulk_hold_what_send_writes(sink_provider):
    """Many rows go in by another statement than one row (on PostgreSQL one JSON document,
    ``jsonb_populate_recordset``): every column must read back as ``send`` writes it —
    times to the microsecond, JSON values with non-ASCII, quotes, backslashes and
    nesting, text with the same, a target's content type, empty and missing values."""
    quote = Quote.objects.create(name="Q", email="q@example.com", trip="Trek")
    odd = 'Zoë "Q" \\ \' \u2603 ñ\ttab'
    send_at = datetime(2031, 5, 6, 7, 8, 9, 123456, tzinfo=dt_timezone.utc)

    def make(tag: str, i: int) -> kipekee.Email:
        return kipekee.Email(
            subject=f"{odd} {i}", text=f"{odd}\nline {i}", html=f"<p>{odd} {i}</p>",
            to=[f"Zoë Ü <guest{i}@example.com>"], cc=["cc@example.com"] if i else [],
            bcc=[], reply_to=[f'"{odd}" <reply@example.com>'],
            headers={"X-Odd": odd, "Message-ID": f"<{tag}.{i}@example.com>"},
            metadata={"n": i, "nested": {"list": [1, 2.5, None, True, odd]}, "é": odd},
            template="tours/news", event="tour.news", target=quote if i else None,
            send_at=send_at if i == 1 else None, idempotency_key=f"{tag}-{i}" if i else None,
            lane="bulk", mode="queue")

    for i in range(3):
        make("one", i).send()
    kipekee.send_many([make("many", i) for i in range(3)])
    skip = {"id", "message_id", "idempotency_key", "created_at", "due_at"}
    fields = [f.attname for f in OutboxEmail._meta.concrete_fields if f.name not in skip]

    def read(tag: str) -> list[dict[str, object]]:
        found = OutboxEmail.objects.filter(message_id__startswith=f"<{tag}.").order_by("pk")
        return [{name: getattr(row, name) for name in fields}
                | {"due_at": row.due_at if row.due_at == send_at else "now",
                   "key": (row.idempotency_key or "").split("-")[-1]} for row in found]

    assert read("many") == read("one")
    assert len(read("many")) == 3
    # And both as given (on PostgreSQL both go in as JSON documents).
    for tag in ("one", "many"):
        row = OutboxEmail.objects.get(message_id=f"<{tag}.1@example.com>")
        assert row.due_at == send_at and row.target == quote
        assert (row.subject, row.body) == (f"{odd} 1", f"{odd}\nline 1")
        assert row.alternatives == [{"content": f"<p>{odd} 1</p>", "mimetype": "text/html"}]
        assert row.to == ["Zoë Ü <guest1@example.com>"] and row.cc == ["cc@example.com"]
        assert row.reply_to == [f'"{odd}" <reply@example.com>'] and row.bcc == []
        assert row.headers == {"X-Odd": odd}
        assert row.metadata == {"n": 1, "nested": {"list": [1, 2.5, None, True, odd]}, "é": odd}
        assert row.idempotency_key == f"{tag}-1" and row.lane == "bulk"
        assert row.created_at <= row.due_at and row.lease_until is None
