from django.apps import AppConfig


class DevInboxConfig(AppConfig):
    name = "devinbox"
    verbose_name = "Dev inbox"
    default_auto_field = "django.db.models.BigAutoField"
