"""The /ws/ split, end to end through Nginx, with real clients."""

import json
import uuid

import pytest

from clients import static_manifest
from websockets.exceptions import ConnectionClosed, InvalidStatus


def test_lobby_page_loads(edge):
    status, body = edge.get("/")
    assert status == 200
    assert "<html" in body.lower()


def test_http_is_served_by_gunicorn(edge):
    status, health = edge.get_json("/healthz")
    assert status == 200
    assert health["interface"] == "wsgi"
    assert health["status"] == "ok"
    assert health["checks"] == {"database": "ok", "disk": "ok", "redis": "ok"}


def test_websocket_is_served_by_daphne(edge):
    with edge.websocket("/ws/health/") as ws:
        frame = edge.receive(ws)
    assert frame["interface"] == "asgi"
    _, health = edge.get_json("/healthz")
    assert frame["release"] == health["release"], "Gunicorn and Daphne serve different releases"


def test_two_clients_in_a_room_exchange_a_message(edge):
    room = f"verify-{uuid.uuid4().hex[:8]}"
    body = f"hello {uuid.uuid4()}"
    with edge.websocket(f"/ws/chat/{room}/") as alice, edge.websocket(f"/ws/chat/{room}/") as bob:
        assert edge.receive(alice)["type"] == "history"
        assert edge.receive(bob)["type"] == "history"
        alice.send(json.dumps({"type": "message", "nickname": "alice", "body": body}))
        for ws in (bob, alice):
            frame = edge.receive(ws)
            assert frame["type"] == "message"
            assert frame["body"] == body
            assert frame["nickname"] == "alice"
            assert frame["seq"] == 1


def test_foreign_origin_is_refused(edge):
    with pytest.raises(InvalidStatus) as refused:
        edge.websocket("/ws/health/", origin="http://evil.example")
    assert refused.value.response.status_code == 403


def test_plain_http_under_ws_does_not_reach_gunicorn(edge):
    status, body = edge.get("/ws/health/")
    assert status == 426, f"a plain GET under /ws/ answered {status}: {body[:200]}"
    assert '"interface"' not in body


def test_static_files_served_by_nginx(edge, host):
    manifest = static_manifest(host)
    hashed = next(iter(manifest["paths"].values()))
    status, _ = edge.get(f"/static/{hashed}")
    assert status == 200


def test_a_64_kib_message_is_refused_before_it_is_parsed(edge):
    room = f"verify-{uuid.uuid4().hex[:8]}"
    with edge.websocket(f"/ws/chat/{room}/") as ws:
        assert edge.receive(ws)["type"] == "history"
        # Daphne (--websocket-max-message-size) drops the connection: no
        # error frame, no message. The drop can reach the client while it is
        # still writing the frame, so the send may be what sees it.
        with pytest.raises(ConnectionClosed):
            ws.send(json.dumps({"type": "message", "nickname": "big", "body": "x" * 65536}))
            ws.recv(timeout=10)
    with edge.websocket(f"/ws/chat/{room}/") as ws:
        assert edge.receive(ws) == {"type": "history", "messages": []}
