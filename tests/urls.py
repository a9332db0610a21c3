from django.contrib import admin
from django.urls import include, path

from kipekee import metrics

from .app import views

urlpatterns = [
    path("admin/", admin.site.urls),
    path("kipekee/", include("kipekee.urls")),
    path("metrics/", metrics.view),
    path("page/", views.page),
    path("order/", views.order),
]
