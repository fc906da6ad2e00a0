"""The WebSocket side checks Host and Origin as strictly as Django checks HTTP."""

import pytest


@pytest.mark.parametrize(
    ("origin", "accepted"),
    [
        ("https://chat.example:8443", True),
        ("HTTPS://Chat.Example:8443", True),
        ("http://chat.example:8443", False),  # wrong scheme
        ("https://chat.example", False),  # default port 443, not 8443
        ("https://chat.example:9999", False),  # wrong port
        ("https://other.example:8443", False),  # wrong host
        ("https://sub.chat.example:8443", False),  # no subdomains
    ],
)
async def test_origin_must_match_a_public_origin_exactly(asgi_app, room, origin, accepted, settings,
                                                         close_layers):
    from channels.testing import WebsocketCommunicator

    settings.ALLOWED_HOSTS = ["chat.example"]
    settings.PUBLIC_ORIGINS = ["https://chat.example:8443"]
    communicator = WebsocketCommunicator(
        asgi_app, "/ws/health/", headers=[(b"origin", origin.encode()), (b"host", b"chat.example:8443")]
    )
    connected, _ = await communicator.connect(timeout=5)
    await communicator.disconnect()
    assert connected is accepted


@pytest.mark.parametrize("host", [b"evil.example", b"evil.example:8443", b""])
async def test_handshake_for_a_foreign_host_is_refused(asgi_app, host, settings, close_layers):
    """A valid Origin does not make up for a Host the site does not serve."""
    from channels.testing import WebsocketCommunicator

    settings.ALLOWED_HOSTS = ["chat.example"]
    settings.PUBLIC_ORIGINS = ["https://chat.example"]
    headers = [(b"origin", b"https://chat.example")] + ([(b"host", host)] if host else [])
    communicator = WebsocketCommunicator(asgi_app, "/ws/health/", headers=headers)
    connected, _ = await communicator.connect(timeout=5)
    await communicator.disconnect()
    assert connected is False
