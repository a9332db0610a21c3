"""The outbox: enqueue, claim and every status change. The only code that writes status.

Each transition is one conditional UPDATE (``WHERE status = <expected>``), so two engines
can never both own a row. Results are fenced by the attempt number: a stale engine whose
lease expired cannot overwrite the result of a newer attempt.

Status machine::

    queued ──claim──▶ sending ──▶ sent
      │                  │ ▲
      │                  ▼ │claim
      │               deferred ──▶ (claim) …
      │                  │
      ▼                  ▼
    cancelled          failed

    suppressed: every recipient is on the suppression list, found when the row is
    written (``enqueue``) or when it is about to be sent (``sending → suppressed``).
"""

from __future__ import annotations

import json
import logging
import sqlite3
import uuid
from collections import Counter
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import nullcontext
from copy import copy as shallow_copy
from copy import deepcopy
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.contrib.contenttypes.models import ContentType
from django.db import IntegrityError, connections, models, router, transaction
from django.db.models import F, Q, prefetch_related_objects
from django.db.models.sql import UpdateQuery
from django.utils import timezone

from . import conf, lanes, lists, signals, suppression
from .addresses import canonical
from .exceptions import InvalidMessage
from .message import StoredAttachment, make_message_id, to_fields, validate
from .models import (
    FINAL_STATUSES,
    WAITING_STATUSES,
    Attachment,
    Attempt,
    ErrorKind,
    OutboxEmail,
    ProviderMessage,
    Status,
    Suppression,
    db_column,
)
from .options import SendOptions
from .redact import redact
from .wire import check_size

if TYPE_CHECKING:
    from django.core.mail import EmailMessage

    from .delivery import Outcome

logger = logging.getLogger("kipekee.outbox")


#: The channel on which new due rows are announced (``NOTIFY``) to the engines that
#: LISTEN on PostgreSQL.
NOTIFY_CHANNEL = "kipekee_outbox"


def db_for_write() -> str:
    return router.db_for_write(OutboxEmail)


def stored_time(value: datetime, name: str) -> datetime:
    """``value`` as the outbox stores and compares times, as Django's ``DateTimeField``
    does: with ``USE_TZ``, aware (a naive one is refused: which zone it meant would be
    a guess); without, naive wall-clock time in ``TIME_ZONE`` (an aware one is
    converted to it). Raises ``InvalidMessage`` naming ``name``."""
    if settings.USE_TZ:
        if timezone.is_naive(value):
            raise InvalidMessage(f"{name} must be an aware datetime (USE_TZ is True).")
        return value
    return timezone.make_naive(value) if timezone.is_aware(value) else value


@dataclass(frozen=True, kw_only=True, slots=True)
class NewEmail:
    """One message for :func:`enqueue_many`, with how to send it and the in-request hold
    (:func:`enqueue`'s arguments)."""

    message: EmailMessage
    options: SendOptions
    in_request_hold: timedelta | None = None


def enqueue(
    message: EmailMessage,
    options: SendOptions,
    *,
    in_request_hold: timedelta | None = None,
    claimed: timedelta | None = None,
    using: str | None = None,
    announce: bool = False,
) -> tuple[OutboxEmail, bool]:
    """Write ``message`` to the outbox in the caller's transaction.

    ``in_request_hold``: keep engines off a row due now for this long (``due_at`` in the future)
    because the caller delivers it itself right after commit; only ``claim(pk, in_request=True)``
    takes it earlier. Should the caller die first, an engine picks it up when the hold ends.

    ``claimed``: the caller sends the row itself right after commit (a request's
    ``now``/``hybrid`` send): it is written already claimed, as :func:`claim` would
    leave it (``sending``, its first attempt counted, a lease of ``claimed`` and a claim
    token), so sending it costs no claim statement, and comes back with its attachments
    in hand (no read either). The INSERT is durable before any provider is called;
    should the caller die before recording a result, an engine takes the row when its
    lease ends, as any claimed row. A caller whose transaction outlived half the lease
    renews it first (:func:`keep_claim`). Not for a row suppressed as it is written (it
    stays ``suppressed``), nor with a ``send_at`` still ahead.

    ``announce``: tell the engines LISTENing on PostgreSQL (``NOTIFY``, delivered when the
    row is committed), in the INSERT itself.

    ``options.mailing_list``: the MailingList key of list mail; an unknown key is refused
    (``UnknownMailingList``), and who left that list is taken off as the suppressed are.

    Returns ``(row, created)``. With an ``options.idempotency_key`` already in the
    outbox, returns the first row and ``created=False`` and writes nothing. Raises
    ``InvalidMessage`` / ``UnknownProvider`` before writing anything.

    Inside the caller's transaction the row (and its attachments) is written under a
    savepoint: a refused INSERT raises here and the caller's own work goes on. Outside
    one, a message without attachments is one INSERT in autocommit (after the
    suppression lookup): it cannot be left half-done, and a view's ``send()`` pays no
    BEGIN and COMMIT; with attachments, the row and its attachments are one
    transaction. A key already there is an ``INSERT … ON CONFLICT DO NOTHING`` that
    writes nothing, then its row is read.
    """
    db = using or db_for_write()
    row, attachments = _new_row(NewEmail(message=message, options=options,
                                         in_request_hold=in_request_hold), db, timezone.now())
    if options.mailing_list:
        lists.require(options.mailing_list, using=db)
    alone = not attachments and not connections[db].in_atomic_block
    with nullcontext() if alone else transaction.atomic(using=db):
        # Most mail goes to nobody on the suppression list: the row is written only if
        # none of its recipients is listed, in the INSERT itself (one statement, not a
        # SELECT first). When nothing was written (a recipient is listed, or the
        # idempotency key is taken), the check is made on its own and the row written
        # with what it says.
        as_built = dict(row.__dict__)
        if claimed is not None:
            _claimed_as_written(row, claimed)
        inserted = 0 if options.mailing_list else _insert(
            OutboxEmail, [row], db, if_new=bool(options.idempotency_key), notify=announce,
            unless_listed=[canonical(address) for address in row.recipients])
        if not inserted:
            row.__dict__.update(as_built)  # not claimed: a suppressed row stays unclaimed
            _apply_suppressions(row, suppression.check(row.recipients, using=db,
                                                       mailing_list=options.mailing_list))
            if claimed is not None and row.status == Status.QUEUED:
                _claimed_as_written(row, claimed)
            inserted = _insert(OutboxEmail, [row], db, if_new=bool(options.idempotency_key),
                               notify=announce)
        if not inserted:  # the key is taken: by an earlier enqueue, or one committing now
            return OutboxEmail.objects.using(db).get(
                idempotency_key=options.idempotency_key), False
        stored = _attachment_rows(row, attachments)
        _insert(Attachment, stored, db)
    if row.claimed_by:
        _hand_attachments(row, stored, db)
        # The caller sends this very object, without reading the row back: the signal's
        # receivers (run at once outside a transaction) get a copy of their own.
        _announce([detached(row)], db)
    else:
        _announce([row], db)
    return row, True


def _claimed_as_written(row: OutboxEmail, lease: timedelta) -> None:
    """Set on a new, unsaved row what :func:`claim` would: ``sending``, its first
    attempt, a ``lease`` from now and a claim token of its own (which fences its result)."""
    row.status = Status.SENDING
    row.attempts = row.claims = 1
    row.lease_until = row.created_at + lease
    row.claimed_by = f"request:{uuid.uuid4().hex[:12]}"
    row.due_at = row.created_at  # no hold: the lease keeps engines off it


def _hand_attachments(row: OutboxEmail, stored: list[Attachment], db: str) -> None:
    """``row.attachments.all()`` answered from what was just written (in ``id``
    order, as the model orders them), as a claim's RETURNING hands them over: the
    delivery that follows reads nothing back."""
    # A real queryset of its attachments, not none(): a copy of it (``.using(db)``,
    # ``.filter()``, as a follow-up row's copy makes) must read them, not find none.
    cached = (Attachment.objects.using(db).filter(email=row) if stored
              else Attachment.objects.using(db).none())
    cached._result_cache, cached._prefetch_done = list(stored), True  # type: ignore[attr-defined]
    row._prefetched_objects_cache = {_ATTACHMENTS: cached}  # type: ignore[attr-defined]


def detached(row: OutboxEmail) -> OutboxEmail:
    """A copy of ``row`` (with its attachments in hand) that what other code does to it
    in memory never reaches, nor what it does to the copy reaches ``row``."""
    twin = shallow_copy(row)
    for field in OutboxEmail._meta.concrete_fields:
        value = getattr(row, field.attname)
        if isinstance(value, (list, dict)):  # JSON columns: recipients, headers, metadata
            setattr(twin, field.attname, deepcopy(value))
    cache = getattr(row, "_prefetched_objects_cache", None)
    if cache is not None:
        twin._prefetched_objects_cache = dict(cache)  # type: ignore[attr-defined]
    return twin


