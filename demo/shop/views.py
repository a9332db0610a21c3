"""The four seed systems' pages. Every email is written in the transaction of the event
that causes it; the pages show what became of it (the outbox rows are the truth)."""

from __future__ import annotations

import secrets
from datetime import timedelta

from django.contrib import messages
from django.contrib.auth import authenticate, login
from django.contrib.auth.decorators import login_required
from django.db import transaction
from django.db.models import F
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.utils import timezone
from django.utils.crypto import constant_time_compare, salted_hmac
from django.views.decorators.http import require_POST

import kipekee
from devinbox import capture
from kipekee import notifications, outbox
from kipekee.engines import wake
from kipekee.models import OutboxEmail

from .abuse import rate_limited
from .forms import (
    ApplicationForm,
    BookingForm,
    CodeForm,
    LoginForm,
    NewsletterForm,
    NoticeForm,
    OrderForm,
    QuoteForm,
)
from .models import Booking, JobApplication, OneTimePassword, Order, QuoteRequest, Subscriber

OTP_MINUTES = 5
OTP_ATTEMPTS = 5


def home(request: HttpRequest) -> HttpResponse:
    return render(request, "shop/home.html")


def _remember(request: HttpRequest, key: str, pk: int) -> None:
    # Result pages show only what this browser submitted.
    request.session[key] = [*request.session.get(key, [])[-20:], pk]


def _allowed(request: HttpRequest, key: str, pk: int) -> None:
    if pk not in request.session.get(key, []):
        raise Http404("Not yours.")


# --- Tours (001) --------------------------------------------------------------------

@rate_limited("quote")
def tours(request: HttpRequest) -> HttpResponse:
    form = QuoteForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        if form.is_spam:  # a bot: look like success, write and send nothing
            return render(request, "shop/thanks.html")
        with transaction.atomic():
            quote = form.to_model()
            quote.save()
            kipekee.notify("quote.received", quote)
        # Delivered on commit (hybrid): the result page reads what happened.
        _remember(request, "quotes", quote.pk)
        return redirect("quote_sent", quote.pk)
    return render(request, "shop/tours.html", {"form": form})


def quote_sent(request: HttpRequest, pk: int) -> HttpResponse:
    _allowed(request, "quotes", pk)
    quote = get_object_or_404(QuoteRequest, pk=pk)
    row = (notifications.rows("quote.received", quote)
           .filter(metadata__notification="customer").order_by("-id").first())
    return render(request, "shop/quote_sent.html", {"quote": quote, "row": row})


@rate_limited("careers")
def careers(request: HttpRequest) -> HttpResponse:
    form = ApplicationForm(request.POST or None, request.FILES or None)
    if request.method == "POST" and form.is_valid():
        if form.is_spam:
            return render(request, "shop/thanks.html")
        data = form.cleaned_data
        with transaction.atomic():
            application = JobApplication.objects.create(
                name=data["name"], email=data["email"], position=data["position"],
                cv_name=data["cv"].name, cv=data["cv"].read())
            [receipt] = kipekee.notify("application.received", application)
        if receipt.refresh().failed:
            messages.error(request, f"Your application is saved but could not be forwarded: {receipt.error}")
        else:
            messages.success(request, "Thank you, your application was sent to our careers team.")
        return redirect("careers")
    return render(request, "shop/careers.html", {"form": form})


@rate_limited("newsletter")
def newsletter(request: HttpRequest) -> HttpResponse:
    form = NewsletterForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        if form.is_spam:
            return render(request, "shop/thanks.html")
        with transaction.atomic():
            subscriber, _ = Subscriber.objects.get_or_create(email=form.cleaned_data["email"].lower())
            kipekee.notify("newsletter.subscribed", subscriber)  # once per subscriber
        messages.success(request, "Subscribed: a welcome email is on its way.")
        return redirect("newsletter")
    return render(request, "shop/newsletter.html", {"form": form})


def thanks(request: HttpRequest) -> HttpResponse:
    return render(request, "shop/thanks.html")


# --- Payments (002) -----------------------------------------------------------------

def _otp_hash(code: str) -> str:
    return salted_hmac("demo-otp", code).hexdigest()


@rate_limited("login")
def payments_login(request: HttpRequest) -> HttpResponse:
    form = LoginForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        user = authenticate(request, **form.cleaned_data)
        if user is None or not user.email:
            form.add_error(None, "Wrong username or password.")
        else:
            code = f"{secrets.randbelow(10**6):06d}"
            with transaction.atomic():
                otp = OneTimePassword.objects.create(
                    user=user, code_hash=_otp_hash(code),
                    expires_at=timezone.now() + timedelta(minutes=OTP_MINUTES))
                # mode "now": the person is waiting for this mail, quick retries in the request.
                receipt = kipekee.send("emails/otp", to=user.email, mode="now", context={
                    "code": code, "minutes": OTP_MINUTES, "attempts": OTP_ATTEMPTS})
            receipt.refresh()
            request.session["otp"] = otp.pk
            if receipt.sent:
                messages.success(request, f"A sign-in code was sent to {user.email} (via {receipt.provider}).")
            else:
                messages.warning(request, f"The sign-in code is delayed ({receipt.status}): {receipt.error}")
            return redirect("payments_code")
    return render(request, "shop/payments_login.html", {"form": form})


