"""The outbox as a state machine (Hypothesis, rule-based), driven through the real code.

Rules: enqueue in a transaction that commits or rolls back (``kipekee.send``); claim one
row (``outbox.claim``) or a batch (``outbox.claim_batch``); deliver a held row through
``Deliverer`` to a real SMTP server that answers 250, 451, 550 or drops the connection,
and record it (``recording.record``); kill the holder (abandon the row without recording);
let a killed holder's late result arrive; advance the clock (move ``due_at`` and
``lease_until`` into the past, since the code reads ``timezone.now()``).

Invariants, after every step: the outbox holds exactly the committed messages; nothing
rolled back was ever delivered; a final state (sent, failed) never changes; ``sent`` only
for a message the provider acknowledged, with exactly one "sent" attempt; a late result is
recorded only if nobody took the row over. At the end, every committed message is driven
to exactly one final state.

``KIPEKEE_STATE_MACHINE_EXAMPLES`` (default 12) sets how many runs Hypothesis makes; the
examples are derandomised, so CI sees the same ones every time.
"""

from __future__ import annotations

import os
from collections import Counter
from datetime import timedelta
from typing import Any

import pytest
from django.db import transaction
from django.utils import timezone
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

import kipekee
from kipekee import outbox
from kipekee.delivery import Deliverer
from kipekee.models import WAITING_STATUSES, Attempt, OutboxEmail, Status
from kipekee.recording import record
from kipekee.retry import RetryPolicy
from kipekee.testing import LocalSMTPServer

from .conftest import smtp_provider

pytestmark = [pytest.mark.reliability, pytest.mark.django_db(transaction=True)]

FINAL = {Status.SENT, Status.FAILED}
REPLIES = {
    "2xx": None,
    "4xx": "451 4.3.0 try again later",
    "5xx": "550 5.7.1 message refused",
    "drop": "drop",
}


class _Rollback(Exception):
    pass


