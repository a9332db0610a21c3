"""The business objects of the four seed systems, as small as the flows need."""

from __future__ import annotations

import secrets

from django.conf import settings
from django.db import models


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
    created_at = models.DateTimeField(auto_now_add=True)


class JobApplication(models.Model):
    name = models.CharField(max_length=100)
    email = models.EmailField()
    position = models.CharField(max_length=100)
    cv_name = models.CharField(max_length=255)
    cv = models.BinaryField()
    created_at = models.DateTimeField(auto_now_add=True)


class Subscriber(models.Model):
    email = models.EmailField(unique=True)
    created_at = models.DateTimeField(auto_now_add=True)


class OneTimePassword(models.Model):
    """Payments (seed 002): a login code sent by email; stored hashed."""

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE)
    code_hash = models.CharField(max_length=128)
    expires_at = models.DateTimeField()
    attempts = models.PositiveSmallIntegerField(default=0)
    used = models.BooleanField(default=False)
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
    created_at = models.DateTimeField(auto_now_add=True)
