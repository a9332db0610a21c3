"""Previews: every registered notification and email template, rendered with sample data.

Declare the sample where the mail is declared. A notification's sample is an example of
the object it is about (its messages' ``to``, ``context`` … callables run on it)::

    register("quote.received", Message("emails/quote_admin", ...), Message(...),
             sample=lambda: QuoteRequest(name="Ann", email="ann@example.com", travellers=2))

and a template sent with ``kipekee.send`` gets its context::

    from kipekee import previews

    previews.register_template("emails/otp", sample=lambda: {"code": "123456", "minutes": 5})

Each message of a notification is one preview (``notification/quote.received/admin``),
each registered template one (``template/emails/otp``). :func:`render` gives what would
go out: subject, addresses, the headers as they go on the wire (a list message's
``List-Unsubscribe`` among them), text, HTML, attachments and the size on the wire. The
sample runs inside a transaction that is rolled back, so it may create rows (an order
with its lines, for templates that follow relations): none stay. Templates render
strictly, whatever ``STRICT_TEMPLATES`` says (a variable missing from the sample is one
missing from somebody's inbox), and the message is checked as the outbox checks it.

The admin shows them (the outbox list's "Previews" button: the HTML in the sandboxed
frame, and a test send to an address, through the outbox); ``manage.py kipekee_render``
renders them all and exits non-zero naming each template that fails, for CI.
"""

from __future__ import annotations

import email
import email.policy
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db import router, transaction
from django.template import engines
from django.template.backends.django import DjangoTemplates

from . import conf, notifications, wire
from .compose import Email
from .dispatch import Receipt, submit
from .exceptions import ConfigurationError
from .message import RelatedMessage, is_inline, make_message_id, validate
from .models import OutboxEmail
from .options import SendOptions

#: Where a template's preview is addressed unless its registration says otherwise.
SAMPLE_TO = "Sample Recipient <recipient@example.com>"


@dataclass(frozen=True)
class Preview:
    """One previewable email: a message of a notification, or a registered template."""

    kind: str  # "notification" or "template"
    name: str  # "quote.received/admin" or "emails/otp"
    template: str
    mailing_list: str = ""
    has_sample: bool = True
    make: Callable[[], Email] = field(repr=False, compare=False, default=lambda: _no_email())  # noqa: PLW0108

    @property
    def key(self) -> str:
        """Unique among all previews, and usable in a URL path."""
        return f"{self.kind}/{self.name}"


def _no_email() -> Email:
    raise ConfigurationError("This preview has no way to make its email.")


@dataclass(frozen=True)
class Part:
    filename: str
    mimetype: str
    size: int
    content_id: str = ""


@dataclass(frozen=True)
class Rendered:
    """A preview rendered: the message as it would go out."""

    preview: Preview
    message: RelatedMessage = field(repr=False)
    subject: str
    text: str | None
    html: str | None
    headers: list[tuple[str, str]]
    attachments: list[Part]
    size: int
    raw: bytes = field(repr=False)
    inline: dict[str, tuple[str, bytes]] = field(repr=False, default_factory=dict)


@dataclass(frozen=True)
class _TemplateSample:
    template: str
    sample: Callable[[], Mapping[str, Any]]
    to: str
    mailing_list: str
    from_email: str | None
    language: str | None


_templates: dict[str, _TemplateSample] = {}


def register_template(template: str, *, sample: Callable[[], Mapping[str, Any]],
                      to: str = SAMPLE_TO, mailing_list: str = "",
                      from_email: str | None = None, language: str | None = None,
                      replace: bool = False) -> None:
    """Declare a sample context for ``template`` (``emails/otp``: its ``.subject.txt``,
    ``.html``, ``.txt``), so it can be previewed like a notification's messages.
    ``mailing_list``: previewed as list mail (with its unsubscribe headers)."""
    if not callable(sample):
        raise ConfigurationError(f"The sample of template {template!r} must be a callable "
                                 "returning the template's context.")
    if template in _templates and not replace:
        raise ConfigurationError(f"Template {template!r} already has a sample.")
    _templates[template] = _TemplateSample(template, sample, to, mailing_list, from_email,
                                           language)


def unregister_template(template: str) -> None:
    _templates.pop(template, None)


def all_previews() -> list[Preview]:
    """Every message of every registered notification, then every registered template."""
    found: list[Preview] = []
    for notification in notifications.registered():
        for message in notification.messages:
            found.append(Preview(
                kind="notification", name=f"{notification.event}/{message.name}",
                template=message.template, mailing_list=message.mailing_list,
                has_sample=notification.sample is not None,
                make=_notification_email(notification, message)))
    for sample in sorted(_templates.values(), key=lambda s: s.template):
        found.append(Preview(kind="template", name=sample.template, template=sample.template,
                             mailing_list=sample.mailing_list, make=_template_email(sample)))
    return found


def get(key: str) -> Preview:
    """The preview with this :attr:`Preview.key`; ``KeyError`` if there is none."""
    for preview in all_previews():
        if preview.key == key:
            return preview
    raise KeyError(key)


