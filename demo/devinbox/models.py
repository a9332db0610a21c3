"""What the demo's capture SMTP servers received, kept in the demo's database so the dev
inbox page (and a worker or Celery process beside it) see the same messages."""

from __future__ import annotations

import email
import email.message
import email.policy

from django.db import models


class CapturedMessage(models.Model):
    server = models.CharField(max_length=32)  # the capture server: primary | backup
    mail_from = models.TextField()
    rcpt_tos = models.JSONField(default=list)
    subject = models.TextField(blank=True)
    raw = models.BinaryField()
    received_at = models.DateTimeField(auto_now_add=True, db_index=True)

    class Meta:
        ordering = ["-id"]

    def __str__(self) -> str:
        return f"{self.subject} → {', '.join(self.rcpt_tos)}"

    @property
    def message(self) -> email.message.EmailMessage:
        return email.message_from_bytes(bytes(self.raw).replace(b"\r\n", b"\n"),
                                        policy=email.policy.default)

    def parts(self, message: email.message.EmailMessage | None = None) -> list[email.message.EmailMessage]:
        """Every leaf part, in order; their index is their address in the inbox URLs."""
        message = message if message is not None else self.message
        return [p for p in message.walk() if not p.is_multipart()]  # type: ignore[misc]
