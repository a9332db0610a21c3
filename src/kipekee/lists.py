"""Mailing lists: one-click unsubscribe (RFC 8058, RFC 2369) and per-list suppression.

A message sent to a list names it::

    kipekee.send("emails/newsletter", to=subscriber.email, context={...},
                 mailing_list="newsletter")   # a MailingList key (admin, data migration)

and then:

- it goes to one recipient: its unsubscribe link names that address;
- it carries, besides its own headers::

      List-Unsubscribe: <https://shop.example/kipekee/unsubscribe/TOKEN/>,
        <mailto:unsubscribe@shop.example?subject=unsubscribe%20TOKEN>
      List-Unsubscribe-Post: List-Unsubscribe=One-Click
      List-Id: <newsletter.shop.example>

  and its templates get ``unsubscribe_url`` (the same https link) for the footer;
- it is not sent to an address that left that list (the row is ``suppressed``, or the
  address is taken off it), checked when it is written and again just before it is sent.
  An address that left the newsletter still gets its order confirmations: they name no
  list. Addresses compare in their canonical spelling (:func:`kipekee.addresses.canonical`).

Mail that names no list carries none of these headers: transactional mail never offers
an unsubscribe link unless its sender asks, by naming a list.

The token is signed with ``django.core.signing`` (``SECRET_KEY``, or one of
``SECRET_KEY_FALLBACKS`` while a key is rotated; its own salt), names the list and the
canonical address, and expires after ``KIPEKEE["UNSUBSCRIBE"]["MAX_AGE_DAYS"]`` (180).
No database row stands behind it: sending a newsletter to 100,000 people writes no
token table.

The links lead to :mod:`kipekee.unsubscribe` (``kipekee.urls``): the one-click POST a
mailbox provider makes, and a page for people. The ``mailto:`` link's email reaches
:func:`unsubscribe_by_mail`: through anymail's ``inbound`` signal when your ESP forwards
inbound mail to anymail's inbound webhook (Kipekee connects :func:`on_inbound` when
anymail is installed), or from your own inbound handling.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit

from django.core import signing
from django.db import router, transaction
from django.urls import NoReverseMatch, reverse

from . import conf, signals
from .addresses import canonical
from .exceptions import ConfigurationError, InvalidToken, UnknownMailingList
from .models import MailingList, UnsubscribeSource, Unsubscription

logger = logging.getLogger("kipekee.lists")

#: The body of a one-click unsubscribe POST (RFC 8058 section 3.1), also the value of
#: the ``List-Unsubscribe-Post`` header.
ONE_CLICK = "List-Unsubscribe=One-Click"
#: django.core.signing's salt: a token of another part of the site never passes here.
SALT = "kipekee.lists.unsubscribe"
_SUBJECT_TOKEN = re.compile(r"\bunsubscribe\s+([A-Za-z0-9_.:-]+)", re.IGNORECASE)


@dataclass(frozen=True)
class Subscription:
    """What an unsubscribe token names: a list's key and a canonical address."""

    mailing_list: str
    address: str


@dataclass(frozen=True)
class Links:
    """The unsubscribe link of one list message and the headers that carry it."""

    url: str
    headers: dict[str, str]


def make_token(mailing_list: str, address: str) -> str:
    """A signed, timestamped token naming ``mailing_list`` and ``address`` (canonical)."""
    return signing.dumps([mailing_list, canonical(address)], salt=SALT, compress=True)


def read_token(token: str) -> Subscription:
    """What ``token`` names; :class:`~kipekee.exceptions.InvalidToken` if it was altered,
    signed with another key, or is older than ``UNSUBSCRIBE["MAX_AGE_DAYS"]``."""
    try:
        value = signing.loads(token, salt=SALT, max_age=conf.get().unsubscribe.max_age)
    except signing.SignatureExpired:
        raise InvalidToken("This unsubscribe link has expired.") from None
    except signing.BadSignature:
        raise InvalidToken("This unsubscribe link is not valid: it was changed or cut "
                           "short on the way.") from None
    if (not isinstance(value, list) or len(value) != 2
            or not all(isinstance(part, str) and part for part in value)):
        raise InvalidToken("This unsubscribe link names no list and address.")
    return Subscription(mailing_list=value[0], address=value[1])


def links(mailing_list: str, address: str) -> Links:
    """The https link (and ``mailto:`` one, when ``UNSUBSCRIBE["MAILTO"]`` is set) for
    ``address`` to leave ``mailing_list``, and the headers of RFC 2369, 8058 and 2919."""
    settings = conf.get().unsubscribe
    if settings.base_url is None:
        raise ConfigurationError(
            'KIPEKEE["UNSUBSCRIBE"]["BASE_URL"] is not set: a list message needs the absolute '
            'https address of its unsubscribe link (e.g. "https://shop.example").')
    token = make_token(mailing_list, address)
    try:
        path = reverse("kipekee:unsubscribe", args=[token])
    except NoReverseMatch:
        raise ConfigurationError(
            'A list message links to Kipekee\'s unsubscribe view: add path("kipekee/", '
            'include("kipekee.urls")) to your URLconf.') from None
    url = settings.base_url + path
    unsubscribe = [f"<{url}>"]
    if settings.mailto:
        unsubscribe.append(f"<mailto:{settings.mailto}?subject="
                           f"{quote('unsubscribe ' + token, safe=':')}>")
    host = urlsplit(settings.base_url).hostname or "localhost"
    return Links(url=url, headers={
        "List-Unsubscribe": ", ".join(unsubscribe),
        "List-Unsubscribe-Post": ONE_CLICK,
        "List-Id": f"<{mailing_list}.{host}>",
    })


