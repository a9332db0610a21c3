"""A person's actions on the outbox (retry, resend), structured log lines, Prometheus metrics."""

from __future__ import annotations

import logging

import pytest
from django.test import Client

import kipekee
from kipekee import outbox
from kipekee.exceptions import InvalidMessage
from kipekee.models import Attachment, OutboxEmail, Status

from .conftest import SMTP_BACKEND, unused_port

pytestmark = pytest.mark.django_db(transaction=True)

MAIL = {"subject": "Order 1", "text": "thanks", "to": ["ann@example.com"]}


def _refused_provider() -> dict:
    return {"BACKEND": SMTP_BACKEND,
            "OPTIONS": {"host": "127.0.0.1", "port": unused_port(), "timeout": 1}}


def test_retry_moves_failed_and_deferred_back_to_queued(kipekee_settings, smtp_sink):
    from .conftest import smtp_provider

    kipekee_settings(primary=_refused_provider(), _extra={"RETRY": {"MAX_ATTEMPTS": 1}})
    failed = kipekee.send(**MAIL, mode="hybrid")
    assert failed.status == Status.FAILED  # one attempt allowed, connection refused
    row = OutboxEmail.objects.get(pk=failed.id)
    assert outbox.retry(row.pk) is True
    again = OutboxEmail.objects.get(pk=row.pk)
    assert again.status == Status.QUEUED and again.due_at >= row.due_at
    assert outbox.retry(row.pk) is False  # queued already: nothing to do
    # The provider is fixed; the next claim (an engine's) delivers it.
    kipekee_settings(primary=smtp_provider(smtp_sink))
    claimed = outbox.claim(row.pk)
    assert claimed is not None and claimed.attempts == 2
    from kipekee.delivery import Deliverer
    from kipekee.recording import record

    with Deliverer() as d:
        assert record(claimed, d.deliver(claimed))
    assert OutboxEmail.objects.get(pk=row.pk).status == Status.SENT
    assert outbox.retry(row.pk) is False  # sent is final
    assert [m.subject for m in smtp_sink.wait_for(1)] == ["Order 1"]


def test_resend_copies_a_finished_row_as_a_new_message(sink_provider):
    receipt = kipekee.send(**MAIL, metadata={"order": 7}, idempotency_key="order-7",
                           attachments=[("a.txt", b"hello", "text/plain")])
    assert receipt.sent
    copy = outbox.resend(receipt.id)
    assert copy.pk != receipt.id and copy.status == Status.QUEUED and copy.mode == "queue"
    assert copy.message_id != receipt.message_id  # a new message, not a duplicate
    assert copy.idempotency_key is None and copy.attempts == 0 and copy.sent_by == ""
    assert copy.metadata == {"order": 7, "resent_from": receipt.id}
    assert (copy.subject, copy.to, copy.body) == ("Order 1", ["ann@example.com"], "thanks")
    assert list(Attachment.objects.filter(email=copy).values_list("filename", "content")) == [
        ("a.txt", b"hello")]
    waiting = OutboxEmail.objects.get(pk=kipekee.send(**MAIL, mode="queue").id)
    with pytest.raises(InvalidMessage, match="still going out"):
        outbox.resend(waiting.pk)


def test_structured_log_lines(sink_provider, caplog):
    with caplog.at_level(logging.INFO, logger="kipekee.events"):
        receipt = kipekee.send(**MAIL, template="")
    events = [r.kipekee for r in caplog.records if r.name == "kipekee.events"]
    assert [e["event"] for e in events] == ["queued", "sent"]
    sent = events[1]
    assert sent["id"] == receipt.id and sent["provider"] == "primary"
    assert sent["message_id"] == receipt.message_id and sent["recipients"] == 1
    assert "ann@example.com" not in caplog.text  # no addresses in logs
    assert f"email sent id={receipt.id} " in caplog.text


def test_failure_is_logged_as_error(kipekee_settings, caplog):
    kipekee_settings(primary=_refused_provider(), _extra={"RETRY": {"MAX_ATTEMPTS": 1}})
    with caplog.at_level(logging.INFO, logger="kipekee.events"):
        kipekee.send(**MAIL, mode="hybrid")
    failed = [r for r in caplog.records if r.name == "kipekee.events" and r.kipekee["event"] == "failed"]
    assert len(failed) == 1 and failed[0].levelno == logging.ERROR
    assert failed[0].kipekee["error_kind"] == "transient" and "refused" in failed[0].kipekee["error"].lower()


def _sample(text: str, name: str, **labels: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0


def test_metrics_view_counts_sends_and_reads_the_queue(kipekee_settings, smtp_sink):
    from .conftest import smtp_provider

    kipekee_settings(primary=smtp_provider(smtp_sink), _extra={"METRICS": True})
    client = Client()
    before = client.get("/metrics/").content.decode()
    kipekee.send(**MAIL)
    kipekee.send(**MAIL, mode="queue")
    kipekee.send(**MAIL, mode="queue")
    response = client.get("/metrics/")
    assert response.status_code == 200
    text = response.content.decode()
    sent = "kipekee_emails_total"
    assert _sample(text, sent, status="sent", provider="primary") == \
        _sample(before, sent, status="sent", provider="primary") + 1
    assert _sample(text, sent, status="queued") == _sample(before, sent, status="queued") + 3
    assert _sample(text, "kipekee_queue_depth", status="queued") == 2
    assert _sample(text, "kipekee_send_duration_seconds_count", provider="primary") >= 1
    assert _sample(text, "kipekee_oldest_due_age_seconds") >= 0


def test_metrics_off_by_default(sink_provider):
    assert Client().get("/metrics/").status_code == 404
