from django.urls import path

from . import views

app_name = "chat"

urlpatterns = [
    path("", views.lobby, name="lobby"),
    path("enter/", views.enter, name="enter"),
    path("chat/<str:room>/", views.room, name="room"),
    path("healthz", views.healthz, name="healthz"),
]