class OutboxMachine(RuleBasedStateMachine):
    def __init__(self, server: LocalSMTPServer, totals: Counter[str]) -> None:
        super().__init__()
        OutboxEmail.objects.all().delete()
        server.messages.clear()
        self.server = server
        self.totals = totals
        self.deliverer = Deliverer()
        self.policy = RetryPolicy(base_delay=1, max_delay=5, max_attempts=4,
                                  lifetime=timedelta(days=1), jitter=False)
        self.committed: dict[int, str] = {}  # pk -> Message-ID
        self.rolled_back: set[str] = set()
        self.final: dict[int, str] = {}
        self.held: list[OutboxEmail] = []  # claimed by a live engine
        self.killed: list[OutboxEmail] = []  # claimed by an engine that died (or stalled)

    # --- rules ------------------------------------------------------------------------

    @rule(commit=st.booleans())
    def enqueue(self, commit: bool) -> None:
        try:
            with transaction.atomic():
                receipt = kipekee.send(subject="Order", text="thanks", to=["ann@example.com"],
                                       mode="queue")
                if not commit:
                    raise _Rollback
        except _Rollback:
            self.rolled_back.add(receipt.message_id)
            self.totals["rolled back"] += 1
        else:
            self.committed[receipt.id] = receipt.message_id

    @precondition(lambda self: self.committed)
    @rule(data=st.data())
    def claim_one(self, data: st.DataObject) -> None:
        pk = data.draw(st.sampled_from(sorted(self.committed)))
        before = OutboxEmail.objects.get(pk=pk)
        row = outbox.claim(pk)
        claimable = (before.status in WAITING_STATUSES and before.due_at <= timezone.now()) or (
            before.status == Status.SENDING and before.lease_until <= timezone.now())
        assert (row is not None) == claimable, (before.status, before.due_at, before.lease_until)
        if row is not None:
            assert row.attempts == before.attempts + 1
            self.held.append(row)

    @rule(limit=st.integers(min_value=1, max_value=4))
    def claim_batch(self, limit: int) -> None:
        rows = outbox.claim_batch(limit, engine="machine")
        assert len(rows) <= limit
        assert not {r.pk for r in rows} & set(self.final)  # a final row is never claimed
        self.held.extend(rows)

    @precondition(lambda self: self.held)
    @rule(reply=st.sampled_from(sorted(REPLIES)), index=st.integers(min_value=0))
    def deliver(self, reply: str, index: int) -> None:
        row = self.held.pop(index % len(self.held))
        self._deliver_and_record(row, reply, late=False)

    @precondition(lambda self: self.held)
    @rule(index=st.integers(min_value=0))
    def kill(self, index: int) -> None:
        """The engine holding the row dies: no release, no result."""
        self.killed.append(self.held.pop(index % len(self.held)))
        self.totals["kills"] += 1

    @precondition(lambda self: self.killed)
    @rule(reply=st.sampled_from(sorted(REPLIES)), index=st.integers(min_value=0))
    def late_result(self, reply: str, index: int) -> None:
        """An engine that was only slow, not dead, finishes long after its lease."""
        row = self.killed.pop(index % len(self.killed))
        self._deliver_and_record(row, reply, late=True)

    @rule()
    def advance_clock(self) -> None:
        past = timezone.now() - timedelta(seconds=1)
        OutboxEmail.objects.filter(status__in=WAITING_STATUSES).update(due_at=past)
        OutboxEmail.objects.filter(status=Status.SENDING).update(lease_until=past)

    def _deliver_and_record(self, row: OutboxEmail, reply: str, *, late: bool) -> None:
        current = OutboxEmail.objects.get(pk=row.pk)
        still_ours = current.status == Status.SENDING and current.attempts == row.attempts
        faults = self.server.faults
        if reply == "drop":
            faults.drop_mid_data = True
        elif REPLIES[reply] is not None:
            faults.data_replies.append(REPLIES[reply])
        copies_before = self._copies(row.message_id)
        try:
            outcome = self.deliverer.deliver(row)
        finally:
            faults.drop_mid_data = False
            faults.data_replies.clear()
        self.totals[reply] += 1
        acknowledged = self._copies(row.message_id) - copies_before
        assert outcome.ok == (reply == "2xx"), outcome
        assert acknowledged == (1 if outcome.ok else 0)
        recorded = record(row, outcome, self.policy)
        # Fencing: a result is recorded exactly when this attempt still holds the row.
        assert recorded == still_ours, (late, current.status, current.attempts, row.attempts)
        if late:
            self.totals["late results"] += 1
            self.totals["late results fenced"] += not recorded
        if recorded and row.status in FINAL:
            self.final[row.pk] = row.status

    def _copies(self, message_id: str) -> int:
        return sum(1 for m in self.server.messages if m.message_id == message_id)

    # --- invariants ---------------------------------------------------------------------

    @invariant()
    def outbox_holds_exactly_the_committed(self) -> None:
        ids = dict(OutboxEmail.objects.values_list("pk", "message_id"))
        assert ids == self.committed
        received = {m.message_id for m in self.server.messages}
        assert not received & self.rolled_back

    @invariant()
    def final_states_are_final_and_sent_means_acknowledged(self) -> None:
        received = Counter(m.message_id for m in self.server.messages)
        sent_attempts = Counter(
            Attempt.objects.filter(outcome="sent").values_list("email_id", flat=True))
        for row in OutboxEmail.objects.all():
            if row.pk in self.final:
                assert row.status == self.final[row.pk]
            if row.status == Status.SENT:
                assert received[row.message_id] >= 1 and sent_attempts[row.pk] == 1
            else:
                assert sent_attempts[row.pk] == 0
            if row.status == Status.SENDING:
                assert row.lease_until is not None

    def teardown(self) -> None:
        try:
            for _ in range(20):
                self.advance_clock()
                rows = outbox.claim_batch(100, engine="teardown")
                if not rows:
                    break
                for row in rows:
                    assert record(row, self.deliverer.deliver(row), self.policy)
            statuses = dict(OutboxEmail.objects.values_list("pk", "status"))
            assert set(statuses) == set(self.committed)
            assert set(statuses.values()) <= FINAL, statuses  # every one reached a final state
            for pk, status in self.final.items():
                assert statuses[pk] == status
            received = Counter(m.message_id for m in self.server.messages)
            for pk, status in statuses.items():
                self.totals[status] += 1
                self.totals["extra copies"] += max(received[self.committed[pk]] - 1, 0)
                if status == Status.SENT:
                    assert received[self.committed[pk]] >= 1
            self.totals["committed"] += len(self.committed)
        finally:
            self.deliverer.close()


def test_outbox_state_machine(smtp_sink, kipekee_settings, scenario):
    kipekee_settings(primary=smtp_provider(smtp_sink),
                     _extra={"CIRCUIT_BREAKER": {"FAILURES": 1000}})
    examples = int(os.environ.get("KIPEKEE_STATE_MACHINE_EXAMPLES", "12"))
    totals: Counter[str] = Counter()
    run_state_machine_as_test(
        lambda: OutboxMachine(smtp_sink, totals),
        settings=settings(max_examples=examples, stateful_step_count=25, deadline=None,
                          derandomize=True, database=None, print_blob=True,
                          suppress_health_check=list(HealthCheck)),
    )
    assert totals["committed"] > 0 and totals["2xx"] > 0
    lost = totals["committed"] - totals[Status.SENT] - totals[Status.FAILED]
    faults = ", ".join(f"{totals[k]} {k}" for k in ("4xx", "5xx", "drop", "kills", "late results",
                                                   "late results fenced", "rolled back"))
    scenario.record("state machine (Hypothesis)",
                    load=f"{examples} runs x 25 steps, {totals['committed']} committed, "
                         f"{totals[Status.FAILED]} failed (5xx/exhausted)",
                    faults=faults, delivered=totals[Status.SENT], lost=lost,
                    duplicated=totals["extra copies"])
