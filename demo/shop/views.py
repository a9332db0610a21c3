"""The four seed systems' pages. Every email is written in the transaction of the event
that causes it; the pages show what became of it (the outbox rows are the truth)."""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import TypeVar

from django.conf import settings
from django.contrib import messages
from django.contrib.auth import authenticate, login
from django.contrib.auth.decorators import login_required
from django.db import IntegrityError, models, transaction
from django.db.models import F
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.utils import timezone
from django.utils.crypto import constant_time_compare, salted_hmac
from django.views.decorators.http import require_POST

import kipekee
from devinbox import capture
from devinbox.views import staff_unless_debug
from kipekee import notifications, outbox
from kipekee.addresses import canonical
from kipekee.engines import wake
from kipekee.models import OutboxEmail, Unsubscription

from .abuse import rate_limited
from .forms import (
    ApplicationForm,
    BookingForm,
    CodeForm,
    IssueForm,
    LoginForm,
    NewsletterForm,
    NoticeForm,
    OrderForm,
    QuoteForm,
)
from .models import (
    NEWSLETTER,
    Booking,
    JobApplication,
    NewsletterIssue,
    OneTimePassword,
    Order,
    QuoteRequest,
    Subscriber,
)
from .visitors import owned, visitor

OTP_MINUTES = 5
OTP_ATTEMPTS = 5


def home(request: HttpRequest) -> HttpResponse:
    return render(request, "shop/home.html", {"debug": settings.DEBUG})


M = TypeVar("M", bound=models.Model)
ALREADY_SENT = "This form was already sent. Reload the page to send a new one."


class AlreadySent(Exception):
    """The form's key was used by another visitor's submission (a copied form)."""


def once(model: type[M], key: uuid.UUID, write: Callable[[], M], **mine: object) -> M:
    """``write()`` in a transaction, unless the form with ``key`` was sent before: then the
    row that first submission wrote (``submission`` is unique: of two at once, the
    database lets one in). ``mine``: what that row must match to be shown to this visitor
    (its owner); otherwise :class:`AlreadySent`. Any other ``IntegrityError`` (a seat
    taken) is the caller's."""
    try:
        with transaction.atomic():
            return write()
    except IntegrityError:
        earlier = model._default_manager.filter(submission=key).first()
        if earlier is None:
            raise
        if any(getattr(earlier, name) != value for name, value in mine.items()):
            raise AlreadySent from None
        return earlier


# --- Tours (001) --------------------------------------------------------------------

@rate_limited("quote")
def tours(request: HttpRequest) -> HttpResponse:
    owner = visitor(request)
    form = QuoteForm.from_request(request)
    if request.method == "POST" and form.is_valid():
        if form.is_spam:  # a bot: look like success, write and send nothing
            return render(request, "shop/thanks.html")

        def write() -> QuoteRequest:
            quote = form.to_model(owner)
            quote.save()
            kipekee.notify("quote.received", quote)
            return quote

        try:
            quote = once(QuoteRequest, form.key, write, owner=owner)
        except AlreadySent:
            form.add_error(None, ALREADY_SENT)
        else:
            # Delivered on commit (hybrid): the result page reads what happened.
            return redirect("quote_sent", quote.pk)
    return render(request, "shop/tours.html", {"form": form})


def quote_sent(request: HttpRequest, pk: int) -> HttpResponse:
    quote = owned(request, QuoteRequest, pk)
    row = (notifications.rows("quote.received", quote)
           .filter(metadata__notification="customer").order_by("-id").first())
    return render(request, "shop/quote_sent.html", {"quote": quote, "row": row})


