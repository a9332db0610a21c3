"""The outbox: one row per email, its attachments, and one row per delivery attempt.

Only :mod:`kipekee.outbox` changes ``status`` (and the fields that move with it); every
change there is one conditional UPDATE so that two engines can never both own a row.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from django.contrib.contenttypes.fields import GenericForeignKey
from django.contrib.contenttypes.models import ContentType
from django.db import models
from django.db.models import Q
from django.utils import timezone

from .addresses import canonical


def db_column(field: object) -> str:
    """The database column of a concrete model field, for SQL written by hand.

    django-stubs types ``Field.column`` as optional (and ``Meta.get_field`` may return a
    relation, which has none); a field with no column here is a programming error.
    """
    column = getattr(field, "column", None)
    if not isinstance(column, str):
        raise TypeError(f"{field!r} has no database column")
    return column


class Status(models.TextChoices):
    QUEUED = "queued", "queued"
    SENDING = "sending", "sending"
    SENT = "sent", "sent"
    DEFERRED = "deferred", "deferred"
    FAILED = "failed", "failed"
    SUPPRESSED = "suppressed", "suppressed"
    CANCELLED = "cancelled", "cancelled"


#: Statuses from which nothing moves on (except a person's explicit resend).
FINAL_STATUSES = frozenset({Status.SENT, Status.FAILED, Status.SUPPRESSED, Status.CANCELLED})
#: Statuses whose rows an engine may claim once ``due_at`` has passed.
WAITING_STATUSES = (Status.QUEUED, Status.DEFERRED)


class Mode(models.TextChoices):
    NOW = "now", "now (in the request, quick retries)"
    HYBRID = "hybrid", "hybrid (in the request once, then an engine)"
    QUEUE = "queue", "queue (an engine)"


class ErrorKind(models.TextChoices):
    """How a delivery failure is treated."""

    TRANSIENT = "transient", "transient (retry)"
    PERMANENT = "permanent", "permanent (do not retry)"
    CONFIGURATION = "configuration", "configuration (fix the provider)"


class OutboxEmailQuerySet(models.QuerySet["OutboxEmail"]):
    def waiting(self) -> OutboxEmailQuerySet:
        return self.filter(status__in=WAITING_STATUSES)

    def due(self, now: datetime | None = None) -> OutboxEmailQuerySet:
        """Rows an engine may claim now: waiting and due, or sending with an expired lease."""
        now = now or timezone.now()
        return self.filter(
            Q(status__in=WAITING_STATUSES, due_at__lte=now)
            | Q(status=Status.SENDING, lease_until__lt=now)
        )

    def sent(self) -> OutboxEmailQuerySet:
        return self.filter(status=Status.SENT)

    def failed(self) -> OutboxEmailQuerySet:
        return self.filter(status=Status.FAILED)

    def for_object(self, obj: models.Model) -> OutboxEmailQuerySet:
        """The emails about one business object: ``for_object(quote).filter(event=…)``."""
        content_type = ContentType.objects.db_manager(self.db).get_for_model(obj)
        return self.filter(content_type=content_type, object_id=str(obj.pk))

    def statuses(self) -> dict[str, Any]:
        """``{template: status}`` of these rows; of two rows with one template, the newer wins.

        ``OutboxEmail.objects.for_object(quote).filter(event="quote_request.received")
        .statuses()`` → ``{"emails/quote_admin": "sent", "emails/quote_received": "sent"}``.
        """
        result: dict[str, Any] = {}
        for template, status in self.order_by("id").values_list("template", "status"):
            result[template] = status
        return result


class OutboxEmail(models.Model):
    """An email in the outbox: everything needed to build and send it, and its state."""

    status = models.CharField(max_length=16, choices=Status.choices, default=Status.QUEUED)
    mode = models.CharField(max_length=8, choices=Mode.choices, default=Mode.HYBRID)
    # Unique where set (Meta.constraints): a row without one (NULL, not "") adds no index
    # entry.
    idempotency_key = models.CharField(max_length=255, null=True, blank=True)  # noqa: DJ001
    # Fixed when the row is written, so that a rare resend is the same message.
    message_id = models.CharField(max_length=255, db_index=True)

    from_email = models.TextField()
    to = models.JSONField(default=list)
    cc = models.JSONField(default=list, blank=True)
    bcc = models.JSONField(default=list, blank=True)
    reply_to = models.JSONField(default=list, blank=True)
    subject = models.TextField(blank=True)
    body = models.TextField(blank=True)
    content_subtype = models.CharField(max_length=32, default="plain")
    alternatives = models.JSONField(default=list, blank=True)
    headers = models.JSONField(default=dict, blank=True)
    template = models.CharField(max_length=255, blank=True)
    metadata = models.JSONField(default=dict, blank=True)
    # Which queue of the outbox it waits in (KIPEKEE["LANES"]): engines claim the lanes
    # in priority order, so transactional mail never waits behind a newsletter.
    lane = models.CharField(max_length=32, default="transactional")
    # Only this provider alias may send it (empty: all providers, in failover order).
    provider = models.CharField(max_length=100, blank=True)
    # The notification that wrote it ("order.created") and the business object it is
    # about; object_id is text so that UUID and other non-integer keys fit.
    event = models.CharField(max_length=100, blank=True)
    content_type = models.ForeignKey(
        "contenttypes.ContentType", on_delete=models.SET_NULL, null=True, blank=True,
        related_name="+",
        db_index=False,  # kipekee_target starts with it
    )
    object_id = models.CharField(max_length=255, blank=True)
    target = GenericForeignKey("content_type", "object_id")
    # The MailingList.key it was sent to (empty: not list mail). Who left that list is
    # not sent to, and the row carries the one-click unsubscribe headers (kipekee.lists).
    mailing_list = models.CharField(max_length=100, blank=True)

    created_at = models.DateTimeField(default=timezone.now, db_index=True)
    due_at = models.DateTimeField(default=timezone.now)
    lease_until = models.DateTimeField(null=True, blank=True)
    # Who holds the lease: an engine's name plus a per-claim token.
    claimed_by = models.CharField(max_length=100, blank=True)
    attempts = models.PositiveIntegerField(default=0)
    # Every claim of the row, whether or not it became an attempt (a claim given back
    # by a stopping engine, or passed over because every circuit was open, does not
    # count as one): how often the row was taken, to see that nothing spins on it.
    claims = models.PositiveIntegerField(default=0)
    sent_at = models.DateTimeField(null=True, blank=True)
    sent_by = models.CharField(max_length=100, blank=True)
    error_kind = models.CharField(max_length=16, choices=ErrorKind.choices, blank=True)
    last_error = models.TextField(blank=True)
    # Recipients the provider refused while accepting the others: address -> reply.
    refused = models.JSONField(default=dict, blank=True)
    # What the provider reported later (delivery webhooks), per recipient:
    # address -> {"event": "delivered" | "bounced" | …, "at": ISO time, "detail": …}.
    delivery = models.JSONField(default=dict, blank=True)

    objects = OutboxEmailQuerySet.as_manager()

    class Meta:
        verbose_name = "outbox email"
        ordering = ["-id"]
        indexes = [
            # Engines look only at waiting rows: keep that index small. A claim walks it
            # for one lane, oldest due first (id breaks ties: no sort step).
            models.Index(
                fields=["lane", "due_at", "id"],
                name="kipekee_waiting_lane_due",
                condition=Q(status__in=["queued", "deferred"]),
            ),
            models.Index(
                fields=["lease_until"],
                name="kipekee_sending_lease",
                condition=Q(status="sending"),
            ),
            models.Index(fields=["status", "created_at"], name="kipekee_status_created"),
            # Partial where most rows hold nothing to find (no target, not sent yet): every
            # index entry is written by the INSERT of each `kipekee.send`, on its path.
            # With the idempotency key's constraint and the content type's index (gone:
            # kipekee_target starts with it), 4 of the 8 index entries of a queued row;
            # writing them was about a tenth of a queued send's CPU on SQLite. A query
            # that is to use one names its condition (SQLite infers only IS NOT NULL).
            models.Index(fields=["content_type", "object_id"], name="kipekee_target",
                         condition=Q(content_type__isnull=False)),
            # The admin's provider filter (sent by, or pinned to, a provider).
            models.Index(fields=["sent_by", "id"], name="kipekee_sent_by",
                         condition=~Q(sent_by="")),
            models.Index(fields=["provider"], name="kipekee_pinned_provider",
                         condition=~Q(provider="")),
        ]
        constraints = [
            models.UniqueConstraint(fields=["idempotency_key"], name="kipekee_idempotency_key",
                                    condition=Q(idempotency_key__isnull=False)),
        ]

    def __str__(self) -> str:
        return f"#{self.pk} {self.subject!r} to {', '.join(self.to)} ({self.status})"

    @property
    def recipients(self) -> list[str]:
        return [*self.to, *self.cc, *self.bcc]


class Attachment(models.Model):
    """A file attached to an outbox email; with ``content_id`` it is an inline part."""

    email = models.ForeignKey(OutboxEmail, on_delete=models.CASCADE, related_name="attachments")
    filename = models.CharField(max_length=255, blank=True)
    mimetype = models.CharField(max_length=255)
    content = models.BinaryField()
    content_id = models.CharField(max_length=255, blank=True)

    class Meta:
        ordering = ["id"]

    def __str__(self) -> str:
        return self.filename or self.content_id or f"attachment {self.pk}"


class Attempt(models.Model):
    """One try at delivering an outbox email, through one or more providers."""

    email = models.ForeignKey(OutboxEmail, on_delete=models.CASCADE, related_name="attempt_log")
    number = models.PositiveIntegerField()
    provider = models.CharField(max_length=100, blank=True)
    started_at = models.DateTimeField()
    finished_at = models.DateTimeField(default=timezone.now)
    # "sent" or an ErrorKind value.
    outcome = models.CharField(max_length=16)
    code = models.IntegerField(null=True, blank=True)
    error = models.TextField(blank=True)
    refused = models.JSONField(default=dict, blank=True)

    class Meta:
        ordering = ["email_id", "number", "id"]
        indexes = [models.Index(fields=["finished_at"], name="kipekee_attempt_finished")]

    def __str__(self) -> str:
        return f"attempt {self.number} of #{self.email_id}: {self.outcome}"


class EngineHeartbeat(models.Model):
    """One running engine (a worker process, a web process's thread, a Celery worker).

    Engines update ``beat_at`` and their counters every few seconds; health checks read
    the age of the newest beat.
    """

    name = models.CharField(max_length=200, unique=True)  # kind@host:pid
    kind = models.CharField(max_length=16)  # thread | worker | celery | tasks
    host = models.CharField(max_length=255)
    pid = models.PositiveIntegerField()
    started_at = models.DateTimeField(default=timezone.now)
    beat_at = models.DateTimeField(default=timezone.now, db_index=True)
    sent = models.PositiveBigIntegerField(default=0)
    deferred = models.PositiveBigIntegerField(default=0)
    failed = models.PositiveBigIntegerField(default=0)
    # Set when the engine stopped cleanly (a killed engine just stops beating).
    stopped_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-beat_at"]

    def __str__(self) -> str:
        return self.name


class ProviderMessage(models.Model):
    """An id a provider gave a sent message (HTTP APIs give one per recipient).

    Delivery webhooks name these ids; they lead back to the outbox row.
    """

    email = models.ForeignKey(OutboxEmail, on_delete=models.CASCADE,
                              related_name="provider_messages")
    provider = models.CharField(max_length=100)
    # Not unique alone: many ESPs give one id for every recipient of a message, and one
    # for every message of a batch request (Mailgun).
    message_id = models.CharField(max_length=255, db_index=True)
    recipient = models.CharField(max_length=254, blank=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["id"]
        constraints = [models.UniqueConstraint(fields=["email", "message_id", "recipient"],
                                               name="kipekee_provider_message_once")]

    def __str__(self) -> str:
        return f"{self.provider} {self.message_id} ({self.recipient})"


class SuppressionReason(models.TextChoices):
    HARD_BOUNCE = "hard_bounce", "hard bounce"
    SPAM_COMPLAINT = "spam_complaint", "spam complaint"
    UNSUBSCRIBE = "unsubscribe", "unsubscribed"
    MANUAL = "manual", "added by a person"


class _CanonicalAddress(models.Model):
    """A row keyed by ``address``, saved in its canonical form (:func:`canonical`), as
    lookups compare it."""

    address: str

    class Meta:
        abstract = True

    def save(self, *args: object, **kwargs: object) -> None:
        self.address = canonical(self.address)
        super().save(*args, **kwargs)  # type: ignore[arg-type]


class Suppression(_CanonicalAddress):
    """An address Kipekee does not send to, on any path.

    Filled by delivery webhooks (hard bounces, spam complaints, unsubscribes) and by
    people in the admin. ``address`` is stored canonical
    (:func:`kipekee.addresses.canonical`): one row per mailbox, however it is written.
    """

    address = models.CharField(max_length=254, unique=True)
    reason = models.CharField(max_length=32, choices=SuppressionReason.choices,
                              default=SuppressionReason.MANUAL)
    source = models.CharField(max_length=100, blank=True,
                              help_text="Where it came from: a provider's webhook, the admin…")
    detail = models.TextField(blank=True, help_text="The provider's reply or a note.")
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.address} ({self.get_reason_display()})"


class WebhookEvent(models.Model):
    """A provider's delivery event, processed once (the unique key makes replays no-ops)."""

    provider = models.CharField(max_length=50)  # the ESP's name, e.g. "Mailtrap"
    event_id = models.CharField(max_length=255)
    event = models.CharField(max_length=32)  # anymail's normalised event type
    recipient = models.CharField(max_length=254, blank=True)
    message_id = models.CharField(max_length=255, blank=True)
    email = models.ForeignKey(OutboxEmail, on_delete=models.SET_NULL, null=True, blank=True,
                              related_name="webhook_events")
    detail = models.TextField(blank=True)
    occurred_at = models.DateTimeField(null=True, blank=True)
    received_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-received_at"]
        constraints = [models.UniqueConstraint(fields=["provider", "event_id"],
                                               name="kipekee_webhook_event_once")]

    def __str__(self) -> str:
        return f"{self.provider} {self.event} {self.recipient} ({self.event_id})"


class MailingList(models.Model):
    """A list people may leave: a newsletter, promotions, announcements.

    Mail sent with ``mailing_list=<key>`` (``kipekee.send``, ``Email``, a notification's
    ``Message``) carries one-click unsubscribe headers (RFC 8058) and is not sent to an
    address that left this list (:class:`Unsubscription`); other mail (an order
    confirmation) still is. Create lists in the admin or a data migration: sending to an
    unknown key is refused, so a typo cannot send to everyone who left the real list.
    """

    key = models.SlugField(max_length=100, unique=True,
                           help_text="The name code sends with: mailing_list=\"newsletter\". "
                                     "Fixed once created.")
    name = models.CharField(max_length=200,
                            help_text="Shown to people on the unsubscribe page.")
    description = models.TextField(blank=True, help_text="Shown on the unsubscribe page.")
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name or self.key


class UnsubscribeSource(models.TextChoices):
    ONE_CLICK = "one-click", "one-click (RFC 8058 POST from the mailbox provider)"
    PAGE = "page", "the unsubscribe page"
    MAILTO = "mailto", "an email to the unsubscribe address"
    ADMIN = "admin", "the admin"
    CODE = "code", "application code"


class Unsubscription(_CanonicalAddress):
    """``address`` left ``mailing_list``: list mail to it is not sent (status
    ``suppressed``); other mail is. ``address`` is stored canonical
    (:func:`kipekee.addresses.canonical`): one row per mailbox and list."""

    # to_field: the row names the list by its key, as the outbox rows do, so the check
    # before sending needs no join. PROTECT: deleting a list must not forget who left it
    # (a list made again under the same key would mail them).
    mailing_list = models.ForeignKey(MailingList, to_field="key", on_delete=models.PROTECT,
                                     related_name="unsubscriptions")
    address = models.CharField(max_length=254)
    source = models.CharField(max_length=16, choices=UnsubscribeSource.choices,
                              default=UnsubscribeSource.CODE)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-created_at"]
        constraints = [models.UniqueConstraint(fields=["mailing_list", "address"],
                                               name="kipekee_unsubscribed_once")]

    def __str__(self) -> str:
        return f"{self.address} left {self.mailing_list_id}"


class LimiterKey(models.Model):
    """One shared limit (a provider's rate window or its connection permits): the row a
    take locks, so that takers in every process and host go one at a time
    (:class:`kipekee.limits.DatabaseStore`). ``takes`` only counts, for the lock."""

    key = models.CharField(max_length=200, primary_key=True)
    takes = models.PositiveBigIntegerField(default=0)
    # Permits: until when (Unix time) a process waits for one, so that holders close
    # their idle connections instead of keeping them warm.
    wanted_until = models.FloatField(default=0.0)
    wanted_by = models.CharField(max_length=100, blank=True)  # host:pid of the last

    def __str__(self) -> str:
        return self.key


class LimiterHit(models.Model):
    """One call into a provider counted by a shared rate window, at ``at`` (Unix time)."""

    id = models.BigAutoField(primary_key=True)
    key = models.CharField(max_length=200)
    at = models.FloatField()

    class Meta:
        indexes = [models.Index(fields=["key", "at"], name="kipekee_limiterhit_key_at")]

    def __str__(self) -> str:
        return f"{self.key} at {self.at}"


class ProviderPermit(models.Model):
    """One connection open to a provider somewhere, under its shared
    ``LIMITS["CONCURRENCY"]``. ``lease_until`` (Unix time) is renewed while the connection
    is open; a process that died leaves a permit that any other may take once it passed."""

    id = models.BigAutoField(primary_key=True)
    key = models.CharField(max_length=200)
    holder = models.CharField(max_length=64)
    lease_until = models.FloatField()

    class Meta:
        constraints = [models.UniqueConstraint(fields=["key", "holder"],
                                               name="kipekee_permit_once")]

    def __str__(self) -> str:
        return f"{self.key} held by {self.holder}"
