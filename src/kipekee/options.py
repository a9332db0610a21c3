"""``SendOptions``: how one message is sent, beside the message itself.

One value carried whole from the public API (``kipekee.send``, ``Email.send``,
``send_many``, the drop-in backend) through :mod:`kipekee.dispatch` to
:mod:`kipekee.outbox`, which writes it on the row, as Django's ``EmailMessage`` is one
object for the message. A new option is a field here and a column the outbox fills.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from . import conf

if TYPE_CHECKING:
    from django.db.models import Model


@dataclass(frozen=True, kw_only=True, slots=True)
class SendOptions:
    """How a message is sent.

    ``mode``: ``"now"``, ``"hybrid"`` or ``"queue"`` (None: ``KIPEKEE["MODE"]``).
    ``lane``: the outbox lane (``KIPEKEE["LANES"]``). ``idempotency_key``: a second send
    with the same key writes nothing and returns the first row. ``send_at``: not before
    then. ``provider``: this provider alias only (else failover over all). ``template``:
    the template name, kept on the row. ``metadata``: JSON kept on the row. ``event``
    and ``target`` (a saved model instance): the notification and the business object
    the row is linked to. ``mailing_list``: the MailingList key of list mail (who left
    that list is not sent to).
    """

    mode: str | None = None
    lane: str = conf.TRANSACTIONAL
    idempotency_key: str | None = None
    send_at: datetime | None = None
    provider: str = ""
    template: str = ""
    metadata: Mapping[str, Any] | None = None
    event: str = ""
    target: Model | None = None
    mailing_list: str = ""
