from __future__ import annotations

from django.contrib import admin

from .models import Attachment, Attempt, OutboxEmail


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


@admin.register(OutboxEmail)
class OutboxEmailAdmin(admin.ModelAdmin):
    list_display = ["id", "subject", "to", "status", "attempts", "sent_by", "created_at", "sent_at"]
    list_filter = ["status", "mode", "sent_by"]
    search_fields = ["subject", "message_id", "to"]
    date_hierarchy = "created_at"
    inlines = [AttemptInline, AttachmentInline]
    # Status changes go through kipekee.outbox only; the admin shows, it does not edit.
    readonly_fields = [f.name for f in OutboxEmail._meta.fields]

    def has_add_permission(self, request: object) -> bool:
        return False
