"""Compose: templates and bodies → a validated Django message, then into the outbox.

``Email("orders/confirmation", to=..., context=...)`` renders
``orders/confirmation.subject.txt``, ``orders/confirmation.html`` and, if present,
``orders/confirmation.txt``. The HTML is autoescaped; the subject and text are not (they
are not HTML). With ``STRICT_TEMPLATES`` (the default), a variable the context lacks is an
error here, at the call site — not a blank in a customer's inbox. ``{% if x %}`` and
``{{ x|default:"…" }}`` still work with a missing ``x``.

The HTML gets its ``<style>`` rules inlined into ``style=""`` attributes (css-inline: most
mail clients drop ``<style>``), and when there is no text template the text part is made
from the HTML (inscriptis: tables laid out, links kept, hidden preheaders left out), so
no message goes out HTML-only. ``language="sw"`` renders everything under
``translation.override("sw")``. Inline images (``attach_inline`` or the ``{% qr_code %}``
and ``{% inline_image %}`` tags of ``{% load kipekee %}``) become ``cid:`` parts.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import mimetypes
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType
from typing import TYPE_CHECKING, Any

import css_inline
from asgiref.sync import sync_to_async
from django.template import Context, Engine, TemplateDoesNotExist, loader
from django.template.backends.django import Template as DjangoBackendTemplate
from django.template.base import VariableNode
from django.utils import translation
from inscriptis import get_text
from inscriptis.css_profiles import CSS_PROFILES
from inscriptis.model.config import ParserConfig

from . import conf, lists
from .dispatch import Receipt, submit, submit_many
from .exceptions import InvalidMessage, TemplateError
from .message import RelatedMessage, inline_part
from .options import SendOptions
from .outbox import NewEmail

if TYPE_CHECKING:
    from django.db.models import Model

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


def inline_css(html: str) -> str:
    """Move ``<style>`` rules into ``style=""`` attributes, as mail clients need.

    Remote stylesheets are never fetched (rendering must not depend on the network).
    """
    if "<style" not in html.lower():
        return html  # nothing to inline: leave fragments exactly as written
    return css_inline.inline(html, load_remote_stylesheets=False)


def html_to_text(html: str) -> str:
    """The plain-text part for an HTML body: layout kept, links as ``[text](url)``."""
    config = ParserConfig(css=CSS_PROFILES["strict"], display_links=True, display_images=True)
    lines = [line.rstrip() for line in get_text(html, config).strip().splitlines()]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class InlineImage:
    filename: str
    content: bytes
    mimetype: str
    cid: str


#: The Email whose templates are being rendered, for the ``{% load kipekee %}`` tags.
_composing: ContextVar[Email | None] = ContextVar("kipekee_composing", default=None)


def composing() -> Email:
    """The :class:`Email` being rendered; ``TemplateError`` outside of one."""
    email = _composing.get()
    if email is None:
        raise TemplateError(
            "This tag adds a part to an email: it works only in a template rendered by "
            "kipekee.Email / kipekee.send / kipekee.notify."
        )
    return email


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
        language: str | None = None,
        event: str = "",
        target: Model | None = None,
        lane: str | None = None,
        mailing_list: str = "",
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
        # Rendered under translation.override(language); None keeps the active language.
        self.language = language
        # The notification event and business object the outbox row is linked to.
        self.event = event
        self.target = target
        # The outbox lane (KIPEKEE["LANES"]); None: "transactional" from send() (but
        # "bulk" for list mail), "bulk" from send_many().
        self.lane = lane
        # A MailingList key: one recipient, the unsubscribe headers and the template's
        # ``unsubscribe_url``, and not sent to who left that list (kipekee.lists).
        self.mailing_list = mailing_list
        # None: KIPEKEE["STRICT_TEMPLATES"]; previews render strictly whatever it says.
        self.strict: bool | None = None
        self._links: tuple[tuple[str, str], lists.Links] | None = None
        self._inline: dict[str, InlineImage] = {}
        self._rendered_inline: dict[str, InlineImage] = {}

    def attach_inline(self, filename: str, content: bytes, mimetype: str | None = None) -> str:
        """Add an inline part and return its Content-ID: use it as ``<img src="cid:…">``.

        The same content twice is one part (a logo used in header and footer).
        """
        image = self._inline_image(filename, content, mimetype)
        self._inline.setdefault(image.cid, image)
        return image.cid

    def _add_rendered_inline(self, filename: str, content: bytes, mimetype: str | None) -> str:
        # Parts added by template tags are redone on every render (no duplicates).
        image = self._inline_image(filename, content, mimetype)
        if image.cid not in self._inline:
            self._rendered_inline.setdefault(image.cid, image)
        return image.cid

    @staticmethod
    def _inline_image(filename: str, content: bytes, mimetype: str | None) -> InlineImage:
        if not isinstance(content, bytes):
            raise InvalidMessage(f"Inline part {filename!r}: content must be bytes.")
        mimetype = mimetype or mimetypes.guess_type(filename)[0] or "application/octet-stream"
        # Named by its content: stable across renders and resends of the same message.
        digest = hashlib.sha256(mimetype.encode() + b"\0" + content).hexdigest()[:24]
        return InlineImage(filename=filename, content=content, mimetype=mimetype,
                           cid=f"{digest}@kipekee")

    @property
    def inline_images(self) -> list[InlineImage]:
        return [*self._inline.values(), *self._rendered_inline.values()]

    def attach(self, filename: str, content: bytes | str, mimetype: str | None = None) -> Email:
        self.attachments.append((filename, content, mimetype))
        return self

    @contextlib.contextmanager
    def _rendering(self) -> Iterator[None]:
        self._rendered_inline = {}
        token = _composing.set(self)
        try:
            if self.language:
                with translation.override(self.language):
                    yield
            else:
                yield
        finally:
            _composing.reset(token)

    def render(self) -> tuple[str, str | None, str | None]:
        """``(subject, text, html)`` with the templates rendered, CSS inlined into the HTML,
        and the text made from the HTML when there is no text template."""
        with self._rendering():
            subject, text, html = self._render_templates()
            if html is not None:
                html = inline_css(html)
                if text is None:
                    text = html_to_text(html)
        return subject, text, html

    def _render_templates(self) -> tuple[str, str | None, str | None]:
        subject, text, html = self.subject, self.text, self.html
        if self.template is not None:
            strict = conf.get().strict_templates if self.strict is None else self.strict
            name = self.template
            context = self.context
            links = self.list_links()
            if links is not None:  # the footer's link; the caller's own value wins
                context = {"unsubscribe_url": links.url, **context}
            if subject is None:
                subject = render(f"{name}.subject.txt", context, autoescape=False,
                                 strict=strict).strip()
            if html is None and _template_exists(f"{name}.html"):
                html = render(f"{name}.html", context, autoescape=True, strict=strict)
            if text is None and _template_exists(f"{name}.txt"):
                text = render(f"{name}.txt", context, autoescape=False, strict=strict)
            if html is None and text is None:
                raise TemplateError(
                    f"Email template {name!r}: neither {name}.html nor {name}.txt exists."
                )
        assert subject is not None
        return subject, text, html

    def list_links(self) -> lists.Links | None:
        """The unsubscribe link and headers of a list message (None for other mail),
        made once per list and recipient: the headers and the body carry one token."""
        if not self.mailing_list:
            return None
        recipients = [*self.to, *self.cc, *self.bcc]
        if len(recipients) != 1:
            raise InvalidMessage(
                f"A message to mailing list {self.mailing_list!r} goes to one recipient (its "
                f"unsubscribe link names them), not {len(recipients)}: send one per "
                "subscriber.")
        given = sorted(name for name in self.headers if name.lower() in lists.HEADERS)
        if given:
            raise InvalidMessage(
                f"A message to mailing list {self.mailing_list!r} gets its {', '.join(given)} "
                "header from Kipekee: do not set it yourself.")
        wanted = (self.mailing_list, recipients[0])
        if self._links is None or self._links[0] != wanted:
            self._links = (wanted, lists.links(*wanted))
        return self._links[1]

    def build(self) -> RelatedMessage:
        """The Django message, rendered (validation happens when it is enqueued)."""
        subject, text, html = self.render()
        links = self.list_links()
        message = RelatedMessage(
            subject=subject, body=text if text is not None else html or "",
            from_email=self.from_email, to=self.to, cc=self.cc, bcc=self.bcc,
            reply_to=self.reply_to,
            headers=self.headers if links is None else {**self.headers, **links.headers},
        )
        if text is None:
            message.content_subtype = "html"
        elif html is not None:
            message.attach_alternative(html, "text/html")
        for filename, content, mimetype in self.attachments:
            message.attach(filename, content, mimetype)
        for image in self.inline_images:
            message.attach(inline_part(image.filename, image.content, image.mimetype, image.cid))
        return message

    def send(self, *, using: str | None = None) -> Receipt:
        """Write to the outbox in the current transaction; deliver as the mode says."""
        return submit(self.build(), self.send_options(), using=using)

    def send_options(self, *, mode: str | None = None, lane: str | None = None) -> SendOptions:
        """How this email is sent; ``mode`` and ``lane`` unless it names its own (list
        mail waits behind transactional mail unless it names its lane)."""
        return SendOptions(
            mode=self.mode or mode,
            lane=self.lane or lane or (conf.BULK if self.mailing_list else conf.TRANSACTIONAL),
            idempotency_key=self.idempotency_key, send_at=self.send_at,
            provider=self.provider, template=self.template or "", metadata=self.metadata,
            event=self.event, target=self.target, mailing_list=self.mailing_list,
        )

    def new_email(self, *, mode: str, lane: str) -> NewEmail:
        """This email built, as the outbox writes it; ``mode`` and ``lane`` unless it
        names its own."""
        return NewEmail(message=self.build(), options=self.send_options(mode=mode, lane=lane))

    async def asend(self, *, using: str | None = None) -> Receipt:
        """:meth:`send` for async code (see :func:`asend`)."""
        return await sync_to_async(self.send)(using=using)


def send(template: str | None = None, **kwargs: Any) -> Receipt:
    """Compose and send in one call: ``kipekee.send("welcome", to=user.email, context=...)``."""
    return Email(template, **kwargs).send()


async def asend(template: str | None = None, **kwargs: Any) -> Receipt:
    """:func:`send` for async views: ``receipt = await kipekee.asend("welcome", ...)``.

    The same call and the same receipt. Rendering, the outbox write and an in-request
    delivery (modes ``now``, ``hybrid``) run in a thread, as Django's own async ORM
    methods do (``sync_to_async``, thread-sensitive: under ASGI, the request's own
    thread, where its database connection lives), so the event loop goes on serving
    while the provider answers.
    """
    return await sync_to_async(send)(template, **kwargs)


def send_many(emails: Iterable[Email], *, lane: str = conf.BULK, mode: str = "queue",
              using: str | None = None) -> list[Receipt]:
    """Send many emails at once: one transaction, a fixed number of queries; their
    receipts, in order.

    ``kipekee.send_many(Email("newsletter/november", to=s.email, context={"s": s})
    for s in subscribers)``. Each email is rendered and checked as ``send()`` would,
    all before anything is written: an ``InvalidMessage`` (or ``TemplateError``) names
    the first bad one by its position and nothing is sent. Idempotency keys hold as for
    ``send()`` (a key already in the outbox gives its first row, ``created=False``; a
    key twice in ``emails`` is written once), suppressed recipients are taken off.

    They wait in ``lane`` (``"bulk"``: claimed after transactional mail, never starved)
    unless an email names its own. ``mode``: ``"queue"`` (engines deliver them) or
    ``"hybrid"`` (delivered in this thread after commit, through a provider's batch API
    where it has one; a transient failure is left to an engine), unless an email names
    its own.
    """
    items = []
    for index, email in enumerate(emails):
        if not isinstance(email, Email):
            raise InvalidMessage(f"Message {index}: send_many takes kipekee.Email objects, "
                                 f"not {type(email).__name__}.")
        try:
            items.append(email.new_email(mode=mode, lane=lane))
        except InvalidMessage as exc:
            raise type(exc)(f"Message {index}: {exc}") from exc
    return submit_many(items, using=using)