@rate_limited("careers")
def careers(request: HttpRequest) -> HttpResponse:
    form = ApplicationForm.from_request(request)
    if request.method == "POST" and form.is_valid():
        if form.is_spam:
            return render(request, "shop/thanks.html")
        data = form.cleaned_data

        def write() -> JobApplication:
            application = JobApplication.objects.create(
                name=data["name"], email=data["email"], position=data["position"],
                cv_name=data["cv"].name, cv=data["cv"].read(), submission=form.key)
            kipekee.notify("application.received", application)
            return application

        # A second submission shows what became of the first one's mail.
        application = once(JobApplication, form.key, write)
        row = notifications.rows("application.received", application).order_by("-id").first()
        if row is not None and row.status == "failed":
            messages.error(request, f"Your application is saved but could not be forwarded: {row.last_error}")
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
        email = form.cleaned_data["email"]
        with transaction.atomic():
            # One row per mailbox, however it is spelled (IDNA, NFC, case): get_or_create
            # on the unique canonical form also settles two signups at once.
            subscriber, _ = Subscriber.objects.get_or_create(mailbox=canonical(email),
                                                             defaults={"email": email})
            kipekee.notify("newsletter.subscribed", subscriber)  # once per subscriber
        messages.success(request, "Subscribed: a welcome email is on its way.")
        return redirect("newsletter")
    return render(request, "shop/newsletter.html", {"form": form, **_newsletter_desk(request)})


def _may_send_issues(request: HttpRequest) -> bool:
    """The issue desk, like the dev inbox: anyone with DEBUG on, staff only with it off."""
    return settings.DEBUG or (request.user.is_active and request.user.is_staff)


def _newsletter_desk(request: HttpRequest) -> dict[str, object]:
    if not _may_send_issues(request):
        return {}
    left = set(Unsubscription.objects.filter(mailing_list_id=NEWSLETTER)
               .values_list("address", flat=True))
    issues = []
    for issue in NewsletterIssue.objects.order_by("-id")[:5]:
        counts: dict[str, int] = {}
        for status in OutboxEmail.objects.filter(metadata__issue=issue.pk).values_list(
                "status", flat=True):
            counts[status] = counts.get(status, 0) + 1
        issues.append({"issue": issue, "counts": sorted(counts.items())})
    return {"desk": True, "debug": settings.DEBUG, "issue_form": IssueForm.from_request(request), "issues": issues,
            "subscribers": [{"email": s.email, "left": s.mailbox in left}
                            for s in Subscriber.objects.order_by("id")[:50]]}


@staff_unless_debug
@require_POST
def newsletter_issue(request: HttpRequest) -> HttpResponse:
    """An issue to every subscriber: list mail (one-click unsubscribe headers, not sent to
    who left the list) written at once with ``send_many``, waiting in the bulk lane for
    the engine. The form's key makes it once."""
    form = IssueForm.from_request(request)
    if not form.is_valid():
        messages.error(request, "; ".join(e for errors in form.errors.values() for e in errors))
        return redirect("newsletter")

    def write() -> NewsletterIssue:
        issue = NewsletterIssue.objects.create(title=form.cleaned_data["title"],
                                               submission=form.key)
        kipekee.send_many(
            kipekee.Email("emails/newsletter_issue", to=subscriber.email,
                          mailing_list=NEWSLETTER,
                          context={"issue": issue, "subscriber": subscriber},
                          idempotency_key=f"demo-issue:{issue.pk}:{subscriber.pk}",
                          metadata={"issue": issue.pk})
            for subscriber in Subscriber.objects.order_by("id"))
        return issue

    issue = once(NewsletterIssue, form.key, write)
    rows = OutboxEmail.objects.filter(metadata__issue=issue.pk)
    left = rows.filter(status="suppressed").count()
    messages.success(request, f"Issue “{issue.title}” queued for {rows.count() - left} "
                              f"subscriber(s); {left} left the list and get none.")
    return redirect("newsletter")


def thanks(request: HttpRequest) -> HttpResponse:
    return render(request, "shop/thanks.html")


# --- Payments (002) -----------------------------------------------------------------

def _otp_hash(code: str) -> str:
    return salted_hmac("demo-otp", code).hexdigest()


