"""ASGI entry point for Daphne: ``chatservice.asgi:application`` (HTTP and WebSockets)."""

import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chatservice.settings")
# Read by settings (database connection lifetime) before Django is set up.
os.environ["CHAT_INTERFACE"] = "asgi"

from django.core.asgi import get_asgi_application  # noqa: E402

# Django must be set up before anything imports models (consumers do).
django_asgi_app = get_asgi_application()

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from channels.security.websocket import AllowedHostsOriginValidator  # noqa: E402

from chat.routing import websocket_urlpatterns  # noqa: E402

application = ProtocolTypeRouter(
    {
        "http": django_asgi_app,
        # The chat is anonymous (nicknames), so no session/auth middleware; the
        # origin check is what stops other sites from opening sockets in a
        # visitor's browser.
        "websocket": AllowedHostsOriginValidator(URLRouter(websocket_urlpatterns)),
    }
)