def _notification_email(notification: notifications.Notification,
                        message: notifications.Message) -> Callable[[], Email]:
    def make() -> Email:
        if notification.sample is None:
            raise ConfigurationError(
                f"Notification {notification.event!r} has no sample: register(..., "
                "sample=lambda: <an example object>) to preview it.")
        return notifications.email(notification.event, message.name, notification.sample())
    return make


def _template_email(sample: _TemplateSample) -> Callable[[], Email]:
    def make() -> Email:
        return Email(sample.template, to=sample.to, context=dict(sample.sample()),
                     mailing_list=sample.mailing_list, from_email=sample.from_email,
                     language=sample.language)
    return make


# --- rendering --------------------------------------------------------------------------

def _build(preview: Preview, to: str | None) -> RelatedMessage:
    """The preview's message, built from its sample inside a transaction that is then
    rolled back (whatever the sample wrote is gone)."""
    db = router.db_for_write(OutboxEmail)
    with transaction.atomic(using=db):
        try:
            email_ = preview.make()
            if to is not None:  # a test send: to this address only
                email_.to, email_.cc, email_.bcc = [to], [], []
            email_.strict = True
            message = email_.build()
            validate(message)
            wire.check_size(message, conf.get().max_message_size)
        finally:
            transaction.set_rollback(True, using=db)
    return message


def render(preview: Preview) -> Rendered:
    """Render ``preview`` as it would go out. Raises what composing would raise
    (``TemplateError``, ``InvalidMessage``, ``ConfigurationError``, or what the sample
    itself raises)."""
    message = _build(preview, None)
    # The Message-ID the outbox would give it (Django's own would name this host).
    message.extra_headers.setdefault("Message-ID", make_message_id(
        message.from_email or settings.DEFAULT_FROM_EMAIL, conf.get().message_id_domain))
    raw = wire.message_bytes(message)
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    html = str(message.body) if message.content_subtype == "html" else next(
        (str(content) for content, mimetype in message.alternatives
         if mimetype == "text/html"), None)
    text = None if message.content_subtype == "html" else str(message.body)
    parts, inline = [], {}
    for attachment in message.attachments:
        if is_inline(attachment):
            payload = attachment.get_payload(decode=True) or b""
            cid = str(attachment["Content-ID"]).strip("<> ")
            inline[cid] = (attachment.get_content_type(), payload)
            parts.append(Part(attachment.get_filename() or "", attachment.get_content_type(),
                              len(payload), cid))
        elif isinstance(attachment, tuple):
            filename, content, mimetype = attachment
            size = len(content.encode() if isinstance(content, str) else content)
            parts.append(Part(filename or "", mimetype or "application/octet-stream", size))
        else:  # a MIME part given as such
            payload = attachment.get_payload(decode=True) or b""
            parts.append(Part(attachment.get_filename() or "", attachment.get_content_type(),
                              len(payload)))
    return Rendered(
        preview=preview, message=message, subject=str(message.subject), text=text, html=html,
        headers=[(name, str(value)) for name, value in parsed.items()],
        attachments=parts, size=len(raw), raw=raw, inline=inline,
    )


def send_test(preview: Preview, to: str, *, requested_by: str = "") -> Receipt:
    """Send ``preview`` to ``to`` alone, through the outbox (mode ``queue``: an engine
    sends it; the transactional lane: a person waits for it, also for list mail), marked
    as a test: ``[Test]`` before the subject and ``metadata["preview_test"]`` naming the
    preview and who asked."""
    message = _build(preview, to)
    message.subject = f"[Test] {message.subject}"
    return submit(message, SendOptions(
        mode="queue", lane=conf.TRANSACTIONAL, template=preview.template,
        mailing_list=preview.mailing_list,
        metadata={"preview_test": {"preview": preview.key, "by": requested_by}}))


# --- templates without a sample -----------------------------------------------------------

SUBJECT_SUFFIX = ".subject.txt"


def email_templates() -> Iterator[str]:
    """The email templates found in the Django template engines' directories (app
    templates included): every ``<name>.subject.txt``, as ``<name>``."""
    seen: set[str] = set()
    for backend in engines.all():
        if not isinstance(backend, DjangoTemplates):
            continue
        for loader in backend.engine.template_loaders:
            for directory in _dirs(loader):
                root = Path(directory)
                if not root.is_dir():
                    continue
                for path in sorted(root.rglob(f"*{SUBJECT_SUFFIX}")):
                    name = path.relative_to(root).as_posix()[: -len(SUBJECT_SUFFIX)]
                    if name not in seen:
                        seen.add(name)
                        yield name


def _dirs(loader: Any) -> Iterator[str]:
    inner = getattr(loader, "loaders", None)  # the cached loader wraps the others
    if inner is not None:
        for each in inner:
            yield from _dirs(each)
    elif hasattr(loader, "get_dirs"):
        yield from (str(d) for d in loader.get_dirs())


def without_sample() -> list[str]:
    """Email templates on disk that no preview covers (no notification message and no
    registered template uses them)."""
    covered = {preview.template for preview in all_previews() if preview.has_sample}
    return sorted(name for name in email_templates() if name not in covered)
