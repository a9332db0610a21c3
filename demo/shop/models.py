"""The business objects of the four seed systems, as small as the flows need.

Two columns recur: ``owner``, the visitor that made the row (:mod:`shop.visitors`: pages
and actions look rows up by it), and ``submission``, the key of the form that made it
(:class:`shop.forms.OnceForm`: unique, so a form sent twice writes one row and one mail).
"""

from __future__ import annotations

import secrets

from django.conf import settings
from django.db import models


def owner_field() -> models.CharField:
    return models.CharField(max_length=64, blank=True, db_index=True, editable=False)


def submission_field() -> models.UUIDField:
    # null: rows written by code rather than a form (the one-shot demo command) have none.
    return models.UUIDField(null=True, blank=True, unique=True, editable=False)


class Order(models.Model):
    """Marketplace (seed 003); also the one-shot ``kipekee_demo`` command's order."""

    class Status(models.TextChoices):
        CREATED = "created"
        ACCEPTED = "accepted"
        DELIVERED = "delivered"
        CANCELLED = "cancelled"

    customer_email = models.EmailField()
    customer_name = models.CharField(max_length=100)
    total = models.DecimalField(max_digits=10, decimal_places=2)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.CREATED)
    paid = models.BooleanField(default=False)
    owner = owner_field()
    submission = submission_field()
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return f"Order {self.pk}"


class QuoteRequest(models.Model):
    """Tours (seed 001): a tour quote request from the public form."""

    name = models.CharField(max_length=100)
    email = models.EmailField()
    tour = models.CharField(max_length=100)
    travellers = models.PositiveSmallIntegerField()
    message = models.TextField(blank=True)
    owner = owner_field()
    submission = submission_field()
    created_at = models.DateTimeField(auto_now_add=True)


class JobApplication(models.Model):
    name = models.CharField(max_length=100)
    email = models.EmailField()
    position = models.CharField(max_length=100)
    cv_name = models.CharField(max_length=255)
    cv = models.BinaryField()
    submission = submission_field()
    created_at = models.DateTimeField(auto_now_add=True)


class Subscriber(models.Model):
    """One row per mailbox: ``mailbox`` is the address's one spelling
    (:func:`kipekee.addresses.canonical`: IDNA domain, Unicode NFC, lower case), so
    ``user@bücher.example`` and ``user@xn--bcher-kva.example`` are one subscriber.
    ``email`` is the address as first typed, where the mail goes."""

    email = models.EmailField()
    mailbox = models.CharField(max_length=320, unique=True, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)


#: The tours newsletter's kipekee.models.MailingList (created by migration 0004).
NEWSLETTER = "tours-news"


class NewsletterIssue(models.Model):
    """One issue of the tours newsletter, sent to every subscriber as list mail (the bulk
    lane, one-click unsubscribe). ``submission``: the issue form's key (sent once)."""

    title = models.CharField(max_length=200)
    submission = submission_field()
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return self.title


class OneTimePassword(models.Model):
    """Payments (seed 002): a login code sent by email; stored hashed."""

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE)
    code_hash = models.CharField(max_length=128)
    expires_at = models.DateTimeField()
    attempts = models.PositiveSmallIntegerField(default=0)
    used = models.BooleanField(default=False)
    submission = submission_field()
    created_at = models.DateTimeField(auto_now_add=True)


class Show(models.Model):
    """Cinema (seed 004)."""

    film = models.CharField(max_length=100)
    starts_at = models.DateTimeField()

    def __str__(self) -> str:
        return f"{self.film}, {self.starts_at:%a %d %b %H:%M}"


def _booking_number() -> str:
    return secrets.token_hex(4).upper()


class Booking(models.Model):
    class Status(models.TextChoices):
        CONFIRMED = "confirmed"
        PAYMENT_FAILED = "payment_failed"

    show = models.ForeignKey(Show, on_delete=models.PROTECT)
    name = models.CharField(max_length=100)
    email = models.EmailField()
    seat = models.CharField(max_length=8)
    number = models.CharField(max_length=16, default=_booking_number, unique=True)
    status = models.CharField(max_length=16, choices=Status.choices)
    owner = owner_field()
    submission = submission_field()
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            # A seat is sold once per show, whoever wins a race: the database decides.
            # (A declined card holds no seat.)
            models.UniqueConstraint(fields=["show", "seat"], condition=models.Q(status="confirmed"),
                                    name="shop_booking_one_per_seat"),
        ]
