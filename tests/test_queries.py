"""Query counts of the hot paths, pinned so that a per-row query cannot creep in."""

from __future__ import annotations

from typing import Any

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

import kipekee
from kipekee import outbox
from kipekee.delivery import Deliverer

from .test_claims import plan_of as claims_plan_of

pytestmark = pytest.mark.django_db(transaction=True)


def claim_and_deliver(n: int) -> tuple[int, int]:
    """Queries spent claiming a batch of n rows, and building and delivering it."""
    for i in range(n):
        email = kipekee.Email(subject=f"s{i}", text="t", to=[f"a{i}@example.com"], mode="queue")
        email.attach("a.txt", "x", "text/plain").send()
    with CaptureQueriesContext(connection) as claiming:
        rows = outbox.claim_batch(n)
    with CaptureQueriesContext(connection) as delivering:
        outcomes = Deliverer().deliver_many(rows)
    assert len(rows) == n and all(o.ok for o in outcomes)
    for row, outcome in zip(rows, outcomes):
        outbox.mark_sent(row, outcome)
    return statements(claiming), statements(delivering)


def statements(captured: CaptureQueriesContext) -> int:
    # PostgreSQL's backend logs BEGIN and COMMIT too; count the statements that do work.
    return sum(q["sql"] not in {"BEGIN", "COMMIT"} for q in captured.captured_queries)


def test_a_batch_costs_the_same_queries_for_any_size(sink_provider):
    small = claim_and_deliver(10)
    large = claim_and_deliver(50)
    assert small == large, f"10 rows: {small}, 50 rows: {large} (claim, deliver) queries"
    # Claim: one UPDATE for expired leases, one per lane asked (the bulk lane's reserved
    # share, then the transactional lane, which fills the claim), the rows, their
    # attachments (and BEGIN IMMEDIATE on SQLite). Deliver: suppressions.
    assert large[0] <= 6 and large[1] <= 2


# --- partial indexes: what a queued row does not write, its queries still find -----------

def plan_of(queryset: Any) -> str:
    return claims_plan_of(*queryset.query.sql_with_params())


def test_the_partial_indexes_serve_the_queries_that_need_them(rf, kipekee_settings):
    """A queued row has no idempotency key, target or sender most of the time: those
    indexes hold only the rows that have one (a queued send's INSERT writes no entry
    in them), and the lookups by key, by target and the admin's provider filter still
    walk them among 3,000 rows."""
    from django.contrib import admin
    from django.contrib.contenttypes.models import ContentType

    from kipekee.admin import ProviderFilter
    from kipekee.models import OutboxEmail, Status

    kipekee_settings(primary={"BACKEND": "kipekee.backends.smtp.EmailBackend",
                              "OPTIONS": {"host": "127.0.0.1"}})
    kipekee.send_many(kipekee.Email(subject="s", text="t", to=[f"a{i}@example.com"])
                      for i in range(3000))
    keyed = [kipekee.send(subject="k", text="t", to=["k@example.com"], mode="queue",
                          idempotency_key=f"key-{i}").id for i in range(10)]
    first = OutboxEmail.objects.order_by("id")
    ct = ContentType.objects.get_for_model(OutboxEmail)
    OutboxEmail.objects.filter(pk__in=list(first.values_list("pk", flat=True)[:10])).update(
        content_type=ct, object_id="7")
    OutboxEmail.objects.filter(pk__in=list(first.values_list("pk", flat=True)[10:20])).update(
        status=Status.SENT, sent_by="primary")
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE")

    by_key = OutboxEmail.objects.filter(idempotency_key="key-3")
    by_target = OutboxEmail.objects.filter(content_type=ct, object_id__in=["7"], event="")
    model_admin = admin.site._registry[OutboxEmail]
    by_provider = ProviderFilter(rf.get("/", {"provider": "primary"}), {"provider": ["primary"]},
                                 OutboxEmail, model_admin).queryset(
        None, OutboxEmail.objects.all())  # type: ignore[arg-type]
    assert [row.pk for row in by_key] == [keyed[3]]
    assert by_target.count() == 10 and by_provider.count() == 10
    for queryset, index in ((by_key, "kipekee_idempotency_key"), (by_target, "kipekee_target"),
                            (by_provider, "kipekee_sent_by")):
        plan = plan_of(queryset)
        assert index in plan, plan
        assert "SCAN kipekee_outboxemail\n" not in plan + "\n" and "Seq Scan" not in plan, plan
