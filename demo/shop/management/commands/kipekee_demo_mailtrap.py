"""The tours site's emails through Mailtrap's HTTP API — here a local server that follows
Mailtrap's contract (20 ms per answer, 150 requests per 10 s enforced).

1. a quote request: the customer's confirmation goes out in the request, with its
   category and custom variables, and Mailtrap's message id is kept on the row;
2. a newsletter of 1,200 queued messages goes out through /api/batch in 3 requests;
3. Mailtrap answers 503: the email is kept (deferred), not lost;
4. Mailtrap reports a hard bounce through the webhook: the address is suppressed, and
   the next email to it is not sent — the caller is told why.
"""

from __future__ import annotations

import base64
import json
import logging
import time
from typing import Any

from django.core.management import call_command
from django.core.management.base import BaseCommand
from django.test import Client
from django.test.utils import override_settings
from django.utils import timezone

import kipekee
from kipekee import outbox, recording
from kipekee.delivery import Deliverer
from kipekee.models import OutboxEmail, ProviderMessage, Suppression
from kipekee.testing import LocalMailtrapServer, MailtrapFaults

TOKEN = "demo-token"
WEBHOOK_SECRET = "mailtrap:demo-webhook-secret"


class Command(BaseCommand):
    help = "Send the tours site's emails through a local Mailtrap-contract server."

    def handle(self, *args: Any, **options: Any) -> None:
        call_command("migrate", verbosity=0)
        Suppression.objects.filter(address="gone@tours.example").delete()
        with LocalMailtrapServer(tokens={TOKEN}, latency=0.02) as server:
            settings = {
                "PROVIDERS": {"mailtrap": {
                    "BACKEND": "kipekee.backends.mailtrap.EmailBackend",
                    "OPTIONS": {"api_token": TOKEN, "api_url": server.api_url},
                    "LIMITS": {"RATE": "150/10s"},
                }},
                "MODE": "hybrid",
                "WEBHOOK_SECRET": WEBHOOK_SECRET,
            }
            with override_settings(KIPEKEE=settings,
                                   DEFAULT_FROM_EMAIL="Mbugani Tours <desk@tours.example>"):
                self.run_demo(server)

    def run_demo(self, server: LocalMailtrapServer) -> None:
        say = self.stdout.write
        head = self.style.MIGRATE_HEADING
        say(head(f"Local Mailtrap-contract server at {server.api_url} (20 ms per answer)"))

        say(head("\n1. A quote request: the confirmation goes out in the request"))
        receipt = kipekee.send(subject="We received your quote request",
                               text="Dear Ann, our team will answer within a day.",
                               html="<p>Dear Ann, our team will answer within a day.</p>",
                               to="Ann <ann@example.com>",
                               metadata={"category": "quote_request", "quote_id": 1041})
        say(f"   {receipt!r}")
        sent = server.messages[-1]
        say(f"   Mailtrap received: to={sent['to']} category={sent['category']!r} "
            f"custom_variables={sent['custom_variables']}")
        ids = list(ProviderMessage.objects.filter(email_id=receipt.id)
                   .values_list("recipient", "message_id"))
        say(f"   Mailtrap's message id, kept on outbox row #{receipt.id}: {ids}")

        say(head("\n2. A newsletter: 1,200 queued messages through /api/batch"))
        before = len(server.requests)
        now = timezone.now()
        OutboxEmail.objects.bulk_create(
            OutboxEmail(from_email="Mbugani Tours <desk@tours.example>",
                        to=[f"reader{i}@example.com"], subject="Migration season is here",
                        body="The herds are crossing the Mara river.",
                        message_id=f"<news-{now.timestamp()}-{i}@tours.example>",
                        mode="queue", metadata={"category": "newsletter"},
                        due_at=now, created_at=now)
            for i in range(1200))
        pks = list(OutboxEmail.objects.filter(subject="Migration season is here", status="queued")
                   .values_list("pk", flat=True))
        rows = [row for row in (outbox.claim(pk) for pk in pks) if row is not None]
        started = time.monotonic()
        with Deliverer() as deliverer:
            outcomes = deliverer.deliver_many(rows)
        took = time.monotonic() - started
        for row, outcome in zip(rows, outcomes):
            recording.record(row, outcome)
        requests = server.requests[before:]
        say(f"   {sum(o.ok for o in outcomes)} of {len(rows)} sent in {took:.1f} s with "
            f"{len(requests)} requests to {sorted({r.path for r in requests})}, "
            f"answers {sorted({r.status for r in requests})} "
            f"(one by one it would take {len(rows) / 15:.0f} s at Mailtrap's 15 requests/s)")

        say(head("\n3. Mailtrap answers 503 Service Unavailable"))
        server.faults = MailtrapFaults(statuses=[503])
        down = kipekee.send(subject="Your job application", text="Thank you for applying.",
                            to="bo@example.com")
        say(f"   {down!r}")
        say(f"   kept as {down.status} ({down.error_kind}); an engine retries it later")

        say(head("\n4. A hard bounce, reported by Mailtrap's webhook"))
        first = kipekee.send(subject="Your safari itinerary", text="Day 1: Nairobi.",
                             to="gone@tours.example")
        message_id = ProviderMessage.objects.get(email_id=first.id).message_id
        payload = {"events": [{
            "event": "bounce", "message_id": message_id, "email": "gone@tours.example",
            "sending_stream": "transactional", "timestamp": int(time.time()),
            "event_id": f"demo-{message_id}", "response": "550 5.1.1 mailbox does not exist",
        }]}
        auth = "Basic " + base64.b64encode(WEBHOOK_SECRET.encode()).decode()
        answer = Client().post("/kipekee/webhooks/mailtrap/", data=json.dumps(payload),
                               content_type="application/json", HTTP_AUTHORIZATION=auth,
                               HTTP_HOST="localhost")
        say(f"   POST /kipekee/webhooks/mailtrap/ (basic auth) -> {answer.status_code}")
        row = OutboxEmail.objects.get(pk=first.id)
        say(f"   outbox row #{row.pk}: status={row.status} delivery={row.delivery}")
        say(f"   suppression list: {[str(s) for s in Suppression.objects.all()]}")
        again = kipekee.send(subject="Your safari itinerary", text="Day 1: Nairobi.",
                             to="gone@tours.example")
        say(f"   the next email to it: {again!r}")
        # Django logs the refused request with its traceback; expected here, so quiet.
        security = logging.getLogger("django.security.AnymailWebhookValidationFailure")
        security.disabled = True
        try:
            wrong = Client().post("/kipekee/webhooks/mailtrap/", data=json.dumps(payload),
                                  content_type="application/json", HTTP_HOST="localhost",
                                  HTTP_AUTHORIZATION="Basic " + base64.b64encode(b"x:y").decode())
        finally:
            security.disabled = False
        say(f"   the same webhook with a wrong secret -> {wrong.status_code}, nothing changed")
        say(self.style.SUCCESS("\nDone. The outbox is in demo/demo.sqlite3."))