def keep_claim(row: OutboxEmail, *, within: timedelta, lease: timedelta) -> bool:
    """Make sure ``row``, claimed by the caller (``claim`` or ``enqueue(claimed=...)``),
    is still the caller's for at least ``within``: when less of its lease is left, the
    lease is renewed to ``lease`` from now in one UPDATE fenced by the claim's token.
    False when the row is no longer the caller's (its lease ran out and an engine took
    it, or a person changed it): the caller must not send it."""
    now = timezone.now()
    if row.lease_until is not None and row.lease_until - now >= within:
        return True  # the usual case: claimed a moment ago, nothing to ask
    db = row._state.db or db_for_write()
    lease_until = now + lease
    kept = (OutboxEmail.objects.using(db)
            .filter(pk=row.pk, status=Status.SENDING, claimed_by=row.claimed_by)
            .update(lease_until=lease_until))
    if kept:
        row.lease_until = lease_until
    return bool(kept)


def enqueue_many(items: Sequence[NewEmail], *,
                 using: str | None = None) -> list[tuple[OutboxEmail, bool]]:
    """Write many messages to the outbox at once, in the caller's transaction: what
    :func:`enqueue` does for each, in a number of queries that does not grow with them.

    Every message is checked before anything is written (an ``InvalidMessage`` names
    the first bad one, by its position). Then: one SELECT for the idempotency keys
    already in the outbox, one for the suppression list, the rows in as few INSERTs as
    the database takes, the attachments likewise. Returns ``(row, created)`` per item,
    in order: an existing key gives its first row (``created=False``), and a key given
    twice in ``items`` is written once (the later items get that row, ``created=False``).
    """
    db = using or db_for_write()
    now = timezone.now()
    built: list[tuple[OutboxEmail, list[StoredAttachment]]] = []
    by_list: dict[str, set[str]] = {}
    for index, item in enumerate(items):
        try:
            built.append(_new_row(item, db, now))
            if item.options.mailing_list and item.options.mailing_list not in by_list:
                lists.require(item.options.mailing_list, using=db)  # once per list named
        except InvalidMessage as exc:
            raise type(exc)(f"Message {index}: {exc}") from exc
        if item.options.mailing_list:
            by_list.setdefault(item.options.mailing_list, set()).update(built[-1][0].recipients)
    if not built:
        return []
    found = suppression.check({a for row, _ in built for a in row.recipients}, using=db)
    left = lists.unsubscribed_many(by_list, using=db)
    for row, _ in built:
        refused = {**left.get(row.mailing_list, {}), **found}
        _apply_suppressions(row, {a: refused[a] for a in row.recipients if a in refused})
    for tries_left in (2, 1, 0):
        try:
            # The caller's transaction (or one of its own) with a savepoint: a refused
            # INSERT leaves nothing behind and does not spoil the caller's work.
            with transaction.atomic(using=db):
                results = _insert_new(built, db)
            break
        except IntegrityError:
            # An enqueue elsewhere committed one of the keys between the lookup and the
            # INSERT (PostgreSQL made the INSERT wait for it): look again.
            for row, _ in built:
                row.pk, row._state.adding = None, True
            if tries_left == 0 or not any(row.idempotency_key for row, _ in built):
                raise
    _announce([row for row, created in results if created], db)
    return results


def _insert_new(built: Sequence[tuple[OutboxEmail, list[StoredAttachment]]],
                db: str) -> list[tuple[OutboxEmail, bool]]:
    keys = list({row.idempotency_key for row, _ in built if row.idempotency_key})
    first: dict[str | None, OutboxEmail] = {}
    for chunk in _chunks(keys, _max_params(db)):
        # (Not in_bulk: on Django 5.2 it splits the keys at SQLite's old 999 too.)
        first.update((row.idempotency_key, row) for row in
                     OutboxEmail.objects.using(db).filter(idempotency_key__in=chunk))
    results: list[tuple[OutboxEmail, bool]] = []
    new: list[tuple[OutboxEmail, list[StoredAttachment]]] = []
    for row, attachments in built:
        key = row.idempotency_key
        if key:
            earlier = first.get(key)
            if earlier is not None:
                results.append((earlier, False))
                continue
            first[key] = row
        new.append((row, attachments))
        results.append((row, True))
    _insert(OutboxEmail, [row for row, _ in new], db)
    _insert(Attachment, [a for row, attachments in new
                         for a in _attachment_rows(row, attachments)], db)
    return results


def _new_row(item: NewEmail, db: str, now: datetime) -> tuple[OutboxEmail, list[StoredAttachment]]:
    """The unsaved row and attachments for ``item``; raises ``InvalidMessage`` /
    ``UnknownProvider`` for what is wrong with it."""
    message, options = item.message, item.options
    validate(message)
    config = conf.get()
    check_size(message, config.max_message_size)
    if options.provider:
        config.provider(options.provider)  # raises UnknownProvider at the call site
    if options.lane != conf.TRANSACTIONAL:
        config.lane(options.lane)  # raises InvalidMessage at the call site
    send_at = options.send_at
    if send_at is not None:
        send_at = stored_time(send_at, "send_at")
    target = options.target
    if target is not None and target.pk is None:
        raise InvalidMessage(f"The email's target {target!r} is not saved (it has no pk).")
    fields, attachments = to_fields(message)
    headers: dict[str, str] = fields.pop("headers")
    message_id = _pop_header(headers, "Message-ID") or make_message_id(
        fields["from_email"], config.message_id_domain
    )
    content_type = None
    if target is not None:
        content_type = ContentType.objects.db_manager(db).get_for_model(target)
        fields["content_type_id"] = content_type.pk
        fields["object_id"] = str(target.pk)
    hold = item.in_request_hold
    fields.update(
        headers=headers,
        message_id=message_id,
        mode=options.mode or config.mode,
        lane=options.lane,
        mailing_list=options.mailing_list,
        idempotency_key=options.idempotency_key or None,
        template=options.template,
        metadata=dict(options.metadata or {}),
        event=options.event,
        provider=options.provider,
        created_at=now,
        # A hold applies to mail due now; a future send_at is the engines' anyway.
        due_at=now + hold if hold and (send_at is None or send_at <= now) else send_at or now,
    )
    row = _unsaved_row(fields)
    if content_type is not None:
        row.content_type = content_type  # cached on the row, as the keyword did
    return row, attachments


_row_defaults: list[tuple[str, Any, bool]] = []


def _unsaved_row(values: dict[str, Any]) -> OutboxEmail:
    """``OutboxEmail(**values)`` (by attname; the other fields their defaults), built as
    Django builds a row it reads, from positional values: the keyword path of
    ``Model.__init__`` looks up and pops each of the 35 fields (13 % of a queued send's
    profiled CPU on SQLite)."""
    if not _row_defaults:
        for field in OutboxEmail._meta.concrete_fields:
            default = field.default if field.has_default() else field.get_default()
            _row_defaults.append((field.attname, default, callable(default)))
    build: Any = OutboxEmail  # positional values: the plugin types only the keyword path
    row: OutboxEmail = build(*[values[name] if name in values else default() if call
                               else default for name, default, call in _row_defaults])
    return row


def _attachment_rows(row: OutboxEmail, attachments: Sequence[StoredAttachment]) -> list[Attachment]:
    return [Attachment(email=row, filename=a.filename, mimetype=a.mimetype, content=a.content,
                       content_id=a.content_id) for a in attachments]


def _announce(rows: Sequence[OutboxEmail], db: str) -> None:
    """The signals of newly written rows, once they are committed: ``suppressed`` or
    ``queued``."""
    for row in rows:
        if row.status == Status.SUPPRESSED:
            signals.send_on_commit(signals.suppressed, using=db, sender=OutboxEmail, email=row,
                                   outcome=None)
        else:
            signals.send_on_commit(signals.queued, using=db, sender=OutboxEmail, email=row)


def _max_params(db: str) -> int:
    """How many parameters one statement may carry on ``db``."""
    connection = connections[db]
    if connection.vendor == "sqlite":
        connection.ensure_connection()
        # The library's own limit (32,766 since SQLite 3.32), as Django 6 reads it;
        # Django 5.2 assumes the 999 of older builds.
        return int(connection.connection.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER))
    # PostgreSQL's protocol counts parameters in 16 bits (server-side binding).
    return int(connection.features.max_query_params or 65_535)


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), max(1, size)):
        yield items[start:start + size]


