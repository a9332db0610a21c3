"""The outbox: enqueue in the caller's transaction, delivery on commit, idempotency,
claims and fenced results."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.db import transaction
from django.utils import timezone

import kipekee
from kipekee import outbox, signals
from kipekee.delivery import Outcome
from kipekee.models import Attempt, OutboxEmail, Status

from .conftest import rows

pytestmark = pytest.mark.django_db(transaction=True)

MAIL = {"subject": "Order 1", "text": "thanks", "to": ["ann@example.com"]}


def test_rolled_back_transaction_sends_nothing(sink_provider):
    with pytest.raises(RuntimeError):
        with transaction.atomic():
            receipt = kipekee.send(**MAIL)
            assert rows() == 1  # written in the caller's transaction …
            raise RuntimeError("the order failed")
    assert rows() == 0  # … and gone with it
    assert receipt.status == Status.QUEUED
    # Prove the server was reachable: a committed send afterwards arrives alone.
    kipekee.send(**{**MAIL, "subject": "after"})
    assert [m.subject for m in sink_provider.wait_for(1)] == ["after"]


def test_delivery_starts_on_commit(sink_provider):
    with transaction.atomic():
        receipt = kipekee.send(**MAIL)
        assert receipt.status == Status.QUEUED
        assert sink_provider.messages == []  # nothing leaves before commit
    # on_commit ran when the block exited; the same receipt shows the outcome.
    assert receipt.sent, receipt
    assert receipt.provider == "primary"
    assert len(sink_provider.messages) == 1


def test_idempotency_key_returns_the_first_row(sink_provider):
    first = kipekee.send(**MAIL, idempotency_key="quote-42-confirmation")
    second = kipekee.send(**{**MAIL, "subject": "double submit"}, idempotency_key="quote-42-confirmation")
    assert (first.created, second.created) == (True, False)
    assert second.id == first.id and second.message_id == first.message_id
    assert second.status == Status.SENT
    assert rows() == 1
    assert [m.subject for m in sink_provider.wait_for(1)] == ["Order 1"]


def test_idempotency_key_twice_in_one_transaction(sink_provider):
    with transaction.atomic():
        a = kipekee.send(**MAIL, idempotency_key="k1")
        b = kipekee.send(**MAIL, idempotency_key="k1")
    assert a.id == b.id and not b.created
    assert rows() == 1 and len(sink_provider.wait_for(1)) == 1


def test_idempotency_key_reusable_after_rollback(sink_provider):
    with pytest.raises(RuntimeError), transaction.atomic():
        kipekee.send(**MAIL, idempotency_key="k2")
        raise RuntimeError
    receipt = kipekee.send(**MAIL, idempotency_key="k2")
    assert receipt.created and receipt.sent


def test_queue_mode_leaves_the_row_for_an_engine(sink_provider):
    receipt = kipekee.send(**MAIL, mode="queue")
    row = OutboxEmail.objects.get(pk=receipt.id)
    assert (row.status, row.attempts, receipt.status) == (Status.QUEUED, 0, Status.QUEUED)
    assert sink_provider.messages == []


def test_send_at_in_the_future_waits(sink_provider):
    later = timezone.now() + timedelta(hours=1)
    receipt = kipekee.send(**MAIL, mode="now", send_at=later)
    row = OutboxEmail.objects.get(pk=receipt.id)
    assert row.status == Status.QUEUED and row.due_at == later
    assert receipt.status == Status.QUEUED
    assert sink_provider.messages == []


def _queued() -> OutboxEmail:
    return OutboxEmail.objects.get(pk=kipekee.send(**MAIL, mode="queue").id)


def _outcome(ok: bool = True, kind: str = "") -> Outcome:
    now = timezone.now()
    return Outcome(ok=ok, provider="primary", started_at=now, finished_at=now, kind=kind,
                   error="" if ok else "451 try later")


def test_a_row_is_claimed_once(sink_provider):
    row = _queued()
    claimed = outbox.claim(row.pk)
    assert claimed is not None and claimed.status == Status.SENDING and claimed.attempts == 1
    assert claimed.lease_until > timezone.now()
    assert outbox.claim(row.pk) is None  # a second engine gets nothing


def test_expired_lease_is_reclaimable_and_the_stale_result_is_fenced(sink_provider):
    row = _queued()
    stale = outbox.claim(row.pk)
    # The first engine stalls past its lease (time moves: the lease is set in the past).
    OutboxEmail.objects.filter(pk=row.pk).update(lease_until=timezone.now() - timedelta(seconds=1))
    fresh = outbox.claim(row.pk)
    assert fresh is not None and fresh.attempts == 2
    assert outbox.mark_sent(stale, _outcome()) is False  # late result of attempt 1: ignored
    assert OutboxEmail.objects.get(pk=row.pk).status == Status.SENDING
    assert outbox.defer(fresh, _outcome(False, "transient"), due_at=timezone.now()) is True
    assert OutboxEmail.objects.get(pk=row.pk).status == Status.DEFERRED
    assert list(Attempt.objects.filter(email_id=row.pk).values_list("number", "outcome")) == [
        (2, "transient")
    ]


def test_transitions_follow_the_status_machine(sink_provider):
    row = _queued()
    # Only a row in `sending` can be finished.
    assert outbox.mark_sent(row, _outcome()) is False
    assert outbox.cancel(row.pk) is True
    assert OutboxEmail.objects.get(pk=row.pk).status == Status.CANCELLED
    assert outbox.claim(row.pk) is None  # cancelled rows are never sent
    assert outbox.cancel(row.pk) is False

    sent = outbox.claim(_queued().pk)
    assert outbox.mark_sent(sent, _outcome()) is True
    assert outbox.cancel(sent.pk) is False  # sent is final
    assert outbox.claim(sent.pk) is None


def test_signals_follow_transitions(sink_provider):
    seen: list[tuple[str, int]] = []

    def on(name):
        def receiver(sender, email, **kwargs):
            seen.append((name, email.pk))
        return receiver

    handlers = {name: on(name) for name in ("queued", "sent", "deferred", "failed")}
    for name, handler in handlers.items():
        getattr(signals, name).connect(handler)
    try:
        receipt = kipekee.send(**MAIL)
    finally:
        for name, handler in handlers.items():
            getattr(signals, name).disconnect(handler)
    assert seen == [("queued", receipt.id), ("sent", receipt.id)]


def test_engines_cannot_take_a_row_the_request_delivers_itself(sink_provider):
    grabbed: list[OutboxEmail] = []
    with transaction.atomic():
        # Registered first, so it runs first after commit: an engine polling right then.
        transaction.on_commit(lambda: grabbed.extend(outbox.claim_batch(10, engine="thread")))
        receipt = kipekee.send(**MAIL)  # hybrid: this request delivers it after commit
    assert grabbed == []  # held for the request …
    assert receipt.sent and receipt.provider == "primary"  # … which gave its caller the answer
    assert len(sink_provider.wait_for(1)) == 1


def test_a_held_row_goes_to_an_engine_if_the_request_never_delivers(sink_provider):
    from kipekee.dispatch import IN_REQUEST_HOLD

    receipt = kipekee.send(**MAIL, mode="queue")
    OutboxEmail.objects.filter(pk=receipt.id).update(due_at=timezone.now() + IN_REQUEST_HOLD)
    assert outbox.claim_batch(10) == []  # within the hold
    OutboxEmail.objects.filter(pk=receipt.id).update(due_at=timezone.now())  # the hold ended
    assert [r.pk for r in outbox.claim_batch(10)] == [receipt.id]
