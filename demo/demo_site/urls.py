from django.contrib import admin
from django.urls import include, path

urlpatterns = [
    path("admin/", admin.site.urls),
    path("kipekee/", include("kipekee.urls")),  # delivery webhooks
    path("inbox/", include("devinbox.urls")),
    path("", include("shop.urls")),
]
