"""Mailtrap delivery webhooks through anymail's view into Kipekee: authentication,
rotation, idempotency, the outbox row and the suppression list."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import pytest
from django.test import Client

import kipekee
from kipekee.exceptions import ConfigurationError
from kipekee.models import OutboxEmail, Status, Suppression, WebhookEvent

from .mailtrap_fixtures import mailtrap_provider

pytestmark = pytest.mark.django_db(transaction=True)

URL = "/kipekee/webhooks/mailtrap/"
SECRET = "mailtrap:hook-s3cret"


@pytest.fixture
def sent(mailtrap, kipekee_settings):
    """A message sent through the local Mailtrap server; returns (receipt, message_id)."""
    kipekee_settings({"WEBHOOK_SECRET": SECRET}, mailtrap=mailtrap_provider(mailtrap))
    receipt = kipekee.send(subject="Booking", text="See you", to=["ann@example.com"],
                           metadata={"category": "booking"})
    assert receipt.sent, receipt
    [message] = mailtrap.messages
    return receipt, message["message_ids"][0]


def event(kind: str, message_id: str, *, event_id: str, email: str = "ann@example.com",
          **extra: Any) -> dict[str, Any]:
    """One event as Mailtrap's webhook sends it."""
    return {"event": kind, "message_id": message_id, "sending_stream": "transactional",
            "email": email, "timestamp": int(time.time()), "event_id": event_id,
            "category": "booking", **extra}


def post(events: list[dict[str, Any]], secret: str | None = SECRET) -> Any:
    headers = {}
    if secret is not None:
        headers["HTTP_AUTHORIZATION"] = "Basic " + base64.b64encode(secret.encode()).decode()
    return Client().post(URL, data=json.dumps({"events": events}),
                         content_type="application/json", **headers)


def test_delivery_event_updates_the_row(sent):
    receipt, mid = sent
    assert post([event("delivery", mid, event_id="e1")]).status_code == 200
    row = OutboxEmail.objects.get(pk=receipt.id)
    assert row.delivery["ann@example.com"]["event"] == "delivered"
    assert row.status == Status.SENT
    assert WebhookEvent.objects.get().email_id == receipt.id
    assert not Suppression.objects.exists()


def test_hard_bounce_suppresses_and_later_sends_are_refused(sent):
    receipt, mid = sent
    bounce = event("bounce", mid, event_id="e2", response="550 5.1.1 no such user",
                   response_code=550, bounce_category="bad_mailbox")
    assert post([bounce]).status_code == 200
    row = OutboxEmail.objects.get(pk=receipt.id)
    assert row.delivery["ann@example.com"]["event"] == "bounced"
    assert row.refused == {"ann@example.com": "550 5.1.1 no such user"}
    entry = Suppression.objects.get()
    assert (entry.address, entry.reason, entry.source) == ("ann@example.com", "hard_bounce",
                                                           "Mailtrap webhook")
    assert receipt.refresh().refused["ann@example.com"] == "550 5.1.1 no such user"

    again = kipekee.send(subject="Booking", text="See you", to=["ann@example.com"])
    assert again.suppressed and "hard bounce via Mailtrap webhook" in again.error


@pytest.mark.parametrize("kind, reason", [("spam", "spam_complaint"),
                                          ("unsubscribe", "unsubscribe")])
def test_complaints_and_unsubscribes_suppress(sent, kind, reason):
    _, mid = sent
    assert post([event(kind, mid, event_id="e3")]).status_code == 200
    assert Suppression.objects.get().reason == reason


def test_soft_bounce_and_reject_do_not_suppress(sent):
    receipt, mid = sent
    assert post([event("soft bounce", mid, event_id="e4", response="452 mailbox full"),
                 event("reject", mid, event_id="e5", reason="blocked")]).status_code == 200
    assert not Suppression.objects.exists()
    row = OutboxEmail.objects.get(pk=receipt.id)
    assert row.delivery["ann@example.com"]["event"] in {"deferred", "rejected"}
    assert "ann@example.com" in row.refused  # rejected: it did not reach them
    assert WebhookEvent.objects.count() == 2


def test_replayed_event_changes_nothing_twice(sent):
    receipt, mid = sent
    bounce = event("bounce", mid, event_id="e6", response="550 gone")
    assert post([bounce]).status_code == 200
    # A person takes the address off the list; the provider then sends the same event
    # again (its retry, or a replay): it must not come back.
    Suppression.objects.all().delete()
    before = OutboxEmail.objects.get(pk=receipt.id).delivery
    assert post([bounce]).status_code == 200
    assert not Suppression.objects.exists()
    assert WebhookEvent.objects.count() == 1
    assert OutboxEmail.objects.get(pk=receipt.id).delivery == before


@pytest.mark.parametrize("secret", [None, "mailtrap:wrong", "other:hook-s3cret"])
def test_bad_secret_gets_400_and_changes_nothing(sent, secret):
    receipt, mid = sent
    response = post([event("bounce", mid, event_id="e7")], secret=secret)
    assert response.status_code == 400
    assert not Suppression.objects.exists() and not WebhookEvent.objects.exists()
    assert OutboxEmail.objects.get(pk=receipt.id).delivery == {}


