"""The suppression list: addresses Kipekee does not send to, on any path.

Delivery webhooks add hard bounces, spam complaints and unsubscribes; people add and
remove addresses in the admin. It is enforced in two places, so no path around it exists:

- :func:`kipekee.outbox.enqueue` (``kipekee.send``, ``Email.send``, the drop-in backend):
  suppressed recipients are taken off the message and named in ``refused``; when none is
  left the row is written as ``suppressed`` and the receipt says why;
- :class:`kipekee.delivery.Deliverer` checks again just before sending, for addresses
  suppressed after the row was queued.

Addresses are stored and compared in their canonical spelling
(:func:`kipekee.addresses.canonical`): ``"User"@Bücher.example`` on the list keeps
``user@xn--bcher-kva.example`` from being sent to, and the other way round.
"""

from __future__ import annotations

from collections.abc import Iterable

from django.db import IntegrityError, connections, router, transaction

from . import lists
from .addresses import canonical
from .models import Suppression, SuppressionReason, db_column

#: The name this had before canonical addresses; the same function.
normalize = canonical


def check(addresses: Iterable[str], *, using: str | None = None,
          mailing_list: str = "") -> dict[str, str]:
    """The suppressed ones among ``addresses``: address as given → why, for the caller.

    With ``mailing_list`` (list mail), also those who left that list
    (:func:`kipekee.lists.unsubscribed`); the suppression list's reason wins.
    """
    addresses = list(addresses)
    found = lists.unsubscribed(mailing_list, addresses, using=using) if mailing_list else {}
    return {**found, **_check(addresses, using)}


def _check(addresses: Iterable[str], using: str | None) -> dict[str, str]:
    wanted = {address: canonical(address) for address in addresses}
    if not wanted:
        return {}
    listed = _listed(set(wanted.values()), using)
    if not listed:
        return {}
    found = {s.address: s for s in Suppression.objects.using(using).filter(address__in=listed)}
    return {
        address: describe(found[key]) for address, key in wanted.items() if key in found
    }


def _listed(keys: set[str], using: str | None) -> set[str]:
    """Which of ``keys`` (canonical addresses) are on the list.

    A plain SELECT through the cursor: it runs on every enqueue and every claimed batch,
    and the ORM takes about 0.2 ms to build this query, ten times what the database
    takes to answer it (SQLite, bench/README.md). Hits, which are rare, are then read
    through the ORM.
    """
    connection = connections[using or router.db_for_read(Suppression)]
    quote = connection.ops.quote_name
    column = quote(db_column(Suppression._meta.get_field("address")))
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT {column} FROM {quote(Suppression._meta.db_table)} "
            f"WHERE {column} IN ({', '.join(['%s'] * len(keys))})",
            list(keys),
        )
        return {address for (address,) in cursor.fetchall()}


def describe(suppression: Suppression) -> str:
    source = f" via {suppression.source}" if suppression.source else ""
    when = suppression.created_at.date().isoformat()
    reason = (SuppressionReason(suppression.reason).label
              if suppression.reason in SuppressionReason.values else suppression.reason)
    return f"suppressed: {reason}{source} on {when}"


def add(address: str, reason: str = SuppressionReason.MANUAL, *, source: str = "",
        detail: str = "", using: str | None = None) -> tuple[Suppression, bool]:
    """Put ``address`` on the list (keeps the first entry if its mailbox is already there,
    however it was written)."""
    key = canonical(address)
    try:
        with transaction.atomic(using=using):
            return Suppression.objects.using(using).get_or_create(
                address=key, defaults={"reason": reason, "source": source, "detail": detail})
    except IntegrityError:  # a concurrent add of the same address won
        return Suppression.objects.using(using).get(address=key), False


def remove(address: str, *, using: str | None = None) -> bool:
    """Take ``address`` (its mailbox, however written) off the list; False if it was not on it."""
    deleted, _ = Suppression.objects.using(using).filter(address=canonical(address)).delete()
    return bool(deleted)