def _insert(model: type[models.Model], objs: Sequence[models.Model], db: str, *,
            if_new: bool = False, notify: bool = False, ignore_conflicts: bool = False,
            unless_listed: Sequence[str] | None = None) -> int:
    """INSERT ``objs`` and set their pks, in as few statements as the database takes.

    What ``bulk_create`` does, for the path of every ``kipekee.send``: its INSERT
    compiler spends some 0.13 ms a row preparing the 32 values of an outbox row (1,000
    rows of 5 KB on SQLite: 171 µs a row through ``bulk_create``, 40 µs here, of which
    SQLite's own work is 35), more than the database takes to write it; and on Django
    5.2 it splits statements at SQLite's old limit of 999 parameters (30 rows). Values
    are adapted as the ORM adapts them (``Field.get_db_prep_save``), except the plain
    ``str``/``int``/``None`` most columns hold, which need nothing, and repeated values
    (the same ``now``, empty JSON), adapted once. Like ``bulk_create``: no ``pre_save``
    or ``post_save`` (Kipekee's own signals say what happened to a row).

    ``if_new`` (one object): ``ON CONFLICT DO NOTHING``: a row that would break a unique
    constraint is not written (nor is the transaction spoiled). ``notify``: ``NOTIFY``
    LISTENing engines as well, on PostgreSQL. ``ignore_conflicts`` (any number of
    objects): ``ON CONFLICT DO NOTHING`` as ``bulk_create(ignore_conflicts=True)``, which
    sets no pks either. Returns how many rows were written (with ``ignore_conflicts``,
    how many were offered). ``unless_listed`` (one object): write it only if none of
    these canonical addresses is on the suppression list (0 if one is).
    """
    if not objs:
        return 0
    connection = connections[db]
    fields, adapt, head, placeholder, tail = _insert_sql(model, connection)
    if unless_listed is not None:
        assert len(objs) == 1, "unless_listed writes one row"
    if if_new:
        assert len(objs) == 1, "if_new writes one row: which ones were skipped is unknown"
        tail = " ON CONFLICT DO NOTHING" + tail
    if ignore_conflicts:
        tail = " ON CONFLICT DO NOTHING"
    if notify and connection.vendor == "postgresql":
        tail += f", pg_notify('{NOTIFY_CHANNEL}', '')"
    # On PostgreSQL, many rows of plain columns go in as one JSON document
    # (``jsonb_populate_recordset``): a statement with one parameter whatever the rows.
    # VALUES lists made psycopg split and quote a statement of 34,000 placeholders (1,000
    # outbox rows: 260 ms of CPU against 90 for the whole send_many this way), and arrays
    # per column (Django's UNNEST) are escaped element by element in Python; one JSON
    # string is encoded and escaped in C. (jsonb, not json: the server reads the same
    # document into rows in 15 ms instead of 70.)
    # One row too: the document costs one json.dumps in C, where psycopg quoted each of
    # an outbox row's 34 values in Python (and dumped each JSON one again): a fifth of
    # a queued send's profiled CPU.
    if connection.vendor == "postgresql" and _json_insert_sql(model, connection) is not None:
        return _insert_json(model, objs, connection, tail, unless_listed)
    if unless_listed is not None:
        # INSERT … SELECT <values> WHERE NOT EXISTS (…) (SQLite; the WHERE also tells it
        # where the SELECT ends before an ON CONFLICT).
        placeholder = "SELECT " + placeholder[1:-1] + _unlisted_sql(
            connection, len(unless_listed))
        head = head.replace(" VALUES ", " ")
    written = 0
    memo: dict[datetime, Any] = {}
    ops = connection.ops
    size = _max_params(db) // len(fields)
    with connection.cursor() as cursor:
        for batch in _chunks(objs, size):
            params: list[Any] = []
            append = params.append
            for obj in batch:
                values = obj.__dict__
                for field, how in zip(fields, adapt, strict=True):
                    name = field.attname
                    value = values[name] if name in values else getattr(obj, name)
                    if value is None or (how is _PLAIN and type(value) in (str, int)):
                        append(value)
                    elif how is _REPEATED:
                        # Every DateTimeField adapts a time alike (created_at = due_at).
                        if value not in memo:
                            memo[value] = field.get_db_prep_save(value, connection)
                        append(memo[value])
                    elif how is _EMPTY_JSON and type(value) in (list, dict):
                        # JSONField.get_db_prep_save of a list or dict, without its
                        # three calls down to this one.
                        append(ops.adapt_json_value(value, field.encoder) if value else
                               _empty_json(field, type(value), connection))
                    else:
                        append(field.get_db_prep_save(value, connection))
            if unless_listed is not None:
                params += unless_listed
            cursor.execute(head + ", ".join([placeholder] * len(batch)) + tail, params)
            if ignore_conflicts:
                written += len(batch)
                continue
            returned = cursor.fetchall()
            if not returned and (if_new or unless_listed is not None):
                return 0
            # In the order of VALUES, as bulk_create reads it on SQLite and PostgreSQL.
            _saved(batch, returned, db)
            written += len(returned)
    return written


_insert_sqls: dict[tuple[type[models.Model], str], tuple[list[Any], list[str], str, str, str]] = {}
_unlisted_sqls: dict[tuple[str, int], str] = {}


def _unlisted_sql(connection: Any, count: int) -> str:
    """`` WHERE NOT EXISTS`` a suppression of one of ``count`` canonical addresses."""
    key = (connection.vendor, count)
    if key not in _unlisted_sqls:
        quote = connection.ops.quote_name
        column = quote(db_column(Suppression._meta.get_field("address")))
        table = quote(Suppression._meta.db_table)
        _unlisted_sqls[key] = (
            f" WHERE NOT EXISTS (SELECT 1 FROM {table} WHERE {column} IN "
            f"({', '.join(['%s'] * count)}))" if count else " WHERE 1 = 1")
    return _unlisted_sqls[key]


def _insert_sql(model: type[models.Model],
                connection: Any) -> tuple[list[Any], list[str], str, str, str]:
    """The columns of ``model``'s INSERT, how each value is adapted, and its SQL (the
    same for every connection to one kind of database)."""
    key = (model, connection.vendor)
    if key not in _insert_sqls:
        _insert_sqls[key] = _make_insert_sql(model, connection.ops.quote_name)
    return _insert_sqls[key]


def _make_insert_sql(model: type[models.Model], quote: Callable[[str], str],
                     ) -> tuple[list[Any], list[str], str, str, str]:
    meta = model._meta
    fields = [f for f in meta.concrete_fields if not f.primary_key]
    head = (f"INSERT INTO {quote(meta.db_table)} "
            f"({', '.join(quote(db_column(f)) for f in fields)}) "
            "VALUES ")
    placeholder = "(" + ", ".join(["%s"] * len(fields)) + ")"
    return (fields, [_adapter(f) for f in fields], head, placeholder,
            f" RETURNING {quote(db_column(meta.pk))}")


_json_insert_sqls: dict[type[models.Model], str | None] = {}

#: The fields whose values JSON carries as PostgreSQL reads them back into their column.
_JSON_SAFE = (models.CharField, models.TextField, models.IntegerField, models.ForeignKey,
              models.DateTimeField, models.JSONField)


def _json_insert_sql(model: type[models.Model], connection: Any) -> str | None:
    """``INSERT … SELECT … FROM jsonb_populate_recordset(NULL::table, %s)`` for ``model``
    on PostgreSQL; ``None`` if one of its columns is not carried faithfully by JSON (a
    ``BinaryField``: attachments go through VALUES)."""
    if model not in _json_insert_sqls:
        fields, _, head, _, _ = _insert_sql(model, connection)
        quote = connection.ops.quote_name
        if all(isinstance(field, _JSON_SAFE) for field in fields):
            columns = ", ".join(quote(db_column(field)) for field in fields)
            _json_insert_sqls[model] = (
                head.replace(" VALUES ", f" SELECT {columns} FROM ")
                + f"jsonb_populate_recordset(NULL::{quote(model._meta.db_table)}, %s::jsonb)")
        else:
            _json_insert_sqls[model] = None
    return _json_insert_sqls[model]


