"""Query counts of the hot paths, pinned so that a per-row query cannot creep in."""

from __future__ import annotations

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

import kipekee
from kipekee import outbox
from kipekee.delivery import Deliverer

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.mark.parametrize("n", [5, 50])
def test_claiming_a_batch_costs_the_same_for_any_size(sink_provider, django_assert_num_queries, n):
    for i in range(n):
        email = kipekee.Email(subject=f"s{i}", text="t", to=["a@example.com"], mode="queue")
        email.attach("a.txt", "x", "text/plain").send()
    skip_locked = connection.features.has_select_for_update_skip_locked
    with CaptureQueriesContext(connection) as claimed:
        rows = outbox.claim_batch(n)
    # Statements, not BEGIN/COMMIT: Django 5.2 logs those of atomic() on PostgreSQL too.
    statements = [q["sql"] for q in claimed.captured_queries
                  if q["sql"].upper() not in {"BEGIN", "COMMIT"}]
    assert len(statements) == (4 if skip_locked else 3), statements  # PostgreSQL: lock ids, then update
    with django_assert_num_queries(0):  # building the messages reads nothing more
        outcomes = Deliverer().deliver_many(rows)
    assert all(o.ok for o in outcomes) and len(rows) == n
