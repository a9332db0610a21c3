from django.urls import path

from . import views

app_name = "devinbox"
urlpatterns = [
    path("", views.index, name="index"),
    path("<int:pk>/", views.detail, name="detail"),
    path("<int:pk>/html/", views.html, name="html"),
    path("<int:pk>/raw/", views.raw, name="raw"),
    path("<int:pk>/mailto/", views.mailto, name="mailto"),
    path("<int:pk>/part/<int:index>/", views.part, name="part"),
    path("servers/<str:name>/", views.toggle_server, name="toggle"),
]