def _insert_json(model: type[models.Model], objs: Sequence[models.Model], connection: Any,
                 tail: str, unless_listed: Sequence[str] | None = None) -> int:
    """:func:`_insert`'s rows as one JSON document (PostgreSQL): each row an object keyed
    by column; a JSON column's value nested as it is (JSONField's own encoding: no
    encoder is set on Kipekee's models), a time in ISO 8601 with its offset."""
    fields = _insert_sql(model, connection)[0]
    columns = [(db_column(field), field.attname, isinstance(field, models.DateTimeField))
               for field in fields]
    stamps: dict[datetime, str] = {}
    records = []
    for obj in objs:
        record: dict[str, Any] = {}
        for column, attname, is_time in columns:
            value = getattr(obj, attname)
            if is_time and value is not None:
                if value not in stamps:
                    stamps[value] = value.isoformat()
                value = stamps[value]
            record[column] = value
        records.append(record)
    sql = _json_insert_sql(model, connection)
    assert sql is not None
    params = [json.dumps(records)]
    if unless_listed is not None:
        sql += _unlisted_sql(connection, len(unless_listed))
        params += unless_listed
    with connection.cursor() as cursor:
        cursor.execute(sql + tail, params)
        if tail.startswith(" ON CONFLICT") and "RETURNING" not in tail:
            return len(objs)
        returned = cursor.fetchall()
    if len(returned) != len(objs):  # one row, not written (ON CONFLICT, unless_listed)
        assert not returned and len(objs) == 1
        return 0
    # In the order of the document's rows, as bulk_create's UNNEST is read back.
    _saved(objs, returned, connection.alias)
    return len(returned)


def _saved(objs: Sequence[models.Model], returned: Sequence[Sequence[Any]], db: str) -> None:
    """``objs`` were written to ``db``: their pks from ``RETURNING``, in their order."""
    for obj, values in zip(objs, returned, strict=True):
        obj.pk = values[0]
        obj._state.adding, obj._state.db = False, db


_empty_jsons: dict[tuple[Any, type, str], Any] = {}


def _empty_json(field: Any, kind: type, connection: Any) -> Any:
    """``[]`` or ``{}`` as ``field`` stores it on ``connection`` (adapted once: most rows
    have several; the adapted value holds an empty container nothing else refers to)."""
    key = (id(field), kind, connection.vendor)  # id: a Field's own hash is slow
    if key not in _empty_jsons:
        _empty_jsons[key] = field.get_db_prep_save(kind(), connection)
    return _empty_jsons[key]


#: How _insert adapts a column's values: plain ``str``/``int`` as they are; values that
#: repeat from row to row (times; empty JSON) once per distinct value; the rest each.
_PLAIN, _REPEATED, _EMPTY_JSON, _EACH = "plain", "repeated", "empty json", "each"


def _adapter(field: Any) -> str:
    if isinstance(field, models.DateTimeField):
        return _REPEATED
    if isinstance(field, models.JSONField):
        return _EMPTY_JSON
    if isinstance(field, (models.CharField, models.TextField, models.IntegerField,
                          models.ForeignKey)):
        return _PLAIN
    return _EACH


def _apply_suppressions(row: OutboxEmail, refused: dict[str, str]) -> None:
    """Take suppressed recipients (``refused``: address → why) off a new row; with none
    left, it is ``suppressed``."""
    if not refused:
        return
    row.to = [a for a in row.to if a not in refused]
    row.cc = [a for a in row.cc if a not in refused]
    row.bcc = [a for a in row.bcc if a not in refused]
    row.refused = refused
    if not row.recipients:
        row.status = Status.SUPPRESSED
        row.last_error = "not sent, every recipient is on the suppression list: " + "; ".join(
            f"{a} ({why})" for a, why in refused.items())


def _pop_header(headers: dict[str, str], name: str) -> str:
    for key in list(headers):
        if key.lower() == name.lower():
            return headers.pop(key)
    return ""


def claim_batch(limit: int, *, engine: str = "", ids: Sequence[int] | None = None,
                in_request: bool = False, using: str | None = None) -> list[OutboxEmail]:
    """Claim up to ``limit`` due rows for a sender (or a worker's senders), with a lease:
    the rows whose lease expired (their engine died), then lane by lane as
    :func:`kipekee.lanes.planner` plans it (highest priority first, each lane's reserved
    share and rate honoured), oldest due first within a lane.

    Each step is one ``UPDATE … WHERE id IN (SELECT … ORDER BY due_at, id LIMIT k)``
    walking one partial index (``kipekee_sending_lease``, ``kipekee_waiting_lane_due``).
    On PostgreSQL the inner SELECT is ``FOR UPDATE SKIP LOCKED``, so concurrent engines
    take disjoint rows without waiting for each other; on SQLite the statement holds
    the write lock from its start, so the rows it picks are its own. Either way no
    claim loses a race to another: a claim that finds nothing found nothing due. Each
    row gets a fresh claim token and the rows carrying it are ours. Sending happens
    after this returns, outside any transaction. The rows come back highest lane
    first, then oldest due first.

    ``ids``: only these rows (a task naming its rows), in any lane; those already taken
    are passed over. ``in_request`` (with ``ids``): the request that enqueued them with a hold
    takes them before their ``due_at``, as :func:`claim` does.
    """
    db = using or db_for_write()
    now = timezone.now()
    token = f"{engine}:{uuid.uuid4().hex[:12]}"[-100:]
    changes: dict[str, Any] = {"status": Status.SENDING, "lease_until": now + conf.get().lease,
                               "attempts": F("attempts") + 1, "claims": F("claims") + 1,
                               "claimed_by": token}
    rows = OutboxEmail.objects.using(db)
    lock = connections[db].features.has_select_for_update_skip_locked
    planner = lanes.planner()

    def take(candidates: Any, count: int) -> list[OutboxEmail]:
        candidates = candidates.order_by("due_at", "pk")
        if lock:
            candidates = candidates.select_for_update(skip_locked=True)
        return _update_returning(rows.filter(pk__in=candidates.values("pk")[:count]), changes)

    claimed: list[OutboxEmail] = []
    with transaction.atomic(using=db):
        if ids is not None:
            if in_request:
                changes["due_at"] = now
                claimed = take(rows.filter(pk__in=list(ids), status__in=WAITING_STATUSES), limit)
            else:
                claimed = take(rows.filter(pk__in=list(ids)).due(now), limit)
        else:
            lease_until = changes["lease_until"]
            claimed = _claim_step(db, "lease", [now], limit, lease_until, token)
            for ask in planner.plan(limit):
                count = min(ask.count, limit - len(claimed))
                if count <= 0:
                    break
                allowed = planner.allow(ask.lane, count)
                got = (_claim_step(db, "lane", [ask.lane, now], allowed, lease_until, token)
                       if allowed else [])
                planner.took(ask.lane, allowed, len(got))
                claimed += got
    if claimed:
        claimed.sort(key=lambda row: (planner.order(row.lane), row.due_at, row.pk))
    return claimed


def adopt_stray_lanes(*, using: str | None = None) -> dict[str, int]:
    """Move the waiting rows of lanes that are not configured (any more) to the default
    lane, ``transactional``: per lane, how many.

    A claim takes rows lane by lane from ``KIPEKEE["LANES"]``: a lane removed by a deploy,
    or written by a process still on the old settings during a rolling one, would be
    claimed by nobody, its mail waiting forever. Engines call this as they start and
    then every minute (:func:`kipekee.engines.beat`)."""
    db = using or db_for_write()
    known = [lane.name for lane in conf.get().lanes]
    strays = (OutboxEmail.objects.using(db).filter(status__in=WAITING_STATUSES)
              .exclude(lane__in=known))
    counts = dict(Counter(strays.values_list("lane", flat=True)))
    if counts:
        strays.update(lane=conf.TRANSACTIONAL)
    return counts


def stray_lanes(*, using: str | None = None) -> dict[str, int]:
    """Waiting rows per lane that is not configured (:func:`adopt_stray_lanes`)."""
    known = [lane.name for lane in conf.get().lanes]
    return dict(Counter(OutboxEmail.objects.using(using or db_for_write())
                        .filter(status__in=WAITING_STATUSES).exclude(lane__in=known)
                        .values_list("lane", flat=True)))


def _prefetch_attachments(rows: Sequence[OutboxEmail], db: str,
                          with_attachments: set[int]) -> None:
    """``rows``' attachments in hand, so that delivery reads none per message.

    Most rows have none: the claim's ``RETURNING`` says which rows do (``with_attachments``,
    their pks), and only those go through ``prefetch_related_objects``; the others get an
    empty result in the same prefetch cache. (Prefetching every row built a queryset per
    row: 0.8 ms of CPU a claim of ten, half of it with 100,000 rows queued; a SELECT for
    the rows that have some was a statement more per claim.)"""
    if with_attachments:
        prefetch_related_objects([row for row in rows if row.pk in with_attachments],
                                 "attachments")
    # Evaluated already, as prefetch_related leaves the querysets it fills: an empty
    # queryset not yet evaluated compiles its SQL (to find it has none) each time it is
    # read, 1.5 ms of profiled CPU a message for the delivery's own prefetch and from_row.
    none = Attachment.objects.using(db).none()
    none._result_cache, none._prefetch_done = [], True  # type: ignore[attr-defined]
    for row in rows:
        if row.pk not in with_attachments:
            # Where prefetch_related puts its results (and row.attachments.all() finds
            # them): an empty queryset, which reads nothing.
            row._prefetched_objects_cache = {_ATTACHMENTS: none}  # type: ignore[attr-defined]


