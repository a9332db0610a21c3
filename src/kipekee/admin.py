from __future__ import annotations

from django.contrib import admin

from .models import Attachment, Attempt, OutboxEmail, ProviderMessage, Suppression, WebhookEvent


class AttemptInline(admin.TabularInline):
    model = Attempt
    extra = 0
    can_delete = False
    fields = ["number", "provider", "outcome", "code", "error", "started_at", "finished_at"]
    readonly_fields = fields


class AttachmentInline(admin.TabularInline):
    model = Attachment
    extra = 0
    can_delete = False
    fields = ["filename", "mimetype", "content_id"]
    readonly_fields = fields


class ProviderMessageInline(admin.TabularInline):
    model = ProviderMessage
    extra = 0
    can_delete = False
    fields = ["provider", "recipient", "message_id", "created_at"]
    readonly_fields = fields


@admin.register(OutboxEmail)
class OutboxEmailAdmin(admin.ModelAdmin):
    list_display = ["id", "subject", "to", "status", "attempts", "sent_by", "created_at", "sent_at"]
    list_filter = ["status", "mode", "sent_by"]
    search_fields = ["subject", "message_id", "to"]
    date_hierarchy = "created_at"
    inlines = [AttemptInline, AttachmentInline, ProviderMessageInline]
    # Status changes go through kipekee.outbox only; the admin shows, it does not edit.
    readonly_fields = [f.name for f in OutboxEmail._meta.fields]

    def has_add_permission(self, request: object) -> bool:
        return False


@admin.register(Suppression)
class SuppressionAdmin(admin.ModelAdmin):
    """The suppression list, editable: add an address by hand, or remove one to send to it
    again (say, after a person asked to be subscribed back)."""

    list_display = ["address", "reason", "source", "created_at"]
    list_filter = ["reason", "source"]
    search_fields = ["address", "detail"]
    fields = ["address", "reason", "source", "detail", "created_at"]
    readonly_fields = ["created_at"]


@admin.register(WebhookEvent)
class WebhookEventAdmin(admin.ModelAdmin):
    list_display = ["received_at", "provider", "event", "recipient", "email"]
    list_filter = ["provider", "event"]
    search_fields = ["recipient", "message_id", "event_id"]
    readonly_fields = [f.name for f in WebhookEvent._meta.fields]

    def has_add_permission(self, request: object) -> bool:
        return False
