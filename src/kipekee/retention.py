"""Retention: erase what the outbox no longer needs to keep (``manage.py kipekee_purge``).

Only finished rows (sent, failed, suppressed, cancelled) older than the age are touched;
waiting and sending rows never are. Work goes in batches of ``BATCH_SIZE`` rows, each in
its own short transaction, so a purge of millions of rows never holds long locks and can
be stopped and resumed.

``anonymise`` keeps each row for statistics and erases its content: subject, bodies,
headers, metadata, the sender, error texts (they quote addresses), attachments; each
recipient address becomes its domain (``@example.com``), so counts by domain remain.
Anonymised rows have an empty ``from_email`` (a row written by Kipekee never does), which
is how a later run skips them. ``delete`` removes the rows with their attempts.
"""

from __future__ import annotations

from collections import Counter
from datetime import datetime, timedelta
from email.utils import parseaddr

from django.db import transaction
from django.db.models import Case, Count, JSONField, Value, When
from django.utils import timezone

from .models import FINAL_STATUSES, Attachment, Attempt, OutboxEmail
from .outbox import db_for_write


def _domain_only(address: str) -> str:
    addr = parseaddr(address)[1] or address
    return "@" + addr.rpartition("@")[2].lower() if "@" in addr else ""


def purge(*, days: int, action: str, batch_size: int = 1000, dry_run: bool = False,
          now: datetime | None = None) -> Counter[str]:
    """Anonymise or delete finished rows created more than ``days`` ago.

    Returns the number of rows handled by status (with ``dry_run``: that would be).
    """
    if action not in ("anonymise", "delete"):
        raise ValueError(f"action must be 'anonymise' or 'delete', not {action!r}")
    db = db_for_write()
    cutoff = (now or timezone.now()) - timedelta(days=days)
    candidates = OutboxEmail.objects.using(db).filter(
        status__in=FINAL_STATUSES, created_at__lt=cutoff)
    if action == "anonymise":
        candidates = candidates.exclude(from_email="")
    counts: Counter[str] = Counter()
    if dry_run:
        counts.update(dict(candidates.values_list("status").annotate(n=Count("id")).order_by()))
        return counts
    last_id = 0
    while True:
        # Keyset pagination on the primary key: each batch starts where the last ended.
        batch = list(candidates.filter(pk__gt=last_id).order_by("pk")
                     .only("id", "status", "to", "cc", "bcc", "reply_to")[:batch_size])
        if not batch:
            return counts
        last_id = batch[-1].pk
        ids = [row.pk for row in batch]
        with transaction.atomic(using=db):
            Attachment.objects.using(db).filter(email_id__in=ids).delete()
            if action == "delete":
                Attempt.objects.using(db).filter(email_id__in=ids).delete()
                OutboxEmail.objects.using(db).filter(pk__in=ids).delete()
            else:
                _anonymise(db, batch, ids)
        counts.update(row.status for row in batch)


def _anonymise(db: str, batch: list[OutboxEmail], ids: list[int]) -> None:
    # One UPDATE (one new version of each row): addresses row by row through CASE, the
    # rest constant. Empty lists, the common case for cc/bcc/reply_to, need no branch.
    addresses: dict[str, Case] = {}
    for name in ("to", "cc", "bcc", "reply_to"):
        whens = [When(pk=row.pk, then=Value(domains, output_field=JSONField()))
                 for row in batch if (domains := [_domain_only(a) for a in getattr(row, name)])]
        addresses[name] = Case(*whens, default=Value([], output_field=JSONField()),
                               output_field=JSONField())
    OutboxEmail.objects.using(db).filter(pk__in=ids).update(
        **addresses, from_email="", subject="", body="", alternatives=[], headers={},
        metadata={}, last_error="", refused={},
    )
    Attempt.objects.using(db).filter(email_id__in=ids).update(error="", refused={})
