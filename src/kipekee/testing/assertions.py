"""Assertions about the outbox, for the tests of projects that use Kipekee.

Plain functions: they work in pytest, in Django's ``TestCase`` and anywhere else with a
configured Django (``from kipekee.testing.assertions import assert_sent``). They read the
outbox rows, the record Kipekee itself keeps, so they hold whichever provider and engine
the test uses::

    kipekee.send("emails/welcome", to=["ann@example.com"], context={"name": "Ann"})
    assert_sent(to="ann@example.com", subject="Welcome, Ann")

Addresses match by mailbox (:func:`kipekee.addresses.canonical`): ``to="ann@example.com"``
matches a row sent to ``"Ann <Ann@Example.com>"``. A failed assertion lists what the
outbox holds, so its message alone says what went out instead.

In a ``TestCase`` (each test inside a transaction that never commits) mail sent with
mode ``now`` or ``hybrid`` is delivered on commit, exactly as in production; run the
commit hooks with Django's ``self.captureOnCommitCallbacks(execute=True)`` (pytest-django:
``django_capture_on_commit_callbacks(execute=True)``) around the code that sends. Mail
in mode ``queue`` waits for an engine: :func:`deliver_outbox` is one engine pass, here.
"""

from __future__ import annotations

from collections.abc import Iterable

from django.db import transaction

from ..addresses import canonical
from ..delivery import Deliverer
from ..models import OutboxEmail, Status
from ..outbox import claim_batch, db_for_write
from ..recording import record_many

__all__ = [
    "assert_not_sent",
    "assert_queued",
    "assert_sent",
    "assert_suppressed",
    "deliver_outbox",
    "describe_outbox",
    "find_emails",
]

#: Rows waiting for delivery: written and not yet sent, or to be tried again.
WAITING = (Status.QUEUED, Status.DEFERRED)


def find_emails(*, status: str | Iterable[str] | None = None, to: str | None = None,
                subject: str | None = None, using: str | None = None,
                **fields: object) -> list[OutboxEmail]:
    """The outbox rows matching every criterion given, oldest first.

    ``to``: a recipient among To, Cc and Bcc, by mailbox; ``subject``: the exact subject;
    ``status``: one status or several; other keywords are model fields (``template=``,
    ``event=``, ``lane=``, ``mailing_list=``, ``provider=``, ``sent_by=``, ...).
    """
    rows = OutboxEmail.objects.using(using).order_by("id")
    if status is not None:
        rows = rows.filter(status__in=[status] if isinstance(status, str) else list(status))
    if subject is not None:
        rows = rows.filter(subject=subject)
    if fields:
        rows = rows.filter(**fields)
    if to is None:
        return list(rows)
    wanted = canonical(to)
    return [row for row in rows if wanted in {canonical(a) for a in row.recipients}]


def _suppressed_for(row: OutboxEmail, wanted: str) -> bool:
    # Suppressed recipients are taken off the row and named in ``refused`` with a reason
    # that starts "suppressed" (kipekee.suppression.describe, kipekee.lists); other
    # entries there are refusals by a provider.
    return any(canonical(address) == wanted and str(why).startswith("suppressed")
               for address, why in row.refused.items())


def describe_outbox(*, using: str | None = None, limit: int = 20) -> str:
    """The newest ``limit`` outbox rows, one line each: what a failed assertion shows."""
    rows = list(OutboxEmail.objects.using(using).order_by("-id")[:limit])
    if not rows:
        return "The outbox is empty."
    lines = [f"  #{row.pk} {row.status:<10} to={row.recipients} subject={row.subject!r}"
             + (f" refused={row.refused}" if row.refused else "")
             + (f" error={row.last_error!r}" if row.last_error else "")
             for row in reversed(rows)]
    return "The outbox holds (oldest first):\n" + "\n".join(lines)


def _criteria(**given: object) -> str:
    return ", ".join(f"{key}={value!r}" for key, value in given.items() if value is not None)


def _expect(rows: list[OutboxEmail], count: int | None, what: str, using: str | None) -> None:
    if count is None and not rows:
        raise AssertionError(f"No email {what}.\n{describe_outbox(using=using)}")
    if count is not None and len(rows) != count:
        raise AssertionError(
            f"Expected {count} email(s) {what}, found {len(rows)}.\n{describe_outbox(using=using)}")


def assert_sent(*, to: str | None = None, subject: str | None = None, count: int | None = None,
                using: str | None = None, **fields: object) -> list[OutboxEmail]:
    """Assert that email matching the criteria was sent (a provider accepted it).

    ``count``: exactly that many rows match (``count=0``: none); without it, at least one.
    Returns the matching rows, for further checks (``rows[0].sent_by``, ``.metadata``).
    """
    rows = find_emails(status=Status.SENT, to=to, subject=subject, using=using, **fields)
    _expect(rows, count, f"sent matching {_criteria(to=to, subject=subject, **fields)}", using)
    return rows


def assert_not_sent(*, to: str | None = None, subject: str | None = None,
                    using: str | None = None, **fields: object) -> None:
    """Assert that no email matching the criteria was sent."""
    assert_sent(to=to, subject=subject, count=0, using=using, **fields)


def assert_queued(*, to: str | None = None, subject: str | None = None,
                  count: int | None = None, status: str | Iterable[str] = WAITING,
                  using: str | None = None, **fields: object) -> list[OutboxEmail]:
    """Assert that email matching the criteria waits in the outbox (``queued``, or
    ``deferred`` after a transient failure): written, not yet sent, not given up on.
    ``status="deferred"``: only what failed once and waits to be tried again."""
    rows = find_emails(status=status, to=to, subject=subject, using=using, **fields)
    _expect(rows, count, f"queued matching {_criteria(to=to, subject=subject, **fields)}", using)
    return rows


def assert_suppressed(to: str, *, subject: str | None = None, count: int | None = None,
                      using: str | None = None, **fields: object) -> list[OutboxEmail]:
    """Assert that email matching the criteria was not sent to ``to`` because that
    address is on the suppression list (or left the row's mailing list).

    Matches a row written as ``suppressed`` (every recipient suppressed) as well as one
    sent to its other recipients: either way ``to`` is named in the row's ``refused``.
    """
    wanted = canonical(to)
    rows = OutboxEmail.objects.using(using).order_by("id")
    if subject is not None:
        rows = rows.filter(subject=subject)
    if fields:
        rows = rows.filter(**fields)
    found = [row for row in rows if _suppressed_for(row, wanted)]
    _expect(found, count,
            f"suppressed for {_criteria(to=to, subject=subject, **fields)}", using)
    return found


def deliver_outbox(*, batch_size: int = 100, using: str | None = None) -> int:
    """Deliver what an engine would take now, in this thread, once each; return how many
    rows were tried.

    For tests that send in mode ``queue`` without an engine running: the rows due now are
    claimed, sent through the configured providers and recorded, as by an engine (a
    transient failure leaves a row ``deferred``, due later). Rows written for later
    (``send_at``) wait until their time.
    """
    db = using or db_for_write()
    tried: set[int] = set()
    with Deliverer() as deliverer:
        while rows := claim_batch(batch_size, engine="testing", using=db):
            outcomes = deliverer.deliver_many(rows)
            with transaction.atomic(using=db):
                record_many(rows, outcomes)
            again = tried.issuperset(row.pk for row in rows)
            tried.update(row.pk for row in rows)
            if again:  # a retry already due again (a jittered delay near 0): once is enough
                break
    return len(tried)