#: The cache name of OutboxEmail.attachments (its related_name).
_ATTACHMENTS = "attachments"


#: One step of an engine's claim: which rows it takes, oldest first, through which index.
#: Written out, not built by the ORM: compiling one of these UPDATEs took 0.8 ms of CPU,
#: three times per claim, more than the database takes to run them.
_CLAIM_STEPS = {
    # Rows whose engine stopped before recording their attempt (kipekee_sending_lease).
    "lease": ("{status} = 'sending' AND {lease_until} < %s", "{lease_until}"),
    # Due waiting rows of one lane (kipekee_waiting_lane_due). The statuses are written
    # into the SQL: a partial index serves a query only if it states the index's
    # condition, and SQLite does not look into bound parameters for that (with them
    # bound it walked kipekee_status_created and sorted the backlog in a temporary
    # B-tree); nor does a PostgreSQL generic plan.
    "lane": ("{status} IN ('queued', 'deferred') AND {lane} = %s AND {due_at} <= %s",
             "{due_at}"),
}
_claim_sqls: dict[tuple[str, str, bool], str] = {}


def _claim_step(db: str, step: str, params: list[Any], count: int, lease_until: datetime,
                token: str) -> list[OutboxEmail]:
    """``UPDATE … WHERE id IN (SELECT … ORDER BY … LIMIT count) RETURNING …``: the rows of
    ``step`` (see ``_CLAIM_STEPS``) that this claim takes, as they are now."""
    connection = connections[db]
    lock = connection.features.has_select_for_update_skip_locked
    key = (connection.vendor, step, lock)
    if key not in _claim_sqls:
        quote = connection.ops.quote_name
        names = {f.name: quote(db_column(f)) for f in OutboxEmail._meta.concrete_fields}
        where, order = (part.format(**names) for part in _CLAIM_STEPS[step])
        table, pk = quote(OutboxEmail._meta.db_table), names["id"]
        _claim_sqls[key] = (
            f"UPDATE {table} SET {names['status']} = 'sending', {names['lease_until']} = %s, "
            f"{names['attempts']} = {names['attempts']} + 1, "
            f"{names['claims']} = {names['claims']} + 1, {names['claimed_by']} = %s "
            f"WHERE {pk} IN (SELECT {pk} FROM {table} WHERE {where} "
            f"ORDER BY {order}, {pk} LIMIT %s{' FOR UPDATE SKIP LOCKED' if lock else ''})")
    adapt = connection.ops.adapt_datetimefield_value
    return _returning(db, _claim_sqls[key], [
        adapt(lease_until), token,
        *(adapt(p) if isinstance(p, datetime) else p for p in params), count])


def _update_returning(rows: Any, changes: dict[str, Any]) -> list[OutboxEmail]:
    """``rows.update(**changes)``, and the rows it changed, as they are now (compiled as
    ``QuerySet.update`` compiles it)."""
    query = rows.query.chain(UpdateQuery)
    query.add_update_values(changes)
    sql, params = query.get_compiler(rows.db).as_sql()
    return _returning(rows.db, sql, list(params)) if sql else []


def _returning(db: str, sql: str, params: list[Any]) -> list[OutboxEmail]:
    """Run the UPDATE ``sql`` with a ``RETURNING`` of every column (SQLite 3.35 and
    PostgreSQL) and read the rows it changed, converted as the ORM converts what it
    reads, with their attachments in hand. Reading the claimed rows back by their claim
    token instead cost a second statement that no index serves (SQLite scanned the
    backlog for it: 120 ms a claim with 100,000 rows queued)."""
    connection = connections[db]
    fields, columns, converters = _returned_columns(connection)
    with connection.cursor() as cursor:
        cursor.execute(f"{sql} RETURNING {columns}", params)
        returned = cursor.fetchall()
    names = [f.attname for f in fields]
    result = []
    with_attachments: set[int] = set()
    for values in returned:
        if values[-1]:  # the EXISTS of _returned_columns: the row has attachments
            with_attachments.add(values[0])
        converted = list(values[:-1])
        for index, col, field_converters, is_json in converters:
            value = converted[index]
            if is_json and type(value) is str and value in _EMPTY_JSON_TEXT:
                converted[index] = _EMPTY_JSON_TEXT[value]()  # most JSON columns: not decoded
                continue
            for converter in field_converters:
                value = converter(value, col, connection)
            converted[index] = value
        result.append(OutboxEmail.from_db(db, names, converted))
    if result:
        _prefetch_attachments(result, db, with_attachments)
    return result


_EMPTY_JSON_TEXT: dict[Any, Callable[[], Any]] = {"[]": list, "{}": dict}
_Converters = list[tuple[int, Any, list[Any], bool]]
_returned: dict[str, tuple[list[Any], str, _Converters]] = {}


def _returned_columns(connection: Any) -> tuple[list[Any], str, _Converters]:
    """The outbox row's fields, its columns for ``RETURNING``, and the converters of the
    values that need one (as ``SQLCompiler.get_converters`` finds them), each with
    whether its column holds JSON."""
    if connection.vendor not in _returned:
        meta = OutboxEmail._meta
        quote = connection.ops.quote_name
        fields = list(meta.concrete_fields)
        table = quote(meta.db_table)
        assert fields[0].primary_key
        attachment = Attachment._meta
        # Last, whether the row has attachments (a subquery in RETURNING: SQLite and
        # PostgreSQL take one), so that the claim needs no statement to find out.
        columns = (", ".join(f"{table}.{quote(f.column)}" for f in fields)
                   + f", EXISTS(SELECT 1 FROM {quote(attachment.db_table)} WHERE "
                   f"{quote(db_column(attachment.get_field('email')))} = "
                   f"{table}.{quote(db_column(meta.pk))})")
        converters: _Converters = []
        for index, field in enumerate(fields):
            col = field.get_col(meta.db_table)
            found = [*connection.ops.get_db_converters(col), *col.get_db_converters(connection)]
            if found:
                converters.append((index, col, found, isinstance(field, models.JSONField)))
        _returned[connection.vendor] = (fields, columns, converters)
    return _returned[connection.vendor]


def release(row: OutboxEmail) -> bool:
    """Give back a claimed row that was not attempted (an engine stopping): ``sending →
    queued``, due now, and the claim not counted as an attempt."""
    db = row._state.db or db_for_write()
    return bool(
        OutboxEmail.objects.using(db)
        .filter(pk=row.pk, status=Status.SENDING, attempts=row.attempts)
        .update(status=Status.QUEUED, lease_until=None, claimed_by="", due_at=timezone.now(),
                attempts=F("attempts") - 1)
    )


def renew_lease(token: str, pks: Sequence[int], *, using: str | None = None) -> int:
    """Extend by a whole lease the rows of claim ``token`` still being sent (a delivery
    that takes longer than the lease); how many still were. Fenced by the claim's token:
    a row taken over by another engine, or finished, is left alone."""
    return (OutboxEmail.objects.using(using or db_for_write())
            .filter(pk__in=list(pks), status=Status.SENDING, claimed_by=token)
            .update(lease_until=timezone.now() + conf.get().lease))


def due_ids(limit: int, *, queued_grace: timedelta = timedelta(0),
            using: str | None = None) -> list[int]:
    """Ids of rows an engine may claim now (without claiming them), oldest due first.

    ``queued_grace``: pass over ``queued`` rows that were due when they were written and
    fell due less than this long ago (a task was sent for them on commit and is probably
    still in a queue). Rows written for later (``send_at``, a request's hold) and rows
    queued again (released, retried by a person) have no task coming: no grace.
    """
    now = timezone.now()
    rows = OutboxEmail.objects.using(using or db_for_write()).filter(
        Q(status=Status.DEFERRED, due_at__lte=now)
        | (Q(status=Status.QUEUED, due_at__lte=now)
           & (Q(due_at__lte=now - queued_grace) | Q(due_at__gt=F("created_at"))))
        | Q(status=Status.SENDING, lease_until__lt=now)
    )
    return list(rows.order_by("due_at", "pk").values_list("pk", flat=True)[:limit])