#: The headers a list message gets; a message naming a list may not set them itself.
HEADERS = frozenset({"list-unsubscribe", "list-unsubscribe-post", "list-id"})


# --- who left which list -------------------------------------------------------------

def require(mailing_list: str, *, using: str | None = None) -> MailingList:
    """The list ``mailing_list``; :class:`~kipekee.exceptions.UnknownMailingList` if
    there is none (a typo would otherwise mail everyone who left the real list)."""
    found = MailingList.objects.using(using).filter(key=mailing_list).first()
    if found is None:
        known = ", ".join(repr(k) for k in MailingList.objects.using(using)
                          .order_by("key").values_list("key", flat=True)[:20]) or "none"
        raise UnknownMailingList(
            f"Unknown mailing list {mailing_list!r} (lists: {known}). Create it in the admin "
            "or a data migration (kipekee.models.MailingList).")
    return found


def unsubscribed(mailing_list: str, addresses: Iterable[str], *,
                 using: str | None = None) -> dict[str, str]:
    """The ones among ``addresses`` that left ``mailing_list``: address as given → why
    (``"suppressed: unsubscribed from 'newsletter' (one-click) on 2026-05-01"``)."""
    return unsubscribed_many({mailing_list: addresses}, using=using).get(mailing_list, {})


def unsubscribed_many(wanted: Mapping[str, Iterable[str]], *,
                      using: str | None = None) -> dict[str, dict[str, str]]:
    """:func:`unsubscribed` for several lists at once (a claimed batch): list key →
    {address → why}, lists with nobody gone left out. One query per list."""
    found: dict[str, dict[str, str]] = {}
    for key, addresses in wanted.items():
        by_canonical = {address: canonical(address) for address in addresses}
        if not key or not by_canonical:
            continue
        # (The column holds the list's key, its to_field; django-stubs assumes the pk's type.)
        rows = {u.address: u for u in Unsubscription.objects.using(using).filter(
            mailing_list_id=key, address__in=set(by_canonical.values()))}  # type: ignore[misc]
        gone = {address: describe(rows[c]) for address, c in by_canonical.items() if c in rows}
        if gone:
            found[key] = gone
    return found


def describe(unsubscription: Unsubscription) -> str:
    # "suppressed:" like the suppression list's reasons: delivery keeps these on the row.
    return (f"suppressed: unsubscribed from {unsubscription.mailing_list_id!r} "
            f"({unsubscription.source}) on {unsubscription.created_at.date().isoformat()}")


def unsubscribe(mailing_list: str, address: str, *, source: str = UnsubscribeSource.CODE,
                using: str | None = None) -> tuple[Unsubscription, bool]:
    """``address`` leaves ``mailing_list``; ``(row, created)``. Idempotent: leaving twice
    keeps the first row and sends :data:`kipekee.signals.unsubscribed` once."""
    db = using or router.db_for_write(Unsubscription)
    with transaction.atomic(using=db):
        the_list = require(mailing_list, using=db)
        # get_or_create settles two at once (the unique constraint, then a get).
        row, created = Unsubscription.objects.using(db).get_or_create(
            mailing_list=the_list, address=canonical(address), defaults={"source": source})
        if created:
            signals.send_on_commit(signals.unsubscribed, using=db, sender=MailingList,
                                   mailing_list=the_list, address=row.address, source=source)
    if created:
        logger.info("Unsubscribed from %s (%s)", mailing_list, source)
    return row, created


def resubscribe(mailing_list: str, address: str, *, source: str = UnsubscribeSource.CODE,
                using: str | None = None) -> bool:
    """``address`` comes back to ``mailing_list``; False if it had not left it."""
    db = using or router.db_for_write(Unsubscription)
    key = canonical(address)
    with transaction.atomic(using=db):
        the_list = require(mailing_list, using=db)
        deleted, _ = Unsubscription.objects.using(db).filter(
            mailing_list=the_list, address=key).delete()
        if deleted:
            signals.send_on_commit(signals.resubscribed, using=db, sender=MailingList,
                                   mailing_list=the_list, address=key, source=source)
    return bool(deleted)


# --- the mailto: link ----------------------------------------------------------------

def unsubscribe_by_mail(*, to: Iterable[str], subject: str) -> Unsubscription | None:
    """Act on an email that a ``mailto:`` unsubscribe link made: sent to
    ``UNSUBSCRIBE["MAILTO"]`` with ``unsubscribe <token>`` in its subject.

    Mail to other addresses is not ours (None). A token that is missing, altered or
    expired, or names a list that no longer exists, changes nothing and is logged (None).
    """
    mailto = conf.get().unsubscribe.mailto
    if mailto is None or canonical(mailto) not in {canonical(a) for a in to if a}:
        return None
    match = _SUBJECT_TOKEN.search(subject or "")
    if match is None:
        logger.warning("An email to the unsubscribe address has no token in its subject; "
                       "nothing changed.")
        return None
    try:
        wanted = read_token(match.group(1))
        row, _ = unsubscribe(wanted.mailing_list, wanted.address, source=UnsubscribeSource.MAILTO)
    except (InvalidToken, UnknownMailingList) as exc:
        logger.warning("An unsubscribe email changed nothing: %s", exc)
        return None
    return row


def on_inbound(sender: Any, event: Any, esp_name: str = "", **kwargs: Any) -> None:
    """Receiver of anymail's ``inbound`` signal: an unsubscribe email (see
    :func:`unsubscribe_by_mail`) arriving through your ESP's inbound webhook."""
    message = getattr(event, "message", None)
    if message is None:
        return
    to = [address.addr_spec for address in (message.to or [])]
    if getattr(message, "envelope_recipient", None):
        to.append(message.envelope_recipient)
    unsubscribe_by_mail(to=to, subject=message.subject or "")