def test_secret_rotation(sent, kipekee_settings, mailtrap):
    _, mid = sent
    new = "mailtrap:n3w-secret"
    kipekee_settings({"WEBHOOK_SECRET": [SECRET, new]}, mailtrap=mailtrap_provider(mailtrap))
    assert post([event("delivery", mid, event_id="r1")], secret=SECRET).status_code == 200
    assert post([event("delivery", mid, event_id="r2")], secret=new).status_code == 200
    kipekee_settings({"WEBHOOK_SECRET": new}, mailtrap=mailtrap_provider(mailtrap))
    assert post([event("delivery", mid, event_id="r3")], secret=SECRET).status_code == 400
    assert set(WebhookEvent.objects.values_list("event_id", flat=True)) == {"r1", "r2"}


def test_unconfigured_secret_refuses_to_run(kipekee_settings):
    kipekee_settings()
    with pytest.raises(ConfigurationError, match="WEBHOOK_SECRET"):
        post([], secret=SECRET)


def test_event_found_by_kipekee_id_when_the_message_id_is_unknown(sent):
    receipt, _ = sent
    unknown = event("delivery", "not-a-known-id", event_id="e8",
                    custom_variables={"kipekee_id": str(receipt.id)})
    assert post([unknown]).status_code == 200
    assert OutboxEmail.objects.get(pk=receipt.id).delivery["ann@example.com"]["event"] == "delivered"


def test_event_for_an_unknown_message_still_suppresses(sent):
    assert post([event("unsubscribe", "elsewhere", event_id="e9",
                       email="Someone@Example.com")]).status_code == 200
    assert Suppression.objects.get().address == "someone@example.com"
    assert WebhookEvent.objects.get().email_id is None


# --- malformed bodies (issue 17, item 18) ---------------------------------------------------

NOW = int(time.time())
MALFORMED = {
    "not json": b"not json",
    "not utf-8": b'{"events": [\xff\xfe]}',
    "a list": b"[]",
    "a string": b'"events"',
    "events not a list": b'{"events": "nope"}',
    "an event not an object": b'{"events": [1]}',
    "an empty event": b'{"events": [{}]}',
    "no timestamp": b'{"events": [{"event": "delivery", "message_id": "m"}]}',
    "a text timestamp": (b'{"events": [{"event": "delivery", "message_id": "m", '
                         b'"timestamp": "soon"}]}'),
    "a timestamp out of range": (b'{"events": [{"event": "delivery", "message_id": "m", '
                                 b'"timestamp": 1e20}]}'),
    "an event name not a string": (b'{"events": [{"event": 7, "message_id": "m", '
                                   b'"timestamp": %d}]}' % NOW),
    "a recipient not a string": (b'{"events": [{"event": "bounce", "message_id": "m", '
                                 b'"timestamp": %d, "email": ["a@example.com"]}]}' % NOW),
    "a message id not a string": (b'{"events": [{"event": "bounce", "message_id": {"a": 1}, '
                                  b'"timestamp": %d, "email": "a@example.com"}]}' % NOW),
    "a recipient too long": (b'{"events": [{"event": "bounce", "message_id": "m", '
                             b'"timestamp": %d, "email": "%s@example.com"}]}'
                             % (NOW, b"a" * 300)),
}


def post_raw(body: bytes, secret: str | None = SECRET) -> Any:
    headers = {"HTTP_AUTHORIZATION": "Basic " + base64.b64encode(secret.encode()).decode()}
    return Client(raise_request_exception=False).post(
        URL, data=body, content_type="application/json", **headers)


@pytest.mark.parametrize("body", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_body_gets_400_and_changes_nothing(sent, body):
    receipt, _ = sent
    response = post_raw(body)
    assert response.status_code == 400, response.content
    assert not WebhookEvent.objects.exists() and not Suppression.objects.exists()
    assert OutboxEmail.objects.get(pk=receipt.id).delivery == {}


def test_a_good_event_before_a_bad_one_is_not_kept(sent):
    receipt, mid = sent
    good = event("bounce", mid, event_id="g1", response="550 gone")
    bad = event("bounce", mid, event_id="g2", email=["not", "an", "address"])
    response = post_raw(json.dumps({"events": [good, bad]}).encode())
    assert response.status_code == 400
    assert not WebhookEvent.objects.exists() and not Suppression.objects.exists()
    assert OutboxEmail.objects.get(pk=receipt.id).delivery == {}
    # The provider sends the good one again on its own: applied once.
    assert post([good]).status_code == 200
    assert post([good]).status_code == 200
    assert WebhookEvent.objects.count() == 1 and Suppression.objects.count() == 1


def test_the_same_event_twice_in_one_body_is_applied_once(sent):
    receipt, mid = sent
    bounce = event("bounce", mid, event_id="d1", response="550 gone")
    assert post([bounce, bounce]).status_code == 200
    assert WebhookEvent.objects.count() == 1 and Suppression.objects.count() == 1


def test_a_raising_receiver_of_anymails_signal_undoes_nothing(sent, caplog):
    from anymail.signals import tracking

    receipt, mid = sent

    def broken(**kwargs: Any) -> None:
        raise RuntimeError("the project's own receiver is broken")

    tracking.connect(broken, dispatch_uid="test-broken")
    try:
        response = post([event("bounce", mid, event_id="x1", response="550 gone")])
    finally:
        tracking.disconnect(dispatch_uid="test-broken")
    assert response.status_code == 200
    assert Suppression.objects.get().address == "ann@example.com"
    assert OutboxEmail.objects.get(pk=receipt.id).delivery["ann@example.com"]["event"] == "bounced"
    assert "the project's own receiver is broken" in caplog.text
