from django.urls import path

from . import views

urlpatterns = [
    path("", views.home, name="home"),
    path("tours/", views.tours, name="tours"),
    path("tours/quotes/<int:pk>/", views.quote_sent, name="quote_sent"),
    path("tours/careers/", views.careers, name="careers"),
    path("tours/newsletter/", views.newsletter, name="newsletter"),
    path("tours/newsletter/issues/", views.newsletter_issue, name="newsletter_issue"),
    path("thanks/", views.thanks, name="thanks"),
    path("payments/login/", views.payments_login, name="payments_login"),
    path("payments/login/code/", views.payments_code, name="payments_code"),
    path("payments/", views.payments, name="payments"),
    path("market/", views.market, name="market"),
    path("market/orders/<int:pk>/", views.order, name="order"),
    path("market/orders/<int:pk>/<str:action>/", views.order_action, name="order_action"),
    path("cinema/", views.cinema, name="cinema"),
    path("cinema/bookings/<int:pk>/", views.booking, name="booking"),
    path("cinema/bookings/<int:pk>/fast-forward/", views.fast_forward, name="fast_forward"),
]
