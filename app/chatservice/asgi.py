"""ASGI entry point for Daphne: ``chatservice.asgi:application`` (HTTP and WebSockets)."""

import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chatservice.settings")
# Read by settings (database connection lifetime) before Django is set up.
os.environ["CHAT_INTERFACE"] = "asgi"

from django.core.asgi import get_asgi_application  # noqa: E402

# Django must be set up before anything imports models (consumers do).
django_asgi_app = get_asgi_application()

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from channels.security.websocket import OriginValidator, WebsocketDenier  # noqa: E402
from django.conf import settings  # noqa: E402
from django.http.request import split_domain_port, validate_host  # noqa: E402

from chat import metrics  # noqa: E402
from chat.routing import websocket_urlpatterns  # noqa: E402

metrics.set_release(settings.RELEASE, "asgi")


def _header(scope, name):
    for key, value in scope.get("headers", []):
        if key == name:
            return value.decode("latin1")
    return ""


class AllowedHostValidator:
    """Refuses a WebSocket handshake whose Host is not in ALLOWED_HOSTS.

    Django checks Host for HTTP requests only; without this, a handshake
    for any name reaches the consumers as long as its Origin is allowed.
    """

    def __init__(self, application):
        self.application = application

    async def __call__(self, scope, receive, send):
        domain, _ = split_domain_port(_header(scope, b"host"))
        if not domain or not validate_host(domain, settings.ALLOWED_HOSTS):
            # Counted as refused_origin as well: the same 403, before any consumer.
            metrics.HANDSHAKES_REFUSED_ORIGIN.inc()
            return await WebsocketDenier()(scope, receive, send)
        return await self.application(scope, receive, send)


class PublicOriginValidator(OriginValidator):
    """Accepts only the site's public origins, scheme, host and port alike.

    settings.PUBLIC_ORIGINS holds them ("https://chat.example.com",
    "https://localhost:8443"); channels compares each part, with the
    scheme's default port when the origin names none. Without them
    (development), any scheme and port of an allowed host passes, as with
    channels' AllowedHostsOriginValidator. Read per handshake, so tests can
    change the settings.
    """

    def __init__(self, application):
        super().__init__(application, allowed_origins=())

    def valid_origin(self, parsed_origin):
        allowed = settings.PUBLIC_ORIGINS or settings.ALLOWED_HOSTS
        if parsed_origin is None:  # browsers always send one
            valid = "*" in allowed
        else:
            valid = any(pattern == "*" or self.match_allowed_origin(parsed_origin, pattern)
                        for pattern in allowed)
        if not valid:
            # Called once per handshake, by __call__, which then answers 403.
            metrics.HANDSHAKES_REFUSED_ORIGIN.inc()
        return valid


application = ProtocolTypeRouter(
    {
        "http": django_asgi_app,
        # The chat is anonymous (nicknames), so no session/auth middleware; the
        # origin check is what stops other sites from opening sockets in a
        # visitor's browser.
        "websocket": AllowedHostValidator(PublicOriginValidator(URLRouter(websocket_urlpatterns))),
    }
)
