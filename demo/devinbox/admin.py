from django.contrib import admin

from .models import CapturedMessage

admin.site.register(CapturedMessage, list_display=["id", "received_at", "server", "subject"])