def next_due_at(*, using: str | None = None) -> datetime | None:
    """When the next waiting row falls due (or a lease expires), for engines to sleep
    until: one statement, the first entry of each lane's partial index and of the
    expired-leases index (the earliest waiting row over all lanes is not the head of
    any one index: asked that way, SQLite scanned and sorted every waiting row)."""
    db = using or db_for_write()
    connection = connections[db]
    quote = connection.ops.quote_name
    table = quote(OutboxEmail._meta.db_table)
    names = [lane.name for lane in conf.get().lanes]
    heads = [f"SELECT * FROM (SELECT {quote('due_at')} AS t FROM {table} "
             f"WHERE {quote('status')} IN ('queued', 'deferred') AND {quote('lane')} = %s "
             f"ORDER BY {quote('due_at')} LIMIT 1) AS l{index}" for index in range(len(names))]
    heads.append(f"SELECT * FROM (SELECT {quote('lease_until')} AS t FROM {table} "
                 f"WHERE {quote('status')} = 'sending' ORDER BY {quote('lease_until')} "
                 f"LIMIT 1) AS leases")
    with connection.cursor() as cursor:
        cursor.execute(" UNION ALL ".join(heads), names)
        found = [value for (value,) in cursor.fetchall() if value is not None]
    field = OutboxEmail._meta.get_field("due_at")
    col = field.get_col(OutboxEmail._meta.db_table)
    converters = [*connection.ops.get_db_converters(col), *col.get_db_converters(connection)]
    times = []
    for value in found:
        for converter in converters:
            value = converter(value, col, connection)
        times.append(value)
    return min(times) if times else None


def claim(pk: int, *, in_request: bool = False, using: str | None = None) -> OutboxEmail | None:
    """Take one row for sending if it is due (or its lease expired); ``None`` if not.

    ``in_request``: the request that enqueued the row with an ``in_request_hold`` takes
    it before its ``due_at`` (a waiting row only: never one another sender holds); the
    hold ends there (``due_at`` now). Sets ``sending``, a lease, and counts the attempt.

    One ``UPDATE … RETURNING`` written out once per database kind (as a batch claim's
    steps are): the ORM's UPDATE and a second SELECT for the row cost a request that
    sends in-line some 1.7 ms of CPU, for a row it wrote a moment before. The row comes
    back with its attachments in hand.
    """
    db = using or db_for_write()
    connection = connections[db]
    now = timezone.now()
    key = (connection.vendor, in_request)
    if key not in _claim_one_sqls:
        quote = connection.ops.quote_name
        names = {f.name: quote(db_column(f)) for f in OutboxEmail._meta.concrete_fields}
        where = (_CLAIM_IN_REQUEST if in_request else _CLAIM_DUE).format(**names)
        hold_ends = f", {names['due_at']} = %s" if in_request else ""
        _claim_one_sqls[key] = (
            f"UPDATE {quote(OutboxEmail._meta.db_table)} SET {names['status']} = 'sending', "
            f"{names['lease_until']} = %s, {names['attempts']} = {names['attempts']} + 1, "
            f"{names['claims']} = {names['claims']} + 1, {names['claimed_by']} = %s{hold_ends} "
            f"WHERE {names['id']} = %s AND {where}")
    adapt = connection.ops.adapt_datetimefield_value
    stamp = adapt(now)
    params: list[Any] = [adapt(now + conf.get().lease), f"request:{uuid.uuid4().hex[:12]}"]
    params += [stamp, pk] if in_request else [pk, stamp, stamp]
    claimed = _returning(db, _claim_one_sqls[key], params)
    return claimed[0] if claimed else None


#: :func:`claim`'s conditions (the statuses written into the SQL, as in ``_CLAIM_STEPS``):
#: a waiting row (``in_request``), or one due now or whose lease expired
#: (``OutboxEmail.objects.due``).
_CLAIM_IN_REQUEST = "{status} IN ('queued', 'deferred')"
_CLAIM_DUE = ("(({status} IN ('queued', 'deferred') AND {due_at} <= %s) "
              "OR ({status} = 'sending' AND {lease_until} < %s))")
_claim_one_sqls: dict[tuple[str, bool], str] = {}


def mark_sent(row: OutboxEmail, outcome: Outcome, *, refused_for_now: Collection[str] = (),
              retry_at: datetime | None = None, given_up: str = "") -> bool:
    """Record a successful attempt: ``sending → sent``, with the provider's message ids.

    ``refused_for_now`` (envelope addresses, as in ``outcome.refused``) and ``retry_at``:
    recipients the provider refused for now (a 4xx reply to their ``RCPT TO``) get the
    message in a follow-up row, ``deferred`` until ``retry_at``, written in the same
    transaction: same content and Message-ID, ``metadata["recipients_of"]`` naming this
    row, its attempts counted on from this one's and its lifetime from this one's
    creation. This row stays
    ``sent`` and keeps their replies in ``refused``.

    With no attempt left for them (``retry_at`` None, ``given_up`` saying why) their
    follow-up row is written ``failed`` instead, with their replies and that reason, and
    announced by ``signals.failed``: a recipient is never dropped with only a "try later"
    reply on a sent row.
    """
    follow_up: list[OutboxEmail] = []

    def write_follow_up(db: str) -> None:
        if refused_for_now and (retry_at is not None or given_up):
            follow_up.extend(_follow_up(row, outcome, refused_for_now, retry_at, db, given_up))

    done = _write_result(row, outcome, status=Status.SENT, changes=_sent_changes(outcome),
                         signal=signals.sent, then=write_follow_up)
    for copy in follow_up:
        signal = signals.queued if copy.status == Status.DEFERRED else signals.failed
        extra = {} if signal is signals.queued else {"outcome": outcome}
        signals.send_on_commit(signal, using=copy._state.db or db_for_write(),
                               sender=OutboxEmail, email=copy, **extra)
    return done


def _sent_changes(outcome: Outcome) -> dict[str, Any]:
    """What a sent row's fields become (besides its status and claim)."""
    return {"sent_at": outcome.finished_at, "sent_by": outcome.provider,
            "error_kind": "", "last_error": "", "refused": outcome.refused}


def _envelope_key(address: str) -> str:
    """``address`` as an SMTP envelope names it: lower-cased addr-spec, IDNA domain."""
    return canonical(address)


def _follow_up(row: OutboxEmail, outcome: Outcome, refused_for_now: Collection[str],
               due_at: datetime | None, db: str, given_up: str = "") -> list[OutboxEmail]:
    # ``row`` is the claimed row as read (the state fields _copy skips are set below).
    wanted = {_envelope_key(a) for a in refused_for_now}

    def keep(addresses: list[str]) -> list[str]:
        return [a for a in addresses if _envelope_key(a) in wanted]

    to, cc, bcc = keep(row.to), keep(row.cc), keep(row.bcc)
    if not (to or cc or bcc):
        # The provider named addresses this row does not have: nothing to send again.
        logger.warning("Outbox email %s: refused-for-now recipients %s are not on the row; "
                       "no follow-up written.", row.pk, sorted(refused_for_now))
        return []
    replies = "; ".join(f"{a}: {outcome.refused.get(a, '')}" for a in sorted(refused_for_now))
    error = f"recipients refused for now by {outcome.provider}: {replies}"
    if due_at is None:  # no attempt left for them: failed, with why
        state: dict[str, Any] = {"status": Status.FAILED, "due_at": row.due_at,
                                 "last_error": redact(f"{error}; {given_up}")}
    else:
        state = {"status": Status.DEFERRED, "due_at": due_at, "last_error": redact(error)}
    copy = _copy(row, db, **state, mode="queue",
                 to=to, cc=cc, bcc=bcc, message_id=row.message_id,
                 created_at=row.created_at, attempts=row.attempts,
                 error_kind=ErrorKind.TRANSIENT,
                 metadata={**row.metadata, "recipients_of": row.pk})
    return [copy]


def _copy(original: OutboxEmail, db: str, **fields: Any) -> OutboxEmail:
    """A new row with ``original``'s message and attachments, and ``fields`` (which must
    set the state: a status, a Message-ID); saved in the caller's transaction."""
    copy = OutboxEmail(
        **{f.attname: getattr(original, f.attname) for f in OutboxEmail._meta.concrete_fields
           if f.name not in _STATE_FIELDS},
    )
    for name, value in fields.items():
        setattr(copy, name, value)
    copy.save(using=db, force_insert=True)
    Attachment.objects.using(db).bulk_create(
        Attachment(email=copy, filename=a.filename, mimetype=a.mimetype, content=a.content,
                   content_id=a.content_id)
        for a in original.attachments.using(db).all()
    )
    return copy


def suppress(row: OutboxEmail, outcome: Outcome) -> bool:
    """Every recipient was suppressed after the row was queued: ``sending → suppressed``."""
    return finish(suppressed(row, outcome))


