from django.urls import re_path

from . import consumers

websocket_urlpatterns = [
    # Any path segment is routed to the consumer, which refuses invalid room
    # names with close code 4004 instead of an unexplained handshake failure.
    re_path(r"^ws/chat/(?P<room>[^/]+)/$", consumers.ChatConsumer.as_asgi()),
    re_path(r"^ws/health/$", consumers.HealthConsumer.as_asgi()),
    re_path(r"", consumers.NotFoundConsumer.as_asgi()),
]
