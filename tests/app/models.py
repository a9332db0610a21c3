"""Business objects of the test app: what the seeds' notifications are about."""

from __future__ import annotations

import uuid

from django.db import models


class Quote(models.Model):
    """A tours-site quote request (seed 001): an admin copy and a customer confirmation."""

    name = models.CharField(max_length=100)
    email = models.EmailField()
    language = models.CharField(max_length=10, default="en")
    trip = models.CharField(max_length=100)

    def __str__(self) -> str:
        return f"quote {self.pk} from {self.name}"


class Booking(models.Model):
    """A cinema booking (seed 004), with a non-integer primary key on purpose."""

    class Status(models.TextChoices):
        CONFIRMED = "confirmed"
        CANCELLED = "cancelled"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    number = models.CharField(max_length=20)
    email = models.EmailField()
    language = models.CharField(max_length=10, default="en")
    film = models.CharField(max_length=100)
    seat = models.CharField(max_length=10)
    starts_at = models.DateTimeField()
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.CONFIRMED)

    def __str__(self) -> str:
        return f"booking {self.number}"
