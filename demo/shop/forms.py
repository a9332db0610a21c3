"""The public forms: validated on the server with the rules Kipekee sends by
(:mod:`kipekee.forms`), sent once (:class:`OnceForm`), with a honeypot field against bots."""

from __future__ import annotations

import uuid
from typing import Any, Self

from django import forms
from django.core.exceptions import ValidationError
from django.http import HttpRequest

from kipekee.forms import EmailAddressField, HeaderTextField

from .models import Booking, Order, QuoteRequest, Show

CV_MAX_BYTES = 2 * 1024 * 1024
# Every name may end up in a subject or a display name: one line, as Kipekee requires.
NAME_ERRORS = {"line_break": "A name must be one line (no line breaks)."}


class OnceForm(forms.Form):
    """A form that is sent once. Each rendering carries a fresh key (a UUID in a hidden
    field); the view stores it on the row the form creates, where it is unique. Sent twice
    — a double click, a reload, two requests at once — the second finds the first row
    (``IntegrityError``, then a lookup by key) and shows its result: one row, one mail."""

    submission = forms.UUIDField(widget=forms.HiddenInput, initial=uuid.uuid4, error_messages={
        "required": "This form has expired: reload the page and send it again.",
        "invalid": "This form has expired: reload the page and send it again."})

    @property
    def key(self) -> uuid.UUID:
        value: uuid.UUID = self.cleaned_data["submission"]
        return value

    @classmethod
    def from_request(cls, request: HttpRequest) -> Self:
        """Bound to a POST, or fresh with a new key. The session remembers the key of the
        form it was last shown, too: a POST without the hidden field (a script that sends
        only the fields it knows about) counts as a submission of that form, so sending it
        twice is still one submission. A browser, which sends the field, is unaffected
        (two tabs, two forms, two keys)."""
        slot = f"form-key:{cls.__name__}"
        if request.method == "POST":
            data = request.POST.copy()
            if not data.get("submission") and request.session.get(slot):
                data["submission"] = request.session[slot]
            return cls(data, request.FILES or None)
        key = uuid.uuid4()
        request.session[slot] = str(key)
        return cls(initial={"submission": key})


class Honeypot(forms.Form):
    """A field people never see (hidden by CSS, not type=hidden, which bots skip) and bots
    fill in. ``is_spam`` after ``is_valid()``."""

    website = forms.CharField(required=False, label="Leave this empty",
                              widget=forms.TextInput(attrs={"autocomplete": "off", "tabindex": "-1"}))

    @property
    def is_spam(self) -> bool:
        return bool(self.data.get("website"))


class PublicForm(Honeypot, OnceForm):
    """A public form that sends mail: the honeypot and the submission key."""


def name_field(**kwargs: Any) -> HeaderTextField:
    return HeaderTextField(max_length=100, error_messages=NAME_ERRORS, **kwargs)


class QuoteForm(PublicForm):
    name = name_field()
    email = EmailAddressField()
    tour = forms.ChoiceField(choices=[(t, t) for t in (
        "Serengeti safari, 5 days", "Kilimanjaro, Machame route", "Zanzibar beaches")])
    travellers = forms.IntegerField(min_value=1, max_value=20)
    message = forms.CharField(required=False, max_length=2000, widget=forms.Textarea(attrs={"rows": 3}))

    def to_model(self, owner: str) -> QuoteRequest:
        data = self.cleaned_data
        return QuoteRequest(name=data["name"], email=data["email"], tour=data["tour"],
                            travellers=data["travellers"], message=data["message"],
                            owner=owner, submission=self.key)


class ApplicationForm(PublicForm):
    name = name_field()
    email = EmailAddressField()
    position = forms.ChoiceField(choices=[(p, p) for p in ("Tour guide", "Driver", "Office")])
    cv = forms.FileField(label="CV (PDF)")

    def clean_cv(self) -> Any:
        cv = self.cleaned_data["cv"]
        if cv.size > CV_MAX_BYTES:
            raise ValidationError("The CV must be at most 2 MB.")
        head = cv.read(5)
        cv.seek(0)
        if head != b"%PDF-":
            raise ValidationError("The CV must be a PDF file.")
        return cv


class NewsletterForm(Honeypot):
    """No submission key: the mailbox is the key (one subscriber per canonical address,
    unique), which also covers a second signup from a fresh form."""

    email = EmailAddressField()


class IssueForm(OnceForm):
    """An issue of the newsletter (demo: staff, or anyone with DEBUG on)."""

    title = HeaderTextField(max_length=200, initial="The great migration is on",
                            error_messages=NAME_ERRORS)


class OrderForm(PublicForm):
    customer_name = name_field(label="Name")
    customer_email = EmailAddressField(label="Email")
    total = forms.DecimalField(min_value=1, max_value=10000, decimal_places=2)

    def to_model(self, owner: str) -> Order:
        return Order(**{k: self.cleaned_data[k] for k in ("customer_name", "customer_email", "total")},
                     owner=owner, submission=self.key)


class BookingForm(PublicForm):
    show = forms.ModelChoiceField(queryset=Show.objects.order_by("starts_at"))
    name = name_field()
    email = EmailAddressField()
    seat = forms.RegexField(regex=r"^[A-Pa-p][0-9]{1,2}$", max_length=3, help_text="e.g. F7",
                            error_messages={"invalid": "A seat is a row letter and a number, e.g. F7."})
    card_declined = forms.BooleanField(required=False, label="Simulate a declined card")

    def clean_seat(self) -> str:
        # One spelling per seat ("f7" is F7), as the one-booking-per-seat constraint needs.
        seat: str = self.cleaned_data["seat"].upper()
        return seat

    def to_model(self, owner: str) -> Booking:
        data = self.cleaned_data
        status = Booking.Status.PAYMENT_FAILED if data["card_declined"] else Booking.Status.CONFIRMED
        return Booking(show=data["show"], name=data["name"], email=data["email"],
                       seat=data["seat"], status=status, owner=owner, submission=self.key)


class LoginForm(OnceForm):
    username = forms.CharField(max_length=150)
    password = forms.CharField(widget=forms.PasswordInput)


class CodeForm(forms.Form):
    code = forms.RegexField(regex=r"^\d{6}$", max_length=6,
                            error_messages={"invalid": "The code has six digits."})


class NoticeForm(OnceForm):
    to = EmailAddressField(initial="ops@payments.example")
    subject = HeaderTextField(max_length=120, initial="Settlement report ready",
                              error_messages={"line_break": "A subject must be one line."})
    body = forms.CharField(widget=forms.Textarea(attrs={"rows": 3}),
                           initial="The daily settlement report is ready.")
