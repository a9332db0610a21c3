"""Query counts of the hot paths, pinned so that a per-row query cannot creep in."""

from __future__ import annotations

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

import kipekee
from kipekee import outbox
from kipekee.delivery import Deliverer

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