@rate_limited("login")
def payments_login(request: HttpRequest) -> HttpResponse:
    form = LoginForm.from_request(request)
    if request.method == "POST" and form.is_valid():
        user = authenticate(request, username=form.cleaned_data["username"],
                            password=form.cleaned_data["password"])
        if user is None or not user.email:
            form.add_error(None, "Wrong username or password.")
        else:
            code = f"{secrets.randbelow(10**6):06d}"

            def write() -> OneTimePassword:
                otp = OneTimePassword.objects.create(
                    user=user, code_hash=_otp_hash(code), submission=form.key,
                    expires_at=timezone.now() + timedelta(minutes=OTP_MINUTES))
                # mode "now": the person is waiting for this mail, quick retries in the request.
                kipekee.send("emails/otp", to=user.email, mode="now", idempotency_key=f"demo-otp:{otp.pk}",
                             context={"code": code, "minutes": OTP_MINUTES, "attempts": OTP_ATTEMPTS})
                return otp

            try:  # the form sent twice: the first code stands, no second mail
                otp = once(OneTimePassword, form.key, write, user=user)
            except AlreadySent:
                form.add_error(None, ALREADY_SENT)
            else:
                receipt = kipekee.Receipt(OutboxEmail.objects.get(idempotency_key=f"demo-otp:{otp.pk}"),
                                          created=False)
                request.session["otp"] = otp.pk
                if receipt.sent:
                    messages.success(request, f"A sign-in code was sent to {user.email} (via {receipt.provider}).")
                else:
                    messages.warning(request, f"The sign-in code is delayed ({receipt.status}): {receipt.error}")
                return redirect("payments_code")
    return render(request, "shop/payments_login.html", {"form": form})


def _usable_codes() -> models.QuerySet[OneTimePassword]:
    return OneTimePassword.objects.filter(used=False, attempts__lt=OTP_ATTEMPTS,
                                          expires_at__gt=timezone.now())


def payments_code(request: HttpRequest) -> HttpResponse:
    otp = OneTimePassword.objects.filter(pk=request.session.get("otp"), used=False).first()
    if otp is None:
        return redirect("payments_login")
    form = CodeForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        right = constant_time_compare(_otp_hash(form.cleaned_data["code"]), otp.code_hash)
        # One conditional UPDATE counts the attempt and, for the right code, uses the code
        # up: of parallel guesses none shares an attempt, and of parallel submissions of
        # the right code exactly one finds it unused and signs in.
        changed = _usable_codes().filter(pk=otp.pk).update(
            attempts=F("attempts") + 1, **({"used": True} if right else {}))
        if not changed:
            # (The session is left as it is: a parallel winner may have replaced it.)
            messages.error(request, "That code expired, was used, or was tried too many times: "
                                    "sign in again.")
            return redirect("payments_login")
        if right:
            login(request, otp.user)
            del request.session["otp"]
            return redirect("payments")
        left = OTP_ATTEMPTS - otp.attempts - 1
        form.add_error("code", f"Wrong code; {left} attempt{'s' if left != 1 else ''} left.")
    return render(request, "shop/payments_code.html", {"form": form, "otp": otp})