def payments_code(request: HttpRequest) -> HttpResponse:
    otp = OneTimePassword.objects.filter(pk=request.session.get("otp"), used=False).first()
    if otp is None:
        return redirect("payments_login")
    form = CodeForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        # Count the attempt first, in one UPDATE: parallel guesses cannot share an attempt.
        counted = OneTimePassword.objects.filter(
            pk=otp.pk, used=False, attempts__lt=OTP_ATTEMPTS, expires_at__gt=timezone.now(),
        ).update(attempts=F("attempts") + 1)
        if not counted:
            del request.session["otp"]
            messages.error(request, "That code expired or was tried too many times: sign in again.")
            return redirect("payments_login")
        if constant_time_compare(_otp_hash(form.cleaned_data["code"]), otp.code_hash):
            OneTimePassword.objects.filter(pk=otp.pk).update(used=True)
            login(request, otp.user)
            del request.session["otp"]
            return redirect("payments")
        left = OTP_ATTEMPTS - otp.attempts - 1
        form.add_error("code", f"Wrong code; {left} attempt{'s' if left != 1 else ''} left.")
    return render(request, "shop/payments_code.html", {"form": form, "otp": otp})


@login_required(login_url="payments_login")
def payments(request: HttpRequest) -> HttpResponse:
    form = NoticeForm(request.POST or None)
    receipt = None
    if request.method == "POST" and form.is_valid():
        data = form.cleaned_data
        receipt = kipekee.send("emails/notice", to=data["to"], context={
            "notice_subject": data["subject"], "notice_body": data["body"]})
        receipt.refresh()
    return render(request, "shop/payments.html", {
        "form": form, "receipt": receipt,
        "servers": [{"name": n, "down": capture.is_down(n)} for n in capture.servers],
        "recent": OutboxEmail.objects.filter(template="emails/notice").order_by("-id")[:10],
    })


# --- Marketplace (003) --------------------------------------------------------------

TRANSITIONS = {  # action → (from statuses, to status, event)
    "accept": ((Order.Status.CREATED,), Order.Status.ACCEPTED, "order.accepted"),
    "deliver": ((Order.Status.ACCEPTED,), Order.Status.DELIVERED, "order.delivered"),
    "cancel": ((Order.Status.CREATED, Order.Status.ACCEPTED), Order.Status.CANCELLED, "order.cancelled"),
}


@rate_limited("order")
def market(request: HttpRequest) -> HttpResponse:
    form = OrderForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        if form.is_spam:
            return render(request, "shop/thanks.html")
        with transaction.atomic():
            order = form.to_model()
            order.save()
            kipekee.notify("order.created", order)  # mode="queue": the engine sends it
        return redirect("order", order.pk)
    return render(request, "shop/market.html", {"form": form, "orders": Order.objects.order_by("-id")[:20]})


def order(request: HttpRequest, pk: int) -> HttpResponse:
    order = get_object_or_404(Order, pk=pk)
    return render(request, "shop/order.html", {
        "order": order, "rows": OutboxEmail.objects.for_object(order).order_by("id"),
        "actions": [a for a, (sources, _, _) in TRANSITIONS.items() if order.status in sources]
        + ([] if order.paid or order.status == Order.Status.CANCELLED else ["pay"]),
    })


@require_POST
def order_action(request: HttpRequest, pk: int, action: str) -> HttpResponse:
    with transaction.atomic():
        if action == "pay":
            changed = (Order.objects.filter(pk=pk, paid=False).exclude(status=Order.Status.CANCELLED)
                       .update(paid=True))
            event = "order.paid"
        elif action in TRANSITIONS:
            sources, target, event = TRANSITIONS[action]
            # One conditional UPDATE: two clicks cannot both move the order (nor mail twice).
            changed = Order.objects.filter(pk=pk, status__in=sources).update(status=target)
        else:
            raise Http404("No such action.")
        if changed:
            kipekee.notify(event, Order.objects.get(pk=pk))
    if not changed:
        messages.error(request, f"The order cannot be {action}ed now.")
    return redirect("order", pk)


# --- Cinema (004) -------------------------------------------------------------------

@rate_limited("booking")
def cinema(request: HttpRequest) -> HttpResponse:
    form = BookingForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        if form.is_spam:
            return render(request, "shop/thanks.html")
        with transaction.atomic():
            booking = form.to_model()
            booking.save()  # writes (or not) the reminder: Booking follows booking.reminder
            if booking.status == Booking.Status.CONFIRMED:
                kipekee.notify("booking.confirmed", booking)
            else:
                kipekee.notify("booking.payment_failed", booking)
        _remember(request, "bookings", booking.pk)
        return redirect("booking", booking.pk)
    return render(request, "shop/cinema.html", {"form": form})


def booking(request: HttpRequest, pk: int) -> HttpResponse:
    _allowed(request, "bookings", pk)
    booking = get_object_or_404(Booking, pk=pk)
    return render(request, "shop/booking.html", {
        "booking": booking, "rows": OutboxEmail.objects.for_object(booking).order_by("id")})


@require_POST
def fast_forward(request: HttpRequest, pk: int) -> HttpResponse:
    """Demo only: move this booking's waiting reminder to now, as if 24 h had passed."""
    _allowed(request, "bookings", pk)
    booking = get_object_or_404(Booking, pk=pk)
    waiting = notifications.rows("booking.reminder", booking).filter(status__in=("queued", "deferred"))
    moved = [row_pk for row_pk in waiting.values_list("pk", flat=True)
             if outbox.reschedule(row_pk, timezone.now())]
    if moved:
        wake(moved)  # the engine was asleep until the old due time
        messages.success(request, "Time moved forward: the reminder is due now.")
    else:
        messages.error(request, "No reminder is waiting for this booking.")
    return redirect("booking", pk)


