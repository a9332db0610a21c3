"""The outbox in Django's admin: find a message, see its attempts, preview it, act on it.

Built for large outboxes (millions of rows): the list runs a fixed number of queries
whatever the page size (every column is on the row), filters offer values without
scanning the table, there is no date hierarchy (its ``SELECT DISTINCT`` of dates scans
everything) and no full result count; the unfiltered count is PostgreSQL's estimate,
other counts stop at 10,000. On PostgreSQL, trigram indexes (made by the migration) serve
the search by subject and recipient.

Status changes go through :mod:`kipekee.outbox` only (retry, cancel, resend): the admin
shows, it does not edit. The HTML preview is served by its own view with a Content
Security Policy that sandboxes the page and forbids scripts and remote loads, inside a
sandboxed iframe. Bad ids in its URLs answer 404, never 500.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterator, Mapping
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.contrib.admin import helpers
from django.contrib.admin.utils import unquote
from django.core.exceptions import ValidationError
from django.core.paginator import Paginator
from django.db import connections, router
from django.db.models import BooleanField, Count, JSONField, Q, QuerySet
from django.db.models.expressions import RawSQL
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseRedirect
from django.template.defaultfilters import truncatechars
from django.template.response import TemplateResponse
from django.urls import URLPattern, path, reverse
from django.utils.functional import cached_property
from django.utils.html import escape, format_html, format_html_join

from . import conf, lists, outbox, overview, previews
from .addresses import canonical
from .exceptions import InvalidMessage
from .forms import EmailAddressField
from .models import (
    FINAL_STATUSES,
    WAITING_STATUSES,
    Attachment,
    Attempt,
    MailingList,
    OutboxEmail,
    ProviderMessage,
    Status,
    Suppression,
    UnsubscribeSource,
    Unsubscription,
    WebhookEvent,
    db_column,
)

#: The preview may show inline styles and embedded images, nothing else: no scripts, no
#: remote images (tracking pixels), fonts, frames or forms. ``sandbox`` (no ``allow-*``)
#: also when the page is opened alone, outside the change page's sandboxed iframe: no
#: ``<meta http-equiv=refresh>`` navigation, no popups, no top-level navigation, and an
#: opaque origin (no access to the admin's cookies or storage).
PREVIEW_CSP = ("sandbox; default-src 'none'; style-src 'unsafe-inline'; img-src data: cid:; "
               "form-action 'none'; base-uri 'none'")

_FINAL = frozenset(FINAL_STATUSES)
#: The change page's buttons: name, label, statuses that allow it (as in kipekee.outbox).
_ROW_ACTIONS = [
    ("retry", "Retry now", {Status.FAILED, Status.DEFERRED}),
    ("cancel", "Cancel", set(WAITING_STATUSES)),
    ("resend", "Resend as a new message", set(FINAL_STATUSES)),
]

#: The row's JSON columns (recipient lists, headers, metadata, results).
_JSON_FIELDS = frozenset(f.name for f in OutboxEmail._meta.fields if isinstance(f, JSONField))

_CID = re.compile(r"""(["'(])cid:([^"')\s]+)""", re.IGNORECASE)


def _has_field(name: str) -> bool:
    return any(f.name == name for f in OutboxEmail._meta.get_fields())


class AttemptInline(admin.TabularInline):
    model = Attempt
    extra = 0
    can_delete = False
    fields = readonly_fields = ("number", "provider", "outcome", "code", "error", "refused",
                                "started_at", "finished_at")

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


class AttachmentInline(admin.TabularInline):
    model = Attachment
    extra = 0
    can_delete = False
    fields = readonly_fields = ("filename", "mimetype", "content_id")

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


class ProviderFilter(admin.SimpleListFilter):
    """The configured providers (no query): rows sent by, or pinned to, one of them."""

    title = "provider"
    parameter_name = "provider"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [(p.alias, p.alias) for p in conf.get().providers]

    def queryset(self, request: HttpRequest,
                 queryset: QuerySet[OutboxEmail]) -> QuerySet[OutboxEmail]:
        value = self.value()
        if value:
            # Each side names its partial index's condition, so that SQLite (which does
            # not infer `<> ''` from `= value`) walks both indexes instead of the table.
            return queryset.filter((Q(sent_by=value) & ~Q(sent_by=""))
                                   | (Q(provider=value) & ~Q(provider="")))
        return queryset


class EventFilter(admin.SimpleListFilter):
    """The events of the most recent rows (a bounded read, not a scan of the table)."""

    title = "event"
    parameter_name = "event"
    recent = 5000

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        recent = (OutboxEmail.objects.order_by("-id")
                  .values_list("event", flat=True)[: self.recent])
        return [(e, e) for e in sorted({e for e in recent if e})]

    def queryset(self, request: HttpRequest,
                 queryset: QuerySet[OutboxEmail]) -> QuerySet[OutboxEmail]:
        value = self.value()
        return queryset.filter(event=value) if value else queryset


class RecipientFilter(admin.ListFilter):
    """``?to__contains=ann@example.com`` (also ``cc``, ``bcc``, ``reply_to``) in the URL:
    rows where one address of that list is the value, on every database.

    That is JSON containment, which PostgreSQL answers natively; SQLite has none (Django
    raises NotSupportedError, and the admin answered 500), so there it is asked through
    ``json_each``. Shown in the sidebar only while in use, with a link to drop it; the
    search box finds parts of addresses.
    """

    title = "recipient"
    parameters = ("to__contains", "cc__contains", "bcc__contains", "reply_to__contains")

    def __init__(self, request: HttpRequest, params: dict[str, Any], model: Any,
                 model_admin: Any) -> None:
        super().__init__(request, params, model, model_admin)
        for name in self.expected_parameters():
            if name in params:
                value = params.pop(name)  # a list of values on Django >= 5.0
                self.used_parameters[name] = value[-1] if isinstance(value, list) else value

    def expected_parameters(self) -> list[str | None]:
        return list(self.parameters)

    def has_output(self) -> bool:
        return bool(self.used_parameters)

    def choices(self, changelist: Any) -> Iterator[dict[str, Any]]:
        yield {"selected": False, "display": "All",
               "query_string": changelist.get_query_string(remove=self.expected_parameters())}
        for name, value in self.used_parameters.items():
            yield {"selected": True, "display": f"{name.removesuffix('__contains')}: {value}",
                   "query_string": changelist.get_query_string({name: value})}

    def queryset(self, request: HttpRequest,
                 queryset: QuerySet[OutboxEmail]) -> QuerySet[OutboxEmail]:
        for name, value in self.used_parameters.items():
            queryset = queryset.filter(_has_element(queryset, name.removesuffix("__contains"),
                                                    str(value)))
        return queryset


def _has_element(queryset: QuerySet[OutboxEmail], field: str, value: str) -> Any:
    """A condition: the JSON list ``field`` holds the string ``value``."""
    connection = connections[queryset.db]
    if connection.features.supports_json_field_contains:
        return Q(**{f"{field}__contains": [value]})
    quote = connection.ops.quote_name
    table, name = OutboxEmail._meta.db_table, db_column(OutboxEmail._meta.get_field(field))
    column = f"{quote(table)}.{quote(name)}"
    # The column is quote_name()d from our own model; the value is a parameter.
    sql = f"EXISTS (SELECT 1 FROM json_each({column}) WHERE json_each.value = %s)"  # noqa: S608
    return RawSQL(sql,  # noqa: S611
                  [value], output_field=BooleanField())


class AtLeast(int):
    """A count that stopped at its cap: shows as "more than 10,000" in the admin."""

    def __str__(self) -> str:
        return f"more than {int(self):,}"


class OutboxPaginator(Paginator):
    """Counting without scanning millions of rows.

    The whole table on PostgreSQL: its estimate (instant; an exact ``COUNT(*)`` of
    millions of rows is not). A filtered list or a search: counted up to ``count_cap``
    rows, then shown as "more than …" — enough pages to browse, and a count that stops
    early instead of visiting every matching row.
    """

    count_cap = 10_000

    @cached_property
    def count(self) -> int:
        qs = self.object_list
        if not isinstance(qs, QuerySet):
            return super().count
        if not qs.query.where:
            connection = connections[qs.db]
            if connection.vendor == "postgresql":
                with connection.cursor() as cursor:
                    cursor.execute("SELECT reltuples::bigint FROM pg_class WHERE relname = %s",
                                   [qs.model._meta.db_table])
                    row = cursor.fetchone()
                if row and row[0] > 100_000:
                    return int(row[0])
        n = qs.order_by()[: self.count_cap + 1].count()
        return AtLeast(self.count_cap) if n > self.count_cap else n


class ProviderMessageInline(admin.TabularInline):
    model = ProviderMessage
    extra = 0
    can_delete = False
    fields = readonly_fields = ("provider", "recipient", "message_id", "created_at")


@admin.register(OutboxEmail)
class OutboxEmailAdmin(admin.ModelAdmin):
    list_display = ["id", "short_subject", "recipients_list", "status_badge", "attempts",
                    "sent_by", "created_at", "sent_at", "short_error"]
    list_display_links = ["id", "short_subject"]
    list_filter = ["status", ProviderFilter, *([EventFilter] if _has_field("event") else []),
                   ("created_at", admin.DateFieldListFilter), "mode", RecipientFilter]
    search_fields = ["subject", "to"]
    search_help_text = ("Subject or recipient (part of it), or an exact <Message-ID>.")
    ordering = ["-id"]
    list_per_page = 50
    show_full_result_count = False
    # Facet counts are one COUNT per filter choice over the whole table.
    show_facets = admin.ShowFacets.NEVER
    paginator = OutboxPaginator
    inlines = [AttemptInline, AttachmentInline, ProviderMessageInline]
    actions = ["retry_selected", "cancel_selected", "resend_selected"]
    readonly_fields = ["preview", "act", *(f.name for f in OutboxEmail._meta.fields)]
    fieldsets = [
        (None, {"fields": ["status", "act", "subject", "from_email", "to", "cc", "bcc",
                           "reply_to", "preview"]}),
        ("Delivery", {"fields": ["mode", "provider", "attempts", "claims", "due_at", "sent_at",
                                 "sent_by", "error_kind", "last_error", "refused",
                                 "delivery", "lease_until", "claimed_by"]}),
        ("Message", {"classes": ["collapse"],
                     "fields": ["message_id", "created_at", "idempotency_key", "event",
                                "content_type", "object_id", "template", "mailing_list",
                                "metadata", "headers", "content_subtype", "body",
                                "alternatives"]}),
    ]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    # Every field is read-only, yet Django's "Save" writes every column of the row it read
    # a moment before: an engine's transition in between would be overwritten. Status
    # moves only through kipekee.outbox, so nothing is saved from here.
    def render_change_form(self, request: HttpRequest, context: dict[str, Any],
                           *args: Any, **kwargs: Any) -> HttpResponse:
        context.update(show_save=False, show_save_and_continue=False,
                       show_save_and_add_another=False)
        return super().render_change_form(request, context, *args, **kwargs)

    def save_model(self, request: HttpRequest, obj: OutboxEmail, form: Any, change: bool) -> None:
        pass

    # --- columns (all from the row itself: no query per row) ---------------------------

    @admin.display(description="subject", ordering="subject")
    def short_subject(self, obj: OutboxEmail) -> str:
        return truncatechars(obj.subject, 80) or "(no subject)"

    @admin.display(description="to")
    def recipients_list(self, obj: OutboxEmail) -> str:
        shown = ", ".join(obj.to[:3])
        more = len(obj.to) - 3 + len(obj.cc) + len(obj.bcc)
        return f"{shown} (+{more})" if more > 0 else shown

    @admin.display(description="status", ordering="status")
    def status_badge(self, obj: OutboxEmail) -> str:
        colours: dict[str, str] = {
            Status.SENT: "#2e7d32", Status.FAILED: "#c62828", Status.DEFERRED: "#ef6c00",
            Status.SUPPRESSED: "#6a1b9a", Status.CANCELLED: "#616161"}
        colour = colours.get(obj.status, "#1565c0")
        return format_html('<span class="kipekee-status kipekee-status-{}" '
                           'style="color:{};font-weight:bold">{}</span>',
                           obj.status, colour, obj.status)

    @admin.display(description="last error")
    def short_error(self, obj: OutboxEmail) -> str:
        return truncatechars(obj.last_error, 60)

    @admin.display(description="preview")
    def preview(self, obj: OutboxEmail) -> str:
        if not obj.pk:  # the add form's unsaved row
            return ""
        url = reverse("admin:kipekee_outboxemail_preview", args=[obj.pk])
        # sandbox without allow-scripts / allow-same-origin: the body runs nothing and
        # cannot reach the admin's cookies or DOM, even if the CSP were lost on the way.
        return format_html(
            '<iframe class="kipekee-preview" sandbox src="{}" title="Preview of the email" '
            'style="width:100%;min-width:640px;max-width:900px;height:480px;border:1px solid #ccc;'
            'background:#fff"></iframe><p><a href="{}" target="_blank" rel="noopener">'
            "Open the preview alone</a></p>", url, url)

    @admin.display(description="actions")
    def act(self, obj: OutboxEmail) -> str:
        """Buttons for what this message allows; they post the change form (all read-only)
        to :meth:`act_view`, so no form is nested in another."""
        buttons = [(name, label) for name, label, statuses in _ROW_ACTIONS
                   if obj.status in statuses]
        if obj.pk is None or not buttons:
            return "-"
        url = reverse("admin:kipekee_outboxemail_act", args=[obj.pk])
        return format_html_join(" ", '<button type="submit" class="button kipekee-{}" '
                                'formaction="{}" name="kipekee_action" value="{}">{}</button>',
                                ((name, url, name, label) for name, label in buttons))

    def lookup_allowed(self, lookup: str, value: str, request: HttpRequest) -> bool:
        # JSON containment in the URL (``?metadata__contains=``) where the database has
        # none: refused (400) rather than a NotSupportedError (500) when the page runs.
        # The recipients' lists are RecipientFilter's, which works everywhere.
        field, _, rest = lookup.partition("__")
        if (field in _JSON_FIELDS and rest in {"contains", "contained_by"}
                and lookup not in RecipientFilter.parameters
                and not connections[router.db_for_read(OutboxEmail)].features
                .supports_json_field_contains):
            return False
        return bool(super().lookup_allowed(lookup, value, request))

    def response_action(self, request: HttpRequest, queryset: QuerySet[OutboxEmail],
                        *args: Any, **kwargs: Any) -> Any:
        # Django filters pk__in=<the posted ids> and a non-number raises (500). (Django 6.1
        # passes more arguments: handed on as they come.)
        for value in request.POST.getlist(helpers.ACTION_CHECKBOX_NAME):
            try:
                OutboxEmail._meta.pk.to_python(value)
            except ValidationError:
                self.message_user(request, f"Nothing done: {value!r} is not a message id.",
                                  messages.WARNING)
                return None  # Django redirects back to the list
        return super().response_action(request, queryset, *args, **kwargs)

    # --- search --------------------------------------------------------------------------

    def get_search_results(self, request: HttpRequest, queryset: QuerySet[OutboxEmail],
                           search_term: str) -> tuple[QuerySet[OutboxEmail], bool]:
        term = search_term.strip()
        if term.startswith("<") and term.endswith(">"):
            # A Message-ID: one indexed lookup, not a LIKE over every subject.
            return queryset.filter(message_id=term), False
        return super().get_search_results(request, queryset, search_term)

    # --- preview ---------------------------------------------------------------------------

    def get_urls(self) -> list[URLPattern]:
        view = self.admin_site.admin_view
        urls = [path("overview/", view(self.overview_view), name="kipekee_overview"),
                path("previews/", view(self.previews_view), name="kipekee_previews"),
                path("previews/show/<path:key>", view(self.sample_view),
                     name="kipekee_preview_sample"),
                path("previews/frame/<path:key>", view(self.sample_frame_view),
                     name="kipekee_preview_frame"),
                path("<path:object_id>/preview/", self.admin_site.admin_view(self.preview_view),
                     name="kipekee_outboxemail_preview"),
                path("<path:object_id>/act/", self.admin_site.admin_view(self.act_view),
                     name="kipekee_outboxemail_act")]
        return urls + super().get_urls()

    def _object_or_404(self, request: HttpRequest, object_id: str) -> OutboxEmail:
        # get_object answers None for an id that is no number as for a missing row.
        obj: OutboxEmail | None = self.get_object(request, unquote(object_id))
        if obj is None:
            raise Http404(f"No outbox email with id {object_id!r}.")
        return obj

    def preview_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        obj = self._object_or_404(request, object_id)
        if not self.has_view_permission(request, obj):
            return HttpResponse(status=403)
        return sandboxed(render_preview(obj))

    # --- the overview: what an operator would rather look at than read ----------------

    def overview_view(self, request: HttpRequest) -> HttpResponse:
        if not self.has_view_permission(request):
            return HttpResponse(status=403)
        try:
            days = min(14, max(1, int(request.GET.get("days", "2"))))
        except ValueError:
            days = 2
        hours = overview.hourly(days)
        return TemplateResponse(request, "admin/kipekee/overview.html", {
            **self.admin_site.each_context(request), "opts": self.model._meta,
            "title": "Email overview", "days": days, "day_choices": (1, 2, 7, 14),
            "hours": hours, "chart": hourly_chart(hours), "totals": {
                series: sum(getattr(h, series) for h in hours) for series in overview.SERIES},
            "queue": overview.queue(), "providers": overview.providers(),
            "engines": overview.engines(),
            "heartbeat_max_age": conf.get().check.heartbeat_max_age,
        })

    # --- previews of registered notifications and templates (kipekee.previews) ----------

    def previews_view(self, request: HttpRequest) -> HttpResponse:
        if not self.has_view_permission(request):
            return HttpResponse(status=403)
        return TemplateResponse(request, "admin/kipekee/previews.html", {
            **self.admin_site.each_context(request), "opts": self.model._meta,
            "title": "Email previews", "previews": previews.all_previews(),
            "uncovered": previews.without_sample(),
        })

    def _sample_or_404(self, key: str) -> previews.Preview:
        try:
            return previews.get(key)
        except KeyError:
            raise Http404(f"No preview {key!r}.") from None

    def sample_view(self, request: HttpRequest, key: str) -> HttpResponse:
        """One preview: what would go out, and a test send (POST ``to``) through the outbox."""
        if not self.has_view_permission(request):
            return HttpResponse(status=403)
        preview = self._sample_or_404(key)
        form = TestSendForm(request.POST or None,
                            initial={"to": getattr(request.user, "email", "")})
        if request.method == "POST":
            if not self.has_change_permission(request):
                return HttpResponse(status=403)
            if form.is_valid():
                try:
                    receipt = previews.send_test(preview, form.cleaned_data["to"],
                                                 requested_by=request.user.get_username())
                except Exception as exc:  # noqa: BLE001 - shown to the person who asked
                    self.message_user(request, f"Not sent: {type(exc).__name__}: {exc}",
                                      messages.ERROR)
                else:
                    url = reverse("admin:kipekee_outboxemail_change", args=[receipt.id])
                    self.message_user(request, format_html(
                        'Test queued as <a href="{}">#{}</a> to {}: an engine sends it.',
                        url, receipt.id, form.cleaned_data["to"]))
                return HttpResponseRedirect(request.path)
        rendered, error = None, ""
        try:
            rendered = previews.render(preview)
        except Exception as exc:  # noqa: BLE001 - the page shows what is wrong
            error = f"{type(exc).__name__}: {exc}"
        return TemplateResponse(request, "admin/kipekee/preview.html", {
            **self.admin_site.each_context(request), "opts": self.model._meta,
            "title": f"Preview: {preview.key}", "preview": preview, "rendered": rendered,
            "error": error, "form": form,
            "can_send": self.has_change_permission(request),
            "frame_url": reverse("admin:kipekee_preview_frame", args=[preview.key]),
        })

    def sample_frame_view(self, request: HttpRequest, key: str) -> HttpResponse:
        """The preview's HTML for the sandboxed frame, under :data:`PREVIEW_CSP`."""
        if not self.has_view_permission(request):
            return HttpResponse(status=403)
        preview = self._sample_or_404(key)
        try:
            rendered = previews.render(preview)
        except Exception as exc:  # noqa: BLE001 - the frame says what is wrong
            return sandboxed(f"<!doctype html><pre>{escape(exc)}</pre>", status=422)
        if rendered.html is None:
            return sandboxed('<!doctype html><meta charset="utf-8"><pre style="white-space:'
                             f'pre-wrap;font:14px/1.4 monospace">{escape(rendered.text)}</pre>')
        return sandboxed(with_data_uris(rendered.html, rendered.inline))

    def act_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        """One message's retry, cancel or resend (POST from the change page's buttons)."""
        obj = self._object_or_404(request, object_id)
        if request.method != "POST" or not self.has_change_permission(request, obj):
            return HttpResponse(status=405 if request.method != "POST" else 403)
        action = request.POST.get("kipekee_action", "")
        target = obj.pk
        if action == "retry" and outbox.retry(obj.pk):
            self.message_user(request, "Queued again: an engine sends it next.")
        elif action == "cancel" and outbox.cancel(obj.pk):
            self.message_user(request, "Cancelled.")
        elif action == "resend" and obj.status in _FINAL:
            try:
                target = outbox.resend(obj.pk).pk
            except InvalidMessage as exc:  # nothing to send it to: say why
                self.message_user(request, f"Not resent: {exc}", messages.WARNING)
            else:
                self.message_user(request,
                                  f"Resent as a new message (#{target}): an engine sends it.")
        else:
            self.message_user(request,
                              f"Cannot {action or 'do that'}: the message is {obj.status}.",
                              messages.WARNING)
        return HttpResponseRedirect(reverse("admin:kipekee_outboxemail_change", args=[target]))

    # --- actions (through kipekee.outbox only) --------------------------------------------

    def _act(self, request: HttpRequest, queryset: QuerySet[OutboxEmail], action: Any,
             done: str, skipped: str) -> None:
        changed = sum(1 for pk in queryset.values_list("pk", flat=True) if action(pk))
        total = queryset.count()
        self.message_user(request, f"{changed} {done}.",
                          messages.SUCCESS if changed else messages.WARNING)
        if total > changed:
            self.message_user(request, f"{total - changed} {skipped}.", messages.WARNING)

    @admin.action(description="Retry selected (failed or deferred) now", permissions=["change"])
    def retry_selected(self, request: HttpRequest, queryset: QuerySet[OutboxEmail]) -> None:
        self._act(request, queryset, outbox.retry,
                  "queued again: an engine sends them next",
                  "not retried (only failed or deferred messages can be)")

    @admin.action(description="Cancel selected (not sent yet)", permissions=["change"])
    def cancel_selected(self, request: HttpRequest, queryset: QuerySet[OutboxEmail]) -> None:
        self._act(request, queryset, outbox.cancel, "cancelled",
                  "not cancelled (only queued or deferred messages can be)")

    @admin.action(description="Resend selected as new messages", permissions=["change"])
    def resend_selected(self, request: HttpRequest, queryset: QuerySet[OutboxEmail]) -> None:
        reasons: list[str] = []

        def resend(pk: int) -> bool:
            try:
                outbox.resend(pk)
            except InvalidMessage as exc:  # still going out, or no recipient left
                reasons.append(str(exc))
                return False
            return True

        changed = sum(1 for pk in queryset.values_list("pk", flat=True) if resend(pk))
        self.message_user(request,
                          f"{changed} copied as new queued messages: an engine sends them.",
                          messages.SUCCESS if changed else messages.WARNING)
        if reasons:
            shown = "; ".join(reasons[:5]) + (f"; and {len(reasons) - 5} more"
                                              if len(reasons) > 5 else "")
            self.message_user(request, f"{len(reasons)} not resent: {shown}", messages.WARNING)


#: The chart's colours (also its legend's), one per series of ``overview.SERIES``.
CHART_COLOURS = {"sent": "#2e7d32", "deferred": "#ef8f00", "failed": "#c62828",
                 "suppressed": "#757575"}
CHART_HEIGHT = 160


def hourly_chart(hours: list[overview.Hour]) -> dict[str, Any]:
    """The hourly figures as stacked bars of an inline SVG (no script, nothing remote):
    one ``<rect>`` per non-zero series of each hour, each with a ``<title>`` tooltip."""
    bar, gap = 10, 2
    peak = max((h.total for h in hours), default=0) or 1
    bars = []
    for index, hour in enumerate(hours):
        x = index * (bar + gap)
        y = CHART_HEIGHT
        for series in overview.SERIES:
            n = getattr(hour, series)
            if not n:
                continue
            height = max(1.0, n / peak * CHART_HEIGHT)
            y -= height
            bars.append({"x": x, "y": round(y, 2), "width": bar, "height": round(height, 2),
                         "colour": CHART_COLOURS[series], "series": series, "n": n,
                         "hour": hour.start})
    ticks = [{"x": i * (bar + gap), "hour": h.start} for i, h in enumerate(hours)
             if h.start.hour == 0]
    return {"width": max(1, len(hours) * (bar + gap)), "height": CHART_HEIGHT, "bars": bars,
            "peak": peak, "ticks": ticks,
            "legend": [(series, CHART_COLOURS[series]) for series in overview.SERIES]}


def sandboxed(html: str, status: int = 200) -> HttpResponse:
    """An email's HTML as its own page, under :data:`PREVIEW_CSP` (for a sandboxed
    iframe of the admin, and safe when opened alone)."""
    response = HttpResponse(html, content_type="text/html; charset=utf-8", status=status)
    response["Content-Security-Policy"] = PREVIEW_CSP
    response["X-Frame-Options"] = "SAMEORIGIN"
    response["X-Content-Type-Options"] = "nosniff"
    response["Referrer-Policy"] = "no-referrer"
    response["Cache-Control"] = "private, no-store"
    return response


def with_data_uris(html: str, inline: Mapping[str, tuple[str, bytes]]) -> str:
    """``html`` with its ``cid:`` images (``inline``: Content-ID → (type, bytes)) put in as
    ``data:`` URIs: the CSP lets the frame show those, and nothing remote."""
    if "cid:" not in html.lower():
        return html

    def data_uri(match: re.Match[str]) -> str:
        found = inline.get(match.group(2))
        if found is None:
            return match.group(0)
        return f"{match.group(1)}data:{found[0]};base64,{base64.b64encode(found[1]).decode()}"

    return _CID.sub(data_uri, html)


def render_preview(obj: OutboxEmail) -> str:
    """The HTML part of the message (inline ``cid:`` images as ``data:``), or its text."""
    html = obj.body if obj.content_subtype == "html" else next(
        (a["content"] for a in obj.alternatives if a.get("mimetype") == "text/html"), None)
    if html is None:
        return ('<!doctype html><meta charset="utf-8"><pre style="white-space:pre-wrap;'
                f'font:14px/1.4 monospace">{escape(obj.body)}</pre>')
    if "cid:" in html.lower():
        html = with_data_uris(html, {a.content_id: (a.mimetype, bytes(a.content))
                                     for a in obj.attachments.exclude(content_id="")})
    return html


class TestSendForm(forms.Form):
    to = EmailAddressField(label="Send a test to",
                           help_text="Only this address gets it, through the outbox.")


class SuppressionForm(forms.ModelForm):
    """The address in its canonical spelling before the uniqueness check, so another
    spelling of a listed mailbox is reported as already listed (not a 500 on save)."""

    class Meta:
        model = Suppression
        fields = ["address", "reason", "source", "detail"]

    def clean_address(self) -> str:
        return canonical(self.cleaned_data["address"])


@admin.register(Suppression)
class SuppressionAdmin(admin.ModelAdmin):
    """The suppression list, editable: add an address by hand, or remove one to send to it
    again (say, after a person asked to be subscribed back)."""

    form = SuppressionForm
    list_display = ["address", "reason", "source", "created_at"]
    list_filter = ["reason", "source"]
    search_fields = ["address", "detail"]
    search_help_text = "Part of an address or of the detail, or a whole address in any spelling."
    fields = ["address", "reason", "source", "detail", "created_at"]
    readonly_fields = ["created_at"]

    def get_search_results(self, request: HttpRequest, queryset: QuerySet[Suppression],
                           search_term: str) -> tuple[QuerySet[Suppression], bool]:
        found, duplicates = super().get_search_results(request, queryset, search_term)
        if "@" in search_term:  # stored canonical: "User@Bücher.example" finds xn--bcher-kva
            found = found | queryset.filter(address=canonical(search_term))
        return found, duplicates


@admin.register(WebhookEvent)
class WebhookEventAdmin(admin.ModelAdmin):
    list_display = ["received_at", "provider", "event", "recipient", "email"]
    list_filter = ["provider", "event"]
    search_fields = ["recipient", "message_id", "event_id"]
    readonly_fields = [f.name for f in WebhookEvent._meta.fields]

    def has_add_permission(self, request: object) -> bool:
        return False


@admin.register(MailingList)
class MailingListAdmin(admin.ModelAdmin):
    """The lists people may leave. The key is what code sends with, fixed once created
    (unsubscriptions name it); a list that someone left cannot be deleted."""

    list_display = ["name", "key", "unsubscribed", "created_at"]
    search_fields = ["name", "key"]
    fields = ["key", "name", "description", "created_at"]
    readonly_fields = ["created_at"]

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> list[str]:
        return ["key", "created_at"] if obj is not None else ["created_at"]

    def get_queryset(self, request: HttpRequest) -> QuerySet[MailingList]:
        lists: QuerySet[MailingList] = super().get_queryset(request)
        return lists.annotate(unsubscribed_count=Count("unsubscriptions"))

    @admin.display(description="unsubscribed", ordering="unsubscribed_count")
    def unsubscribed(self, obj: Any) -> str:
        url = reverse("admin:kipekee_unsubscription_changelist")
        return format_html('<a href="{}?mailing_list__key__exact={}">{}</a>', url, obj.key,
                           obj.unsubscribed_count)


class UnsubscriptionForm(forms.ModelForm):
    """The address in its canonical spelling before the uniqueness check (another
    spelling of a mailbox that left the list is reported, not a 500)."""

    class Meta:
        model = Unsubscription
        fields = ["mailing_list", "address"]

    def clean_address(self) -> str:
        return canonical(self.cleaned_data["address"])


@admin.register(Unsubscription)
class UnsubscriptionAdmin(admin.ModelAdmin):
    """Who left which list. Adding one unsubscribes (source "admin"); deleting one (or
    several, with "Delete selected") subscribes the address back. Both go through
    :mod:`kipekee.lists`, so the ``unsubscribed`` / ``resubscribed`` signals are sent as for
    the person's own click."""

    form = UnsubscriptionForm
    list_display = ["address", "mailing_list", "source", "created_at"]
    list_filter = ["mailing_list", "source"]
    list_select_related = ["mailing_list"]
    search_fields = ["address"]
    search_help_text = "Part of an address, or a whole address in any spelling."

    # (A flat list of names, one of the shapes django-stubs' nested fieldsets type allows,
    # which its invariant list type cannot say.)
    def get_fields(self, request: HttpRequest,  # type: ignore[override]
                   obj: Any = None) -> list[str]:
        return ["mailing_list", "address"] if obj is None else [
            "mailing_list", "address", "source", "created_at"]

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> list[str]:
        return [] if obj is None else ["mailing_list", "address", "source", "created_at"]

    def save_model(self, request: HttpRequest, obj: Unsubscription, form: Any,
                   change: bool) -> None:
        if change:
            return  # every field is read-only once written
        row, _ = lists.unsubscribe(obj.mailing_list_id, obj.address,
                                   source=UnsubscribeSource.ADMIN)
        obj.pk, obj.source, obj.created_at = row.pk, row.source, row.created_at

    def delete_model(self, request: HttpRequest, obj: Unsubscription) -> None:
        lists.resubscribe(str(obj.mailing_list_id), obj.address, source=UnsubscribeSource.ADMIN)

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[Unsubscription]) -> None:
        # Django's "Delete selected" action: each address subscribes back, with its signal.
        for key, address in queryset.values_list("mailing_list_id", "address"):
            lists.resubscribe(str(key), address, source=UnsubscribeSource.ADMIN)

    def get_search_results(self, request: HttpRequest, queryset: QuerySet[Unsubscription],
                           search_term: str) -> tuple[QuerySet[Unsubscription], bool]:
        found, duplicates = super().get_search_results(request, queryset, search_term)
        if "@" in search_term:  # stored canonical
            found = found | queryset.filter(address=canonical(search_term))
        return found, duplicates