@login_required(login_url="payments_login")
def payments(request: HttpRequest) -> HttpResponse:
    form = NoticeForm.from_request(request)
    if request.method == "POST" and form.is_valid():
        data = form.cleaned_data
        # The form's key makes the outbox row's: the form sent twice is one notification.
        receipt = kipekee.send("emails/notice", to=data["to"],
                               idempotency_key=f"demo-notice:{request.user.pk}:{form.key}",
                               context={"notice_subject": data["subject"], "notice_body": data["body"]})
        return redirect(f"{request.path}?notice={receipt.id}")
    sent = request.GET.get("notice", "")
    notice = (OutboxEmail.objects.filter(template="emails/notice", pk=sent).first()
              if sent.isdigit() else None)
    return render(request, "shop/payments.html", {
        "form": form, "notice": notice,
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
    owner = visitor(request)
    form = OrderForm.from_request(request)
    if request.method == "POST" and form.is_valid():
        if form.is_spam:
            return render(request, "shop/thanks.html")

        def write() -> Order:
            order = form.to_model(owner)
            order.save()
            kipekee.notify("order.created", order)  # mode="queue": the engine sends it
            return order

        try:
            order = once(Order, form.key, write, owner=owner)
        except AlreadySent:
            form.add_error(None, ALREADY_SENT)
        else:
            return redirect("order", order.pk)
    return render(request, "shop/market.html", {
        "form": form, "orders": Order.objects.filter(owner=owner).order_by("-id")[:20]})


def order(request: HttpRequest, pk: int) -> HttpResponse:
    order = owned(request, Order, pk)
    return render(request, "shop/order.html", {
        "order": order, "rows": OutboxEmail.objects.for_object(order).order_by("id"),
        "actions": [a for a, (sources, _, _) in TRANSITIONS.items() if order.status in sources]
        + ([] if order.paid or order.status == Order.Status.CANCELLED else ["pay"]),
    })


@require_POST
def order_action(request: HttpRequest, pk: int, action: str) -> HttpResponse:
    mine = Order.objects.filter(pk=owned(request, Order, pk).pk)
    with transaction.atomic():
        if action == "pay":
            changed = mine.filter(paid=False).exclude(status=Order.Status.CANCELLED).update(paid=True)
            event = "order.paid"
        elif action in TRANSITIONS:
            sources, target, event = TRANSITIONS[action]
            # One conditional UPDATE: two clicks cannot both move the order (nor mail twice).
            changed = mine.filter(status__in=sources).update(status=target)
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
    owner = visitor(request)
    form = BookingForm.from_request(request)
    if request.method == "POST" and form.is_valid():
        if form.is_spam:
            return render(request, "shop/thanks.html")

        def write() -> Booking:
            # The booking, its reminder (Booking follows booking.reminder) and its ticket
            # commit together or not at all: a seat lost to a race sends no ticket.
            booking = form.to_model(owner)
            booking.save()
            if booking.status == Booking.Status.CONFIRMED:
                kipekee.notify("booking.confirmed", booking)
            else:
                kipekee.notify("booking.payment_failed", booking)
            return booking

        try:
            booking = once(Booking, form.key, write, owner=owner)
        except AlreadySent:
            form.add_error(None, ALREADY_SENT)
        except IntegrityError:
            # The database's one-booking-per-seat constraint: someone else has this seat.
            seat = form.cleaned_data["seat"]
            if not Booking.objects.filter(show=form.cleaned_data["show"], seat=seat,
                                          status=Booking.Status.CONFIRMED).exists():
                raise
            form.add_error("seat", f"Seat {seat} is already taken for this show: please choose another.")
        else:
            return redirect("booking", booking.pk)
    return render(request, "shop/cinema.html", {"form": form})


def booking(request: HttpRequest, pk: int) -> HttpResponse:
    booking = owned(request, Booking, pk)
    return render(request, "shop/booking.html", {
        "booking": booking, "rows": OutboxEmail.objects.for_object(booking).order_by("id")})


@require_POST
def fast_forward(request: HttpRequest, pk: int) -> HttpResponse:
    """Demo only: move this booking's waiting reminder to now, as if 24 h had passed."""
    booking = owned(request, Booking, pk)
    waiting = notifications.rows("booking.reminder", booking).filter(status__in=("queued", "deferred"))
    moved = [row_pk for row_pk in waiting.values_list("pk", flat=True)
             if outbox.reschedule(row_pk, timezone.now())]
    if moved:
        wake(moved)  # the engine was asleep until the old due time
        messages.success(request, "Time moved forward: the reminder is due now.")
    else:
        messages.error(request, "No reminder is waiting for this booking.")
    return redirect("booking", pk)
