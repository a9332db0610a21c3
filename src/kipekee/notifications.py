"""Notifications: named events, each sending one or more emails about a business object.

Declare once, at start-up: in a module your ``AppConfig.ready()`` imports (Kipekee does
not import modules by name for you: ``notifications.py`` is too common a name to guess)::

    from kipekee.notifications import Message, admins, register

    register(
        "quote_request.received",
        Message("emails/quote_admin", name="admin", to=admins),
        Message("emails/quote_received", name="customer", to=lambda q: q.email,
                language=lambda q: q.language),
    )
    register(
        "booking.reminder",
        Message("emails/show_reminder", to=lambda b: b.email,
                at=lambda b: b.show.starts_at - timedelta(hours=24),
                when=lambda b: b.status == "confirmed"),
        model=Booking,  # kept in sync when a Booking is saved or deleted
    )

then ``kipekee.notify("quote_request.received", quote)`` in the view, inside its
transaction. Every row is linked to the object and the event, and written with an
idempotency key per (event, message, object): notifying twice (a double submit) sends
once; ``status("quote_request.received", quote)`` → ``{"admin": "sent", "customer": "sent"}``.

A message with ``at`` is a reminder: written with ``send_at=at(obj)``. With ``model=``,
saving the object moves the reminder when ``at(obj)`` changed (re-rendered if its text
changed), cancels it when ``when(obj)`` turns false, and deleting the object cancels it.
A save that leaves ``at(obj)`` as it was keeps the reminder as it is: waiting, due and
about to go out, deferred after a failed try, sent, or cancelled by a person. A reminder
whose time has already passed is not written, nor moved to (no "24 h before" reminder
for a booking made two hours before the show).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import KW_ONLY, dataclass, field
from datetime import datetime
from typing import Any

from django.conf import settings
from django.contrib.contenttypes.models import ContentType
from django.db import models, transaction
from django.db.models.signals import post_delete, post_save
from django.utils import timezone

from . import conf, outbox
from .compose import Attachment, Email
from .dispatch import Receipt, submit_many
from .exceptions import ConfigurationError, InvalidMessage
from .message import to_fields
from .models import WAITING_STATUSES, OutboxEmail

Recipients = str | Sequence[str] | Callable[[Any], str | Sequence[str] | None] | None
Value = Callable[[Any], Any]


def admins(obj: Any = None) -> list[str]:
    """The addresses in ``settings.ADMINS`` (Django 6's plain strings or the old pairs)."""
    return [entry if isinstance(entry, str) else entry[1] for entry in settings.ADMINS]


@dataclass(frozen=True)
class Message:
    """One email of a notification. Callables take the object the event is about.

    ``context(obj)`` adds to the template context, which always has ``object`` and the
    object under its model name (``quote``, ``booking``), plus ``notify(**extra)``.
    ``when(obj)`` false: not sent (reminders: cancelled). ``at(obj)``: a reminder, sent
    then. ``attachments(obj)``: ``(filename, content, mimetype)`` tuples, e.g. a QR ticket
    from :func:`kipekee.qr.qr_attachment`.
    """

    template: str
    _: KW_ONLY
    to: Recipients
    name: str = ""
    context: Callable[[Any], Mapping[str, Any]] | None = None
    language: str | Value | None = None
    cc: Recipients = None
    bcc: Recipients = None
    reply_to: Recipients = None
    from_email: str | None = None
    mode: str | None = None
    # The outbox lane; None: "transactional" from notify() ("bulk" for list mail), the
    # call's from notify_many().
    lane: str | None = None
    provider: str = ""
    when: Callable[[Any], bool] | None = None
    at: Callable[[Any], datetime | None] | None = None
    attachments: Callable[[Any], Iterable[Attachment]] | None = None
    # A MailingList key: the one-click unsubscribe headers, and not sent to who left it.
    mailing_list: str = ""

    def __post_init__(self) -> None:
        if not self.name:
            object.__setattr__(self, "name", self.template)

    @property
    def is_reminder(self) -> bool:
        return self.at is not None


@dataclass(frozen=True)
class Notification:
    event: str
    messages: tuple[Message, ...]
    model: type[models.Model] | None = None
    # Makes an example of the object for previews (kipekee.previews); it may create rows:
    # previews roll them back.
    sample: Callable[[], Any] | None = None
    _receivers: list[Callable[..., None]] = field(default_factory=list, repr=False,
                                                  compare=False)

    def message(self, name: str) -> Message:
        for message in self.messages:
            if message.name == name:
                return message
        raise KeyError(name)


_registry: dict[str, Notification] = {}


def register(event: str, *messages: Message, model: type[models.Model] | None = None,
             sample: Callable[[], Any] | None = None, replace: bool = False) -> Notification:
    """Declare ``event``. With ``model``, its reminders follow that model's saves and
    deletes. ``sample()`` makes an example object the event is about, for previews in
    the admin and ``manage.py kipekee_render`` (:mod:`kipekee.previews`). Registering an
    event twice is an error unless ``replace=True``."""
    if not event or not messages:
        raise ConfigurationError("A notification needs an event name and at least one Message.")
    names = [m.name for m in messages]
    if len(set(names)) != len(names):
        raise ConfigurationError(
            f"Notification {event!r}: two messages share a name ({names}); name them "
            "(Message(..., name='admin')).")
    if event in _registry:
        if not replace:
            raise ConfigurationError(f"Notification {event!r} is already registered.")
        unregister(event)
    notification = Notification(event, tuple(messages), model, sample)
    if model is not None and any(m.is_reminder for m in messages):
        _connect(notification, model)
    _registry[event] = notification
    return notification


def unregister(event: str) -> None:
    notification = _registry.pop(event, None)
    if notification is not None and notification.model is not None:
        uid = f"kipekee.notifications:{event}"
        post_save.disconnect(sender=notification.model, dispatch_uid=f"{uid}:save")
        post_delete.disconnect(sender=notification.model, dispatch_uid=f"{uid}:delete")


def get(event: str) -> Notification:
    try:
        return _registry[event]
    except KeyError:
        known = ", ".join(sorted(_registry)) or "none"
        raise InvalidMessage(f"Unknown notification {event!r} (registered: {known}).") from None


def _connect(notification: Notification, model: type[models.Model]) -> None:
    event = notification.event

    def saved(sender: Any, instance: models.Model, raw: bool = False, **kwargs: Any) -> None:
        if not raw:  # loaddata: the database is being restored, not the booking changed
            sync(event, instance)

    def deleted(sender: Any, instance: models.Model, **kwargs: Any) -> None:
        cancel(event, instance)

    uid = f"kipekee.notifications:{event}"
    post_save.connect(saved, sender=model, weak=False, dispatch_uid=f"{uid}:save")
    post_delete.connect(deleted, sender=model, weak=False, dispatch_uid=f"{uid}:delete")


def notify(event: str, obj: models.Model, *, key: str = "", **extra: Any) -> list[Receipt]:
    """Send (or schedule) the emails of ``event`` about ``obj``; their receipts.

    Idempotent per (event, message, object): a second call returns the first rows'
    receipts (``created=False``). Pass ``key`` for an event that really happens more than
    once for one object (``notify("order.shipped", order, key=str(parcel.pk))``).
    ``extra`` goes into the templates' context.
    """
    notification = get(event)
    receipts: list[Receipt] = []
    # All or nothing: a bad second message (no recipient, a missing variable) leaves no
    # admin copy behind without its customer confirmation.
    with transaction.atomic(using=outbox.db_for_write()):
        for message in notification.messages:
            if message.is_reminder:
                receipts += _sync_reminders(notification, [message], obj, extra)
                continue
            if message.when is not None and not message.when(obj):
                continue
            email = _email(notification, message, obj, extra)
            email.idempotency_key = _key(event, message, obj, key)
            receipts.append(email.send())
    return receipts


def notify_many(event: str, objects: Iterable[models.Model], *, key: str = "",
                lane: str = conf.BULK, mode: str = "queue", **extra: Any) -> list[list[Receipt]]:
    """:func:`notify` for many objects at once (an announcement to every booking of a
    cancelled tour): per object, the receipts ``notify(event, obj)`` would return.

    Written as :func:`kipekee.send_many` writes, in one transaction, all or nothing: the
    messages wait in ``lane`` (``"bulk"``) and are sent by ``mode`` (``"queue"``) unless
    their :class:`Message` names its own. Idempotent per (event, message, object) as
    ``notify`` is. Reminders of objects that have no reminder row yet are written in bulk
    too; the others are brought in line one object at a time, as a save would.
    """
    notification = get(event)
    objects = list(objects)
    db = outbox.db_for_write()
    with transaction.atomic(using=db):
        items: list[outbox.NewEmail] = []
        owners: list[int] = []  # per item: the index of its object
        per_object: list[list[Receipt]] = [[] for _ in objects]
        written = _with_reminders(notification, objects)
        for index, obj in enumerate(objects):
            for message in notification.messages:
                if message.is_reminder:
                    if obj.pk in written:  # an earlier row: moved or kept, one by one
                        receipt = _sync_reminder(notification, message, obj, extra)
                        if receipt is not None:
                            per_object[index].append(receipt)
                        continue
                    due = _reminder_at(notification, message, obj)
                    if due is None or due <= timezone.now():
                        continue  # turned off, or too late to remind
                    email = _email(notification, message, obj, extra, send_at=due)
                    email.idempotency_key = _key(event, message, obj, "#0")
                elif message.when is not None and not message.when(obj):
                    continue
                else:
                    email = _email(notification, message, obj, extra)
                    email.idempotency_key = _key(event, message, obj, key)
                try:
                    items.append(email.new_email(mode=mode, lane=message.lane or lane))
                except InvalidMessage as exc:
                    raise type(exc)(f"Object {index} ({obj!r}): {exc}") from exc
                owners.append(index)
        for owner, receipt in zip(owners, submit_many(items, using=db), strict=True):
            per_object[owner].append(receipt)
    return per_object


def _with_reminders(notification: Notification, objects: Sequence[models.Model]) -> set[Any]:
    """The pks of ``objects`` that have an outbox row of one of the notification's
    reminders (one query per model)."""
    if not any(m.is_reminder for m in notification.messages) or not objects:
        return set()
    by_model: dict[type[models.Model], list[str]] = {}
    for obj in objects:
        by_model.setdefault(type(obj), []).append(str(obj.pk))
    names = {m.name for m in notification.messages if m.is_reminder}
    found: set[Any] = set()
    for model, pks in by_model.items():
        content_type = ContentType.objects.get_for_model(model)
        for object_id, metadata in OutboxEmail.objects.filter(
                content_type=content_type, object_id__in=pks, event=notification.event,
        ).values_list("object_id", "metadata"):
            if (metadata or {}).get("notification") in names:
                found.add(object_id)
    return {obj.pk for obj in objects if str(obj.pk) in found}


def _reminder_at(notification: Notification, message: Message,
                 obj: models.Model) -> datetime | None:
    """``at(obj)`` as the outbox stores times, or None when ``when(obj)`` turns the
    reminder off."""
    assert message.at is not None
    due = message.at(obj) if message.when is None or message.when(obj) else None
    return None if due is None else outbox.stored_time(
        due, f"Reminder {notification.event!r}: at()")


def sync(event: str, obj: models.Model, **extra: Any) -> list[Receipt]:
    """Bring the reminders of ``event`` for ``obj`` in line with it (what a save does)."""
    notification = get(event)
    with transaction.atomic(using=outbox.db_for_write()):
        return _sync_reminders(notification, notification.messages, obj, extra)


def _sync_reminders(notification: Notification, messages: Sequence[Message], obj: models.Model,
                    extra: Mapping[str, Any]) -> list[Receipt]:
    """The receipts of the reminders among ``messages`` that were written or rewritten."""
    return [receipt for message in messages if message.is_reminder
            if (receipt := _sync_reminder(notification, message, obj, extra)) is not None]


def cancel(event: str, obj: models.Model) -> int:
    """Cancel the emails of ``event`` about ``obj`` that have not gone out; how many."""
    waiting = rows(event, obj).filter(status__in=WAITING_STATUSES)
    return sum(outbox.cancel(pk) for pk in waiting.values_list("pk", flat=True))


def rows(event: str, obj: models.Model) -> models.QuerySet[OutboxEmail]:
    """The outbox rows of ``event`` about ``obj``."""
    return OutboxEmail.objects.for_object(obj).filter(event=event)


def status(event: str, obj: models.Model) -> dict[str, str | None]:
    """``{message name: status of its latest row}``; ``None`` for one never written.

    "Were the admin and customer emails sent for quote 42?" →
    ``status("quote_request.received", quote) == {"admin": "sent", "customer": "sent"}``.
    """
    notification = get(event)
    result: dict[str, str | None] = {m.name: None for m in notification.messages}
    for metadata, row_status in rows(event, obj).order_by("id").values_list("metadata", "status"):
        name = (metadata or {}).get("notification")
        if name in result:
            result[name] = row_status
    return result


def registered() -> list[Notification]:
    """Every registered notification, by event name."""
    return [_registry[event] for event in sorted(_registry)]


def email(event: str, name: str, obj: models.Model, **extra: Any) -> Email:
    """The :class:`Email` that message ``name`` of ``event`` makes about ``obj``, not
    sent (previews; a test's look at what would go out)."""
    notification = get(event)
    return _email(notification, notification.message(name), obj, extra)


def _resolve(value: Any, obj: Any) -> Any:
    return value(obj) if callable(value) else value


def _email(notification: Notification, message: Message, obj: models.Model,
           extra: Mapping[str, Any], send_at: datetime | None = None) -> Email:
    context: dict[str, Any] = {"object": obj, obj._meta.model_name or "object": obj}
    if message.context is not None:
        context.update(message.context(obj))
    context.update(extra)
    to = _resolve(message.to, obj)
    if not to:
        raise InvalidMessage(
            f"Notification {notification.event!r}, message {message.name!r}: no recipient "
            f"for {obj!r}.")
    return Email(
        message.template, to=to, context=context,
        cc=_resolve(message.cc, obj), bcc=_resolve(message.bcc, obj),
        reply_to=_resolve(message.reply_to, obj), from_email=message.from_email,
        mailing_list=message.mailing_list,
        attachments=list(message.attachments(obj)) if message.attachments else (),
        mode=message.mode, lane=message.lane, provider=message.provider, send_at=send_at,
        language=_resolve(message.language, obj) or None,
        event=notification.event, target=obj,
        metadata={"notification": message.name,
                  **({REMINDER_AT: send_at.isoformat()} if send_at is not None else {})},
    )


def _key(event: str, message: Message, obj: models.Model, suffix: str) -> str:
    meta = obj._meta
    key = f"kipekee:{event}:{message.name}:{meta.app_label}.{meta.model_name}:{obj.pk}"
    if suffix:
        key = f"{key}:{suffix}"
    if len(key) > 255:  # the column's length; long names and keys still stay unique
        key = "kipekee:" + hashlib.sha256(key.encode()).hexdigest()
    return key


#: The metadata key of a reminder's time (``at(obj)`` when it was written or moved).
REMINDER_AT = "reminder_at"

_COMPARED = ("subject", "body", "alternatives", "to", "cc", "bcc", "reply_to", "from_email")


def _reminder_time(row: OutboxEmail) -> datetime:
    """The time ``row`` was written (or last moved) for: ``at(obj)`` then. Its ``due_at``
    moves on when a try is deferred, so the time is kept in its metadata (rows written
    before it was kept there: their ``due_at``)."""
    at = row.metadata.get(REMINDER_AT)
    return datetime.fromisoformat(at) if at else row.due_at


def _sync_reminder(notification: Notification, message: Message, obj: models.Model,
                   extra: Mapping[str, Any]) -> Receipt | None:
    existing = [r for r in rows(notification.event, obj).order_by("id")
                if r.metadata.get("notification") == message.name]
    waiting = [r for r in existing if r.status in WAITING_STATUSES]
    due = _reminder_at(notification, message, obj)
    latest = existing[-1] if existing else None
    if due is not None and latest is not None and _reminder_time(latest) == due:
        # Already written for this time: waiting (due or not), deferred after a failed
        # try, sent, or cancelled by a person. A save that did not move it keeps it so.
        return Receipt(latest, created=False)
    if due is None or due <= timezone.now():
        # Turned off, or moved to a time already past: too late to remind.
        for row in waiting:
            outbox.cancel(row.pk)
        return None
    email = _email(notification, message, obj, extra, send_at=due)
    fields, _ = to_fields(email.build())
    for row in waiting:
        same_text = all(getattr(row, name) == fields[name] for name in _COMPARED)
        # Same text at another time: move it, keeping its row and Message-ID.
        if same_text and outbox.reschedule(
                row.pk, due, metadata={**row.metadata, REMINDER_AT: due.isoformat()}):
            for other in waiting:
                if other.pk != row.pk:
                    outbox.cancel(other.pk)
            return Receipt(OutboxEmail.objects.get(pk=row.pk), created=False)
    # The text changed with the time ("your show at 20:00"): a fresh message.
    for row in waiting:
        outbox.cancel(row.pk)
    # One key per generation: concurrent saves of one booking write one row, not two.
    email.idempotency_key = _key(notification.event, message, obj, f"#{len(existing)}")
    return email.send()
