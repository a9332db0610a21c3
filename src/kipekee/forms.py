"""Form fields that accept exactly what Kipekee sends, so a form that validated never
leads to ``InvalidMessage`` (a 500) when its values reach ``kipekee.send`` or ``notify``.

::

    from kipekee.forms import EmailAddressField, HeaderTextField

    class QuoteForm(forms.Form):
        name = HeaderTextField(max_length=100)   # goes into the office mail's subject
        email = EmailAddressField()

Built on :mod:`kipekee.validation` (the rules the outbox applies), so the form and the
library cannot disagree. The validators work on any field, model fields included:
``models.EmailField(validators=[validate_address])``.
"""

from __future__ import annotations

from typing import Any

from django import forms
from django.core import validators
from django.core.exceptions import ValidationError
from django.utils.translation import gettext_lazy as _

from .exceptions import InvalidMessage
from .validation import check_address, check_header_text

__all__ = ["EmailAddressField", "HeaderTextField", "validate_address", "validate_header_text"]


def validate_address(value: Any) -> None:
    """A Django validator: ``ValidationError`` (code ``"invalid"``, Django's "Enter a
    valid email address.") unless Kipekee sends to ``value``."""
    try:
        check_address(value)
    except InvalidMessage:
        raise ValidationError(validators.EmailValidator.message, code="invalid",
                              params={"value": value}) from None


_NUL = validators.ProhibitNullCharactersValidator()


def validate_header_text(value: Any) -> None:
    """A Django validator: ``ValidationError`` unless ``value`` can go into a subject or
    header: code ``"line_break"`` for a line break, Django's ``"null_characters_not_allowed"``
    for a NUL."""
    try:
        check_header_text(value)
    except InvalidMessage:
        if "\x00" in str(value):
            raise ValidationError(_NUL.message, code=_NUL.code, params={"value": value}) from None
        raise ValidationError(_("Must be one line (no line breaks)."), code="line_break",
                              params={"value": value}) from None


def _validate_addr_spec(value: Any) -> None:
    validators.validate_email(value)  # the addr-spec Django's EmailField wants, first:
    validate_address(value)  # one error, not the same message twice


class EmailAddressField(forms.EmailField):
    """Django's ``EmailField`` (an addr-spec, ``a@example.com``) that also takes only what
    Kipekee sends to."""

    default_validators = [_validate_addr_spec]


class HeaderTextField(forms.CharField):
    """A ``CharField`` for text that ends up in a subject or header: one line."""

    default_validators = [validate_header_text]

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        # validate_header_text refuses a NUL already, with Django's code and message: the
        # check CharField adds would say it a second time.
        self.validators = [v for v in self.validators
                           if not isinstance(v, validators.ProhibitNullCharactersValidator)]
