"""The public forms: validated on the server, with a honeypot field against bots."""

from __future__ import annotations

from typing import Any

from django import forms
from django.core.exceptions import ValidationError

from .models import Booking, Order, QuoteRequest, Show

CV_MAX_BYTES = 2 * 1024 * 1024


def single_line(value: str) -> None:
    # A CR/LF in a name ends up in a display name or subject: a header injection attempt.
    if "\r" in value or "\n" in value:
        raise ValidationError("A name must be one line (no line breaks).", code="crlf")


class PublicForm(forms.Form):
    """Adds the honeypot: a field people never see (hidden by CSS, not type=hidden, which
    bots skip) and bots fill in. ``is_spam`` after ``is_valid()``."""

    website = forms.CharField(required=False, label="Leave this empty",
                              widget=forms.TextInput(attrs={"autocomplete": "off", "tabindex": "-1"}))

    @property
    def is_spam(self) -> bool:
        return bool(self.data.get("website"))


class QuoteForm(PublicForm):
    name = forms.CharField(max_length=100, validators=[single_line])
    email = forms.EmailField()
    tour = forms.ChoiceField(choices=[(t, t) for t in (
        "Serengeti safari, 5 days", "Kilimanjaro, Machame route", "Zanzibar beaches")])
    travellers = forms.IntegerField(min_value=1, max_value=20)
    message = forms.CharField(required=False, max_length=2000, widget=forms.Textarea(attrs={"rows": 3}))

    def to_model(self) -> QuoteRequest:
        data = self.cleaned_data
        return QuoteRequest(name=data["name"], email=data["email"], tour=data["tour"],
                            travellers=data["travellers"], message=data["message"])


class ApplicationForm(PublicForm):
    name = forms.CharField(max_length=100, validators=[single_line])
    email = forms.EmailField()
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


class NewsletterForm(PublicForm):
    email = forms.EmailField()


class OrderForm(PublicForm):
    customer_name = forms.CharField(max_length=100, validators=[single_line], label="Name")
    customer_email = forms.EmailField(label="Email")
    total = forms.DecimalField(min_value=1, max_value=10000, decimal_places=2)

    def to_model(self) -> Order:
        return Order(**{k: self.cleaned_data[k] for k in ("customer_name", "customer_email", "total")})


class BookingForm(PublicForm):
    show = forms.ModelChoiceField(queryset=Show.objects.order_by("starts_at"))
    name = forms.CharField(max_length=100, validators=[single_line])
    email = forms.EmailField()
    seat = forms.RegexField(regex=r"^[A-P][0-9]{1,2}$", max_length=3, help_text="e.g. F7",
                            error_messages={"invalid": "A seat is a row letter and a number, e.g. F7."})
    card_declined = forms.BooleanField(required=False, label="Simulate a declined card")

    def to_model(self) -> Booking:
        data = self.cleaned_data
        status = Booking.Status.PAYMENT_FAILED if data["card_declined"] else Booking.Status.CONFIRMED
        return Booking(show=data["show"], name=data["name"], email=data["email"],
                       seat=data["seat"].upper(), status=status)


class LoginForm(forms.Form):
    username = forms.CharField(max_length=150)
    password = forms.CharField(widget=forms.PasswordInput)


class CodeForm(forms.Form):
    code = forms.RegexField(regex=r"^\d{6}$", max_length=6,
                            error_messages={"invalid": "The code has six digits."})


class NoticeForm(forms.Form):
    to = forms.EmailField(initial="ops@payments.example")
    subject = forms.CharField(max_length=120, initial="Settlement report ready")
    body = forms.CharField(widget=forms.Textarea(attrs={"rows": 3}),
                           initial="The daily settlement report is ready.")
