"""Compose: templates and bodies → a validated Django message, then into the outbox.

``Email("orders/confirmation", to=..., context=...)`` renders
``orders/confirmation.subject.txt``, ``orders/confirmation.html`` and, if present,
``orders/confirmation.txt``. The HTML is autoescaped; the subject and text are not (they
are not HTML). With ``STRICT_TEMPLATES`` (the default), a variable the context lacks is an
error here, at the call site — not a blank in a customer's inbox. ``{% if x %}`` and
``{{ x|default:"…" }}`` still work with a missing ``x``.
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from types import TracebackType
from typing import Any

from django.core.mail import EmailMultiAlternatives
from django.template import Context, Engine, TemplateDoesNotExist, loader
from django.template.backends.django import Template as DjangoBackendTemplate
from django.template.base import VariableNode

from . import conf
from .dispatch import Receipt, submit
from .exceptions import InvalidMessage, TemplateError

Attachment = tuple[str, bytes | str, str | None]


class _MissingVariable(Exception):
    pass


class _Missing(str):
    """``string_if_invalid`` for strict rendering.

    Empty and falsy, so ``{% if %}`` and the ``default`` filter treat it as absent, but it
    refuses to be written into the output.
    """

    def __str__(self) -> str:
        raise _MissingVariable()


_MISSING = _Missing()
_strict_engines: weakref.WeakKeyDictionary[Engine, Engine] = weakref.WeakKeyDictionary()


def _strict(engine: Engine) -> Engine:
    strict = _strict_engines.get(engine)
    if strict is None:
        # A shallow copy shares the loaders (and their cache) but not string_if_invalid.
        strict = copy.copy(engine)
        strict.string_if_invalid = _MISSING
        _strict_engines[engine] = strict
    return strict


def _missing_name(tb: TracebackType | None) -> str:
    """The ``{{ variable }}`` whose rendering raised, found in the traceback."""
    name = ""
    while tb is not None:
        node = tb.tb_frame.f_locals.get("self")
        if isinstance(node, VariableNode):
            name = node.filter_expression.token
        tb = tb.tb_next
    return name


def render(name: str, context: Mapping[str, Any], *, autoescape: bool, strict: bool) -> str:
    """Render template ``name``; raise ``TemplateError`` if it is missing (or, when
    ``strict``, if it uses a variable the context does not have)."""
    try:
        template = loader.get_template(name)
    except TemplateDoesNotExist as exc:
        raise TemplateError(f"Email template {name!r} not found.") from exc
    if not isinstance(template, DjangoBackendTemplate):
        # Another engine (Jinja2…): it has its own strictness settings (StrictUndefined).
        return template.render(dict(context))
    base = template.template
    if strict:
        base = copy.copy(base)
        base.engine = _strict(base.engine)
    try:
        return base.render(Context(dict(context), autoescape=autoescape))
    except _MissingVariable as exc:
        variable = _missing_name(exc.__traceback__)
        raise TemplateError(
            f"Email template {name!r} uses {{{{ {variable} }}}}, which the context does not "
            "define (strict templates: pass it, or use |default)." if variable else
            f"Email template {name!r} uses a variable the context does not define."
        ) from None
    except TemplateDoesNotExist as exc:  # {% include %} / {% extends %} of a missing file
        raise TemplateError(f"Email template {name!r}: {exc} not found.") from exc


def _template_exists(name: str) -> bool:
    try:
        loader.get_template(name)
    except TemplateDoesNotExist:
        return False
    return True


def _addresses(field: str, value: str | Iterable[str] | None) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return list(value)


class Email:
    """An email to compose and send through the outbox.

    Either name a ``template`` (``<template>.subject.txt``, ``.html``, optional ``.txt``)
    and give a ``context``, or give ``subject`` and ``text`` and/or ``html`` directly.
    ``send()`` writes it to the outbox in the current transaction and returns a
    :class:`~kipekee.dispatch.Receipt`.
    """

    def __init__(
        self,
        template: str | None = None,
        *,
        to: str | Sequence[str],
        context: Mapping[str, Any] | None = None,
        subject: str | None = None,
        text: str | None = None,
        html: str | None = None,
        from_email: str | None = None,
        cc: str | Sequence[str] | None = None,
        bcc: str | Sequence[str] | None = None,
        reply_to: str | Sequence[str] | None = None,
        headers: Mapping[str, str] | None = None,
        attachments: Iterable[Attachment] = (),
        idempotency_key: str | None = None,
        mode: str | None = None,
        send_at: datetime | None = None,
        provider: str = "",
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        if template is None and subject is None:
            raise InvalidMessage("Give a template name, or a subject and a body.")
        if template is None and text is None and html is None:
            raise InvalidMessage("Give a template name, or text and/or html for the body.")
        self.template = template
        self.context = dict(context or {})
        self.subject = subject
        self.text = text
        self.html = html
        self.from_email = from_email
        self.to = _addresses("to", to)
        self.cc = _addresses("cc", cc)
        self.bcc = _addresses("bcc", bcc)
        self.reply_to = _addresses("reply_to", reply_to)
        self.headers = dict(headers or {})
        self.attachments: list[Attachment] = list(attachments)
        self.idempotency_key = idempotency_key
        self.mode = mode
        self.send_at = send_at
        self.provider = provider
        self.metadata = dict(metadata or {})

    def attach(self, filename: str, content: bytes | str, mimetype: str | None = None) -> Email:
        self.attachments.append((filename, content, mimetype))
        return self

    def render(self) -> tuple[str, str | None, str | None]:
        """``(subject, text, html)`` with the templates rendered."""
        subject, text, html = self.subject, self.text, self.html
        if self.template is not None:
            strict = conf.get().strict_templates
            name = self.template
            if subject is None:
                subject = render(f"{name}.subject.txt", self.context, autoescape=False,
                                 strict=strict).strip()
            if html is None and _template_exists(f"{name}.html"):
                html = render(f"{name}.html", self.context, autoescape=True, strict=strict)
            if text is None and _template_exists(f"{name}.txt"):
                text = render(f"{name}.txt", self.context, autoescape=False, strict=strict)
            if html is None and text is None:
                raise TemplateError(
                    f"Email template {name!r}: neither {name}.html nor {name}.txt exists."
                )
        assert subject is not None
        return subject, text, html

    def build(self) -> EmailMultiAlternatives:
        """The Django message, rendered (validation happens when it is enqueued)."""
        subject, text, html = self.render()
        message = EmailMultiAlternatives(
            subject=subject, body=text if text is not None else html or "",
            from_email=self.from_email, to=self.to, cc=self.cc, bcc=self.bcc,
            reply_to=self.reply_to, headers=self.headers,
        )
        if text is None:
            message.content_subtype = "html"
        elif html is not None:
            message.attach_alternative(html, "text/html")
        for filename, content, mimetype in self.attachments:
            message.attach(filename, content, mimetype)
        return message

    def send(self, *, using: str | None = None) -> Receipt:
        """Write to the outbox in the current transaction; deliver as the mode says."""
        return submit(
            self.build(), mode=self.mode, idempotency_key=self.idempotency_key,
            send_at=self.send_at, provider=self.provider, template=self.template or "",
            metadata=self.metadata, using=using,
        )


def send(template: str | None = None, **kwargs: Any) -> Receipt:
    """Compose and send in one call: ``kipekee.send("welcome", to=user.email, context=...)``."""
    return Email(template, **kwargs).send()
