from django.contrib import admin
from django.urls import path

from kipekee import metrics

urlpatterns = [
    path("admin/", admin.site.urls),
    path("metrics/", metrics.view),
]