def defer(row: OutboxEmail, outcome: Outcome, *, due_at: datetime) -> bool:
    """Record a transient failure: ``sending → deferred`` until ``due_at``."""
    return finish(deferred(row, outcome, due_at=due_at))


def postpone(row: OutboxEmail, outcome: Outcome, *, due_at: datetime) -> bool:
    """No provider was tried (every circuit was open): ``sending → deferred`` until
    ``due_at``, and the claim not counted as an attempt (nor written to the attempt log),
    as :func:`release` does for a row not tried at all."""
    return finish(postponed(row, outcome, due_at=due_at))


def fail(row: OutboxEmail, outcome: Outcome) -> bool:
    """Record a final failure: ``sending → failed``."""
    return finish(failed(row, outcome))


# What each result does to its row, for finish() and finish_many(): ----------------------

def sent(row: OutboxEmail, outcome: Outcome) -> Finish:
    """``sending → sent`` (without follow-up rows: see :func:`mark_sent`)."""
    return Finish(row, outcome, Status.SENT, _sent_changes(outcome), signals.sent)


def suppressed(row: OutboxEmail, outcome: Outcome) -> Finish:
    """``sending → suppressed``: every recipient was suppressed after it was queued."""
    return Finish(row, outcome, Status.SUPPRESSED, {
        "error_kind": "", "last_error": outcome.error, "refused": outcome.refused,
    }, signals.suppressed)


def deferred(row: OutboxEmail, outcome: Outcome, *, due_at: datetime) -> Finish:
    """``sending → deferred`` until ``due_at``: a transient failure."""
    return Finish(row, outcome, Status.DEFERRED, {
        "due_at": due_at, "error_kind": outcome.kind, "last_error": outcome.error,
        "refused": outcome.refused,
    }, signals.deferred)


def postponed(row: OutboxEmail, outcome: Outcome, *, due_at: datetime) -> Finish:
    """``sending → deferred`` until ``due_at``, no provider tried: not an attempt."""
    return Finish(row, outcome, Status.DEFERRED, {
        "due_at": due_at, "attempts": row.attempts - 1, "error_kind": outcome.kind,
        "last_error": outcome.error, "refused": outcome.refused,
    }, signals.deferred, attempted=False)


def failed(row: OutboxEmail, outcome: Outcome) -> Finish:
    """``sending → failed``: a permanent failure, or no attempts left."""
    return Finish(row, outcome, Status.FAILED, {
        "error_kind": outcome.kind or ErrorKind.PERMANENT, "last_error": outcome.error,
        "refused": outcome.refused,
    }, signals.failed)


def finish(result: Finish) -> bool:
    """Record one result on its row (see :func:`finish_many` for a batch)."""
    return _write_result(result.row, result.outcome, status=result.status,
                         changes=dict(result.changes), signal=result.signal,
                         attempted=result.attempted)


def _write_result(row: OutboxEmail, outcome: Outcome, *, status: str, changes: dict[str, Any],
                  signal: Any, then: Callable[[str], None] | None = None,
                  attempted: bool = True) -> bool:
    db = row._state.db or db_for_write()
    if changes.get("last_error"):  # redacted again: a custom engine may build an Outcome
        changes["last_error"] = redact(changes["last_error"])
    with transaction.atomic(using=db):
        if row.claimed_by:
            # Fenced by the claim's token, which names this attempt of the row as the
            # attempt number does; the UPDATE written out (the ORM's compile of it was
            # a third of recording a request's send).
            updated = _update_finished(db, row.claimed_by, [Finish(
                row, outcome, status, changes, signal, attempted)])
        else:  # a row in hand without a claim token (built by hand): its attempt number
            updated = (
                OutboxEmail.objects.using(db)
                .filter(pk=row.pk, status=Status.SENDING, attempts=row.attempts)
                .update(status=status, lease_until=None, claimed_by="", **changes)
            )
        if not updated:
            logger.warning(
                "Result of attempt %s for outbox email %s not recorded: the row moved on "
                "(lease expired and another engine took it, or a person changed it).",
                row.attempts, row.pk,
            )
            return False
        if attempted:
            _write_attempts(db, [(row, outcome)])
        if then is not None:  # more writes that stand or fall with this result
            then(db)
    _apply_to_row(row, outcome, status=status, changes=changes, signal=signal)
    return True


def _apply_to_row(row: OutboxEmail, outcome: Outcome, *, status: str, changes: dict[str, Any],
                  signal: Any) -> None:
    """After the write: the row in hand as the database now has it, then the signal
    (once the write is committed: an engine records a batch in one transaction)."""
    row.status, row.lease_until, row.claimed_by = status, None, ""
    for name, value in changes.items():
        setattr(row, name, value)
    signals.send_on_commit(signal, using=row._state.db or db_for_write(), sender=OutboxEmail,
                           email=row, outcome=outcome)


def _write_attempts(db: str, results: Sequence[tuple[OutboxEmail, Outcome]]) -> None:
    """The attempt log and the provider's message ids of finished attempts."""
    _insert(Attempt, [
        Attempt(email=row, number=row.attempts, provider=outcome.provider,
                started_at=outcome.started_at, finished_at=outcome.finished_at,
                outcome="sent" if outcome.ok else (
                    "suppressed" if outcome.suppressed else outcome.kind),
                # Last fence before the database: classify() already redacted, but a
                # custom engine may build an Outcome by hand.
                code=outcome.code, error=redact(outcome.error), refused=outcome.refused)
        for row, outcome in results
    ], db)
    ids = [ProviderMessage(email=row, provider=outcome.provider, message_id=mid,
                           recipient=recipient)
           for row, outcome in results for recipient, mid in outcome.provider_message_ids.items()]
    # A sandbox gives one id for all recipients; a resend may repeat one.
    _insert(ProviderMessage, ids, db, ignore_conflicts=True)


@dataclass(frozen=True, slots=True)
class Finish:
    """What a finished attempt does to its claimed row: the status it moves to, the
    fields that change with it, the signal that announces it, and whether it counts as
    an attempt (goes into the attempt log)."""

    row: OutboxEmail
    outcome: Outcome
    status: str
    changes: dict[str, Any]
    signal: Any
    attempted: bool = True


class _Moved(Exception):
    """Inside :func:`finish_many`: a row of the batch is no longer this attempt's."""


def mark_sent_many(results: Sequence[tuple[OutboxEmail, Outcome]]) -> list[bool]:
    """Record several successful attempts at once: :func:`finish_many` of each one's
    :func:`mark_sent` changes. For plain successes only: outcomes with ``refused``
    recipients that may need a follow-up row go through :func:`mark_sent`."""
    return finish_many([sent(row, outcome) for row, outcome in results])


def finish_many(results: Sequence[Finish]) -> list[bool]:
    """Record several finished attempts at once: what :func:`_write_result` does for each, in
    one UPDATE per claim and one INSERT of their attempts, instead of two statements per
    row. Returns, per row, whether its result was recorded.

    Engines finish a claimed batch with it, whatever became of each row (sent, deferred,
    failed, suppressed). The UPDATE is fenced by the claim's token (which names that
    attempt of each row, as the attempt number does) and gives each row its own values
    (a ``CASE`` over the ids for a column whose value differs between rows). Should any
    row of a claim have moved on (its lease expired and another engine took it), nothing
    of that claim's bulk write stays and each of its rows is recorded on its own, so only
    the moved row's result is refused.
    """
    done: dict[int, bool] = {}
    claims: dict[str, list[Finish]] = {}
    for result in results:
        claims.setdefault(result.row.claimed_by, []).append(result)
    for token, group in claims.items():
        if len(group) < 2 or not token:
            for result in group:
                done[id(result)] = finish(result)
            continue
        db = group[0].row._state.db or db_for_write()
        try:
            with transaction.atomic(using=db):
                if _update_finished(db, token, group) != len(group):
                    raise _Moved  # undo the bulk write; each row on its own below
                _write_attempts(db, [(r.row, r.outcome) for r in group if r.attempted])
        except _Moved:
            for result in group:
                done[id(result)] = finish(result)
            continue
        for result in group:
            _apply_to_row(result.row, result.outcome, status=result.status,
                          changes=dict(result.changes), signal=result.signal)
            done[id(result)] = True
    return [done[id(result)] for result in results]


