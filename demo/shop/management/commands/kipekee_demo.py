"""Send real emails through a local SMTP server and show their outbox rows.

1. an order and its confirmation email committed together → delivered in the request;
2. an order whose transaction rolls back → no email at all;
3. a confirmation to an address the server refuses → the caller is told at once;
4. Django's own send_mail() → through the outbox as well.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from django.conf import settings
from django.core.mail import send_mail
from django.core.management import call_command
from django.core.management.base import BaseCommand
from django.db import transaction
from django.test.utils import override_settings

import kipekee
from kipekee.models import OutboxEmail
from kipekee.testing import Faults, LocalSMTPServer
from shop.models import Order


class Command(BaseCommand):
    help = "Send real emails through a local SMTP capture server and show the outbox."

    def handle(self, *args: Any, **options: Any) -> None:
        call_command("migrate", verbosity=0)
        faults = Faults(refuse_recipients={"nobody@shop.example": "550 5.1.1 no such user here"})
        with LocalSMTPServer(faults=faults) as server:
            provider = settings.KIPEKEE["PROVIDERS"]["primary"]
            live = {**settings.KIPEKEE, "PROVIDERS": {"primary": {
                **provider, "OPTIONS": {**provider["OPTIONS"], "port": server.port}}}}
            with override_settings(KIPEKEE=live):
                self.run_demo(server)

    def run_demo(self, server: LocalSMTPServer) -> None:
        say = self.stdout.write
        say(self.style.MIGRATE_HEADING(f"Local SMTP server listening on {server.host}:{server.port}"))

        say(self.style.MIGRATE_HEADING("\n1. Order + confirmation in one transaction"))
        with transaction.atomic():
            order = Order.objects.create(customer_email="ann@example.com",
                                         customer_name="Ann", total=Decimal("42.00"))
            receipt = kipekee.send("emails/order_created", to=order.customer_email,
                                   context={"order": order},
                                   idempotency_key=f"order-{order.pk}-created")
            say(f"   inside the transaction: {receipt!r}")
        say(f"   after commit:           {receipt!r}")
        received = server.wait_for(1)[-1]
        say(f"   the SMTP server received: From {received.mail_from} To {', '.join(received.rcpt_tos)}")
        say(f"     Subject: {received.subject}")
        say(f"     Message-ID: {received.message_id}")
        body = received.message.get_body(("plain",))
        for line in (body.get_content() if body else "").strip().splitlines():
            say(f"     | {line}")
        self.show_row(receipt.id)

        say(self.style.MIGRATE_HEADING("\n2. The same confirmation again (a double submit)"))
        again = kipekee.send("emails/order_created", to=order.customer_email,
                             context={"order": order}, idempotency_key=f"order-{order.pk}-created")
        say(f"   {again!r}: same row #{again.id}, created={again.created}; "
            f"messages received so far: {len(server.messages)}")

        say(self.style.MIGRATE_HEADING("\n3. An order whose transaction rolls back"))
        before = OutboxEmail.objects.count()
        try:
            with transaction.atomic():
                order2 = Order.objects.create(customer_email="bo@example.com",
                                              customer_name="Bo", total=Decimal("10.00"))
                kipekee.send("emails/order_created", to=order2.customer_email, context={"order": order2})
                raise RuntimeError("payment declined")
        except RuntimeError as exc:
            say(f"   the order failed ({exc}); outbox rows: {before} before, "
                f"{OutboxEmail.objects.count()} after; messages received: {len(server.messages)}")

        say(self.style.MIGRATE_HEADING("\n4. An address the server refuses"))
        refused = kipekee.send(subject="Welcome", text="Hello!", to="nobody@shop.example")
        say(f"   {refused!r}")
        for address, reply in refused.refused.items():
            say(f"   tell the user: the address {address} was refused ({reply})")

        say(self.style.MIGRATE_HEADING("\n5. Django's send_mail() through the outbox"))
        count = send_mail("Your one-time password", "Code: 913 406 (valid 5 minutes)",
                          None, ["admin@payments.example"])
        row = OutboxEmail.objects.order_by("-id").first()
        assert row is not None
        say(f"   send_mail returned {count}; outbox row #{row.pk} is {row.status}; "
            f"messages received: {len(server.messages)}")
        say(self.style.SUCCESS("\nDone. The outbox is in demo/demo.sqlite3 "
                               "(python demo/manage.py shell, or the admin)."))

    def show_row(self, pk: int) -> None:
        row = OutboxEmail.objects.get(pk=pk)
        self.stdout.write(f"   outbox row #{row.pk}: status={row.status} attempts={row.attempts} "
                          f"sent_by={row.sent_by} sent_at={row.sent_at:%H:%M:%S} "
                          f"template={row.template}")
        for attempt in row.attempt_log.all():
            self.stdout.write(f"     attempt {attempt.number}: {attempt.outcome} via {attempt.provider}")
