"""System checks: configuration problems reported at start, each with an id and a hint."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.checks import CheckMessage, Error, Warning, register

from . import conf
from .exceptions import ConfigurationError


@register("kipekee")
def check_settings(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    try:
        parsed = conf.parse(getattr(settings, "KIPEKEE", {}))
    except ConfigurationError as exc:
        return [Error(str(exc), hint="See the KIPEKEE section of Kipekee's README.",
                      id="kipekee.E001")]
    messages: list[CheckMessage] = []
    if not parsed.providers:
        messages.append(Warning(
            'KIPEKEE["PROVIDERS"] is empty: emails will be queued but never delivered.',
            hint='Add at least one provider, e.g. {"BACKEND": '
                 '"kipekee.backends.smtp.EmailBackend", "OPTIONS": {"host": ...}}.',
            id="kipekee.W001"))
    from . import providers

    for p in parsed.providers:
        try:
            cls = providers._backend_class(p.backend)
        except ConfigurationError as exc:
            messages.append(Error(f'KIPEKEE["PROVIDERS"][{p.alias!r}]: {exc}',
                                  hint="BACKEND must be the dotted path of a Django email "
                                       "backend that delivers (not Kipekee's drop-in).",
                                  id="kipekee.E002"))
            continue
        # A backend may declare the request limit its service documents.
        documented = getattr(cls, "documented_rate", None)
        if documented and not p.rate:
            messages.append(Warning(
                f'KIPEKEE["PROVIDERS"][{p.alias!r}] has no LIMITS["RATE"]; the service '
                f"allows {documented} requests, and a burst beyond it is answered 429.",
                hint=f'Add "LIMITS": {{"RATE": "{documented}"}} to the provider.',
                id="kipekee.W002"))
    return messages