def _update_finished(db: str, token: str, group: Sequence[Finish]) -> int:
    """The UPDATE of :func:`finish_many` for the rows of one claim; how many it changed.

    Written out, not built by the ORM: a ``Case(When(...))`` per column took some 4 ms a
    batch of 10 to compile, more than the UPDATE takes to run.
    """
    connection = connections[db]
    quote = connection.ops.quote_name
    meta = OutboxEmail._meta
    pk = quote(db_column(meta.pk))
    # Values as the ORM writes them; a CASE's branches cast on PostgreSQL, where a
    # literal's type is not taken from the column it is assigned to.
    cast = connection.vendor == "postgresql"
    columns: dict[str, list[Any]] = {"status": [f.status for f in group],
                                     "lease_until": [None] * len(group),
                                     "claimed_by": [""] * len(group)}
    for index, result in enumerate(group):
        for name, value in result.changes.items():
            if name == "last_error" and value:
                value = redact(value)
            columns.setdefault(name, [_UNCHANGED] * len(group))[index] = value
    sets: list[str] = []
    params: list[Any] = []
    for name, values in columns.items():
        field = meta.get_field(name)
        assert isinstance(field, models.Field)  # a concrete field of the row
        column = quote(db_column(field))
        adapted = [_adapt(field, value, connection) for value in values]
        placeholder = f"CAST(%s AS {field.db_type(connection)})" if cast else "%s"
        if all(value is not _UNCHANGED for value in values) and all(
                values[0] == value and type(values[0]) is type(value) for value in values):
            sets.append(f"{column} = {placeholder}")
            params.append(adapted[0])
            continue
        whens = []
        for result, value in zip(group, adapted, strict=True):
            if value is not _UNCHANGED:
                whens.append(f"WHEN %s THEN {placeholder}")
                params += [result.row.pk, value]
        sets.append(f"{column} = CASE {pk} {' '.join(whens)} ELSE {column} END")
    params += [result.row.pk for result in group] + [token]
    sql = (f"UPDATE {quote(meta.db_table)} SET {', '.join(sets)} "
           f"WHERE {pk} IN ({', '.join(['%s'] * len(group))}) "
           f"AND {quote('status')} = 'sending' AND {quote('claimed_by')} = %s")
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return int(cursor.rowcount)


#: In a column of :func:`_update_finished`: this row keeps its value.
_UNCHANGED = object()


_adapters: dict[Any, str] = {}


def _adapt(field: Any, value: Any, connection: Any) -> Any:
    """``value`` as ``field.get_db_prep_save`` adapts it, as :func:`_insert` does: plain
    ``str``/``int`` and ``None`` as they are, empty JSON adapted once (most of a
    recorded batch's values: 0.4 of 6 s of profiled CPU for 1,000 rows, each through
    the field's adapters)."""
    if value is _UNCHANGED or value is None:
        return value
    how = _adapters.get(field)
    if how is None:
        how = _adapters[field] = _adapter(field)
    if how is _PLAIN and type(value) in (str, int):
        return value
    if how is _EMPTY_JSON and not value and type(value) in (list, dict):
        return _empty_json(field, type(value), connection)
    return field.get_db_prep_save(value, connection)


def cancel(pk: int, *, using: str | None = None) -> bool:
    """A person cancels a message that has not gone out: ``queued|deferred → cancelled``."""
    db = using or db_for_write()
    updated = (
        OutboxEmail.objects.using(db)
        .filter(pk=pk, status__in=WAITING_STATUSES)
        .update(status=Status.CANCELLED, lease_until=None, claimed_by="")
    )
    if updated:
        signals.send_on_commit(signals.cancelled, using=db, sender=OutboxEmail,
                               email=OutboxEmail.objects.using(db).get(pk=pk))
    return bool(updated)


def reschedule(pk: int, due_at: datetime, *, metadata: dict[str, Any] | None = None,
               using: str | None = None) -> bool:
    """Move a message that has not gone out to ``due_at`` (a reminder whose booking moved).

    Only ``queued|deferred`` rows move, in one conditional UPDATE (which also replaces
    the row's ``metadata``, when given); a row being sent, sent or cancelled stays as it
    is and ``False`` is returned.
    """
    due_at = stored_time(due_at, "due_at")
    db = using or db_for_write()
    updated = (
        OutboxEmail.objects.using(db)
        .filter(pk=pk, status__in=WAITING_STATUSES)
        .update(due_at=due_at, **({"metadata": metadata} if metadata is not None else {}))
    )
    return bool(updated)


def record_delivery_event(email_id: int, *, recipient: str, event: str, at: datetime,
                          detail: str = "", refused: bool = False,
                          using: str | None = None) -> bool:
    """Note what a provider reported after sending (a webhook) on the row.

    ``delivery[recipient]`` keeps the latest event by its time; with ``refused`` (a hard
    bounce, a rejection) the recipient is also added to ``refused``, so the receipt shows
    it. The status stays as it is: the row was sent, and that is what happened.
    """
    db = using or db_for_write()
    with transaction.atomic(using=db):
        row = OutboxEmail.objects.using(db).select_for_update().filter(pk=email_id).first()
        if row is None:
            return False
        delivery = dict(row.delivery)
        previous = delivery.get(recipient)
        if previous is None or previous.get("at", "") <= at.isoformat():
            delivery[recipient] = {"event": event, "at": at.isoformat(), "detail": detail}
        changes: dict[str, Any] = {"delivery": delivery}
        if refused:
            changes["refused"] = {**row.refused, recipient: detail or event}
        OutboxEmail.objects.using(db).filter(pk=email_id).update(**changes)
    return True
def retry(pk: int, *, using: str | None = None) -> bool:
    """A person retries a message: ``failed|deferred → queued``, due now.

    The attempt counter is kept (the attempt log goes on numbering), so a row that ran
    out of attempts gets one more try before the retry policy fails it again; an engine
    (or the caller, see :func:`kipekee.dispatch.retry`) takes it from there.
    """
    db = using or db_for_write()
    updated = (
        OutboxEmail.objects.using(db)
        .filter(pk=pk, status__in=(Status.FAILED, Status.DEFERRED))
        .update(status=Status.QUEUED, due_at=timezone.now(), lease_until=None)
    )
    if updated:
        logger.info("Outbox email %s queued again by a person", pk,
                    extra={"kipekee": {"event": "retried", "id": pk}})
    return bool(updated)


#: Fields a resend does not copy: the copy is a new message with its own state.
_STATE_FIELDS = frozenset({
    "id", "status", "mode", "idempotency_key", "message_id", "created_at", "due_at",
    "lease_until", "claimed_by", "attempts", "claims", "sent_at", "sent_by", "error_kind",
    "last_error", "refused", "delivery",
})


def resend(pk: int, *, mode: str = "queue", using: str | None = None) -> OutboxEmail:
    """A person sends a finished message again: a new ``queued`` row, copied from ``pk``.

    The copy has its own Message-ID (it is a new message, not a duplicate receivers
    should drop) and ``metadata["resent_from"] = pk``; attachments are copied. Only rows
    in a final status can be resent (a waiting one would go out twice). Recipients on
    the suppression list are taken off the copy, as :func:`enqueue` does; a message left
    with no recipient is not resent. Raises ``OutboxEmail.DoesNotExist`` or
    ``InvalidMessage`` (saying why), and then writes nothing.
    """
    db = using or db_for_write()
    original = OutboxEmail.objects.using(db).get(pk=pk)
    if original.status not in FINAL_STATUSES:
        raise InvalidMessage(
            f"Outbox email {pk} is {original.status}, not finished: it is still going out."
        )
    if not original.recipients:
        # Every recipient was taken off when it was written (suppressed): a copy would
        # be an empty envelope. Their addresses are only in ``refused``, without saying
        # which were Bcc, so they are not put back.
        taken_off = "; ".join(f"{a} ({why})" for a, why in original.refused.items())
        raise InvalidMessage(f"Outbox email {pk} has no recipients left to resend to"
                             + (f"; taken off when it was written: {taken_off}"
                                if taken_off else "."))
    # As for a new message: recipients suppressed since (or who left its list) are
    # taken off the copy.
    refused = suppression.check(original.recipients, using=db,
                                mailing_list=original.mailing_list)
    to, cc, bcc = ([a for a in addresses if a not in refused]
                   for addresses in (original.to, original.cc, original.bcc))
    if not (to or cc or bcc):
        raise InvalidMessage(
            f"Outbox email {pk} was not resent: every recipient is on the suppression list: "
            + "; ".join(f"{a} ({why})" for a, why in refused.items()))
    now = timezone.now()
    with transaction.atomic(using=db):
        copy = _copy(original, db, mode=mode, created_at=now, due_at=now, to=to, cc=cc, bcc=bcc,
                     refused=refused,
                     message_id=make_message_id(original.from_email, conf.get().message_id_domain),
                     metadata={**original.metadata, "resent_from": pk})
    signals.send_on_commit(signals.queued, using=db, sender=OutboxEmail, email=copy)
    return copy
