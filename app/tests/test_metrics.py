"""The chat's own metrics (chat/metrics.py), counted in this process.

The servers serving them (Daphne's /metrics, Gunicorn's master summing its
workers) are in test_serve_daphne.py and test_servers.py.
"""

import asyncio
import json
import re
import time
from pathlib import Path

import pytest
from channels.layers import get_channel_layer
from django.core.exceptions import ImproperlyConfigured
from prometheus_client import REGISTRY

from chat import fanout, metrics
from chat.protocol import ERROR_CODES

from .conftest import HOST, ORIGIN, receive_messages, sample

pytestmark = pytest.mark.django_db(transaction=True)

APP_DIR = Path(__file__).resolve().parent.parent


class Delta:
    """The change of a metric from now on."""

    def __init__(self, name, **labels):
        self.name, self.labels = name, labels
        self.before = sample(name, **labels)

    def __call__(self):
        return sample(self.name, **self.labels) - self.before


def post(client, body, client_id=None):
    frame = {"type": "message", "nickname": "metrics", "body": body}
    if client_id is not None:
        frame["client_id"] = client_id
    return client.send_json_to(frame)


async def test_posted_and_stored_count_exactly_what_was_posted(join, room):
    posted, stored = Delta("chat_messages_posted_total"), Delta("chat_messages_stored_total")
    client, _ = await join(room)
    for number in range(5):
        await post(client, f"m{number}", client_id=f"id-{number}")
    await receive_messages(client, 5)
    assert (posted(), stored()) == (5, 5)
    # A resend of a stored post is posted again, but not stored again.
    await post(client, "m0", client_id="id-0")
    answer = await client.receive_json_from(timeout=5)
    assert answer["client_id"] == "id-0" and answer["seq"] == 1
    assert (posted(), stored()) == (6, 5)
    # Refused frames are neither.
    await client.send_json_to({"type": "message", "nickname": "metrics", "body": " "})
    assert (await client.receive_json_from(timeout=5))["code"] == "empty_body"
    assert (posted(), stored()) == (6, 5)


async def test_open_sockets_and_handshake_outcomes(join, connect, asgi_app, room):
    from channels.testing import WebsocketCommunicator

    open_before = sample("chat_websockets_open")
    outcomes = {outcome: Delta("chat_websocket_handshakes_total", outcome=outcome)
                for outcome in metrics.HANDSHAKE_OUTCOMES}
    clients = [(await join(room))[0] for _ in range(3)]
    assert sample("chat_websockets_open") == open_before + 3
    # Closed with 4004: counted, never open.
    for path in ("/ws/chat/Not.A.Room/", "/ws/nothing-here/"):
        client = await connect(path)
        assert (await client.receive_output(timeout=5))["code"] == 4004
    # Refused with 403 before any consumer: a foreign Origin, a foreign Host.
    for headers in ([(b"origin", b"http://evil.example"), HOST], [ORIGIN, (b"host", b"evil.example")]):
        communicator = WebsocketCommunicator(asgi_app, f"/ws/chat/{room}/", headers=headers)
        assert (await communicator.connect(timeout=5))[0] is False
    assert sample("chat_websockets_open") == open_before + 3
    assert {outcome: delta() for outcome, delta in outcomes.items()} == {
        "accepted": 3, "not_found": 2, "unavailable": 0, "refused_origin": 2}

    for client in clients[:2]:
        await client.disconnect(timeout=5)
    assert sample("chat_websockets_open") == open_before + 1
    await clients[2].disconnect(timeout=5)
    assert sample("chat_websockets_open") == open_before


async def test_refused_frames_are_counted_by_their_code(join, room, settings):
    # Every code's series exists before its first refusal.
    assert all(REGISTRY.get_sample_value("chat_messages_refused_total", {"reason": code}) is not None
               for code in ERROR_CODES)
    frames = {
        "invalid_json": "not json",
        "unknown_type": '{"type": "shout"}',
        "invalid_nickname": '{"type": "message", "nickname": "", "body": "hi"}',
        "empty_body": '{"type": "message", "nickname": "a", "body": ""}',
        "invalid_since": '{"type": "history", "since": -1}',
        "invalid_client_id": '{"type": "message", "nickname": "a", "body": "hi", "client_id": "a b"}',
    }
    deltas = {code: Delta("chat_messages_refused_total", reason=code) for code in ERROR_CODES}
    settings.CHAT_RATE_BURST = len(frames) + 1
    settings.CHAT_RATE_PER_SECOND = 0.01
    client, _ = await join(room)
    for code, frame in frames.items():
        await client.send_to(text_data=frame)
        assert (await client.receive_json_from(timeout=5))["code"] == code
    await client.send_to(bytes_data=b"{}")
    assert (await client.receive_json_from(timeout=5))["code"] == "binary_not_supported"
    await client.send_to(text_data="one too many")
    assert (await client.receive_json_from(timeout=5))["code"] == "rate_limited"
    assert {code: delta() for code, delta in deltas.items()} == {
        code: 1 if code in frames or code in ("binary_not_supported", "rate_limited") else 0
        for code in ERROR_CODES}


def test_every_error_code_in_the_code_is_a_known_label_value():
    """The reason label takes protocol.ERROR_CODES only: a new code goes there too."""
    source = "\n".join(path.read_text() for path in (APP_DIR / "chat").glob("*.py"))
    raised = set(re.findall(r'ProtocolError\(\s*"([a-z_]+)"', source))
    assert raised and raised <= set(ERROR_CODES)


async def test_delivery_time_is_observed_per_flush_and_carried_through_the_layer(join, room):
    count = Delta("chat_fanout_delivery_seconds_count")
    total = Delta("chat_fanout_delivery_seconds_sum")
    client, _ = await join(room)
    others = [(await join(room))[0] for _ in range(2)]
    # Another process of the room: what the hub publishes carries the time
    # it was stored, beside the message.
    layer = get_channel_layer()
    channel = await layer.new_channel()
    await layer.group_add(fanout.group_name(room), channel)
    before = time.time()
    await post(client, "timed")
    frames = [await c.receive_json_from(timeout=5) for c in [client, *others]]
    event = await asyncio.wait_for(layer.receive(channel), 5)
    await layer.group_discard(fanout.group_name(room), channel)
    assert before <= event["stored_at"] <= time.time()
    assert event["message"] == frames[0]
    assert all(frame == frames[0] and "stored_at" not in frame for frame in frames)
    await asyncio.sleep(0.05)  # the flush's pass ends after its last socket
    # One observation for the flush, not one per socket.
    assert count() == 1
    assert 0 <= total() < 5


async def test_a_lagging_socket_observes_its_own_sends_and_behind_notices():
    count = Delta("chat_fanout_delivery_seconds_count")
    behind = Delta("chat_behind_notices_total")
    gate = asyncio.Event()

    async def slow_send(text):
        await gate.wait()

    subscriber = fanout.Subscriber(slow_send, backlog=2)
    subscriber.start()
    items = [(seq, json.dumps({"seq": seq})) for seq in range(1, 5)]
    assert subscriber.offer(items[0][1], items[:1], time.time())
    task = asyncio.get_running_loop().create_task(subscriber.send_now(items[0][1]))
    await asyncio.sleep(0)
    assert not subscriber.offer(items[1][1], items[1:2], time.time())  # queued
    await asyncio.sleep(0)
    assert not subscriber.offer(items[2][1], items[2:4], time.time())  # beyond the backlog: behind
    assert not subscriber.offer(items[3][1], items[3:4], time.time())
    gate.set()
    await task
    for _ in range(10):
        await asyncio.sleep(0.01)
    # The behind notice, then one send of what queued after it, timed.
    assert (behind(), count()) == (1, 1)


async def test_database_calls_are_timed_by_kind(join, room):
    reads = Delta("chat_db_call_seconds_count", kind="read")
    writes = Delta("chat_db_call_seconds_count", kind="write")
    client, _ = await join(room)  # the room's recent messages: a read
    await post(client, "written")
    await client.receive_json_from(timeout=5)
    await client.send_json_to({"type": "history", "since": 0})
    await client.receive_json_from(timeout=5)
    assert (reads(), writes()) == (2, 1)


def test_http_responses_are_counted_by_status_class(client):
    ok, refused = Delta("chat_http_responses_total", status="2xx"), Delta("chat_http_responses_total", status="4xx")
    assert client.get("/").status_code == 200
    assert client.get("/chat/Not-Valid/").status_code == 404
    # A Host Django refuses is answered by a middleware: counted all the same.
    assert client.get("/", HTTP_HOST="evil.example").status_code == 400
    assert (ok(), refused()) == (1, 2)


async def test_http_responses_are_counted_under_asgi_without_a_thread_hop(async_client):
    from chat.middleware import ResponseMetricsMiddleware
    from django.core.handlers.asgi import ASGIHandler

    ok = Delta("chat_http_responses_total", status="2xx")
    # A page without database reads: a connection opened in asgiref's thread
    # would outlive the test (the test client keeps connections).
    assert (await async_client.get("/chat/general/")).status_code == 200
    assert ok() == 1
    # Outermost, and in async mode: Django put no sync_to_async around it.
    outermost = ASGIHandler()._middleware_chain.__wrapped__
    assert isinstance(outermost, ResponseMetricsMiddleware) and outermost.async_mode


def test_the_release_and_interface_are_exported(asgi_app, settings):
    assert sample("chat_release_info", release=settings.RELEASE, interface="asgi") == 1


@pytest.mark.parametrize("value, expected", [
    ("", None),
    ("  ", None),
    ("127.0.0.1:9201", ("127.0.0.1", 9201)),
    (" 10.0.0.5:1 ", ("10.0.0.5", 1)),
    ("0.0.0.0:65535", ("0.0.0.0", 65535)),
    ("[::1]:9201", ("::1", 9201)),
])
def test_metrics_listen_address(monkeypatch, value, expected):
    from chatservice.metrics_listen import metrics_listen

    monkeypatch.setenv("CHAT_METRICS_LISTEN", value)
    assert metrics_listen() == expected


@pytest.mark.parametrize("value", [
    "9201", ":9201", "localhost:9201", "127.0.0.1", "127.0.0.1:", "127.0.0.1:0", "127.0.0.1:65536",
    "127.0.0.1:+80", "::1:9201", "[127.0.0.1]:9201", "300.0.0.1:9201", "127.0.0.1:92 01",
])
def test_a_bad_metrics_listen_address_names_the_variable(monkeypatch, value):
    from chatservice.metrics_listen import metrics_listen

    monkeypatch.setenv("CHAT_METRICS_LISTEN", value)
    with pytest.raises(ImproperlyConfigured, match=r"^CHAT_METRICS_LISTEN='.*' is not ADDRESS:PORT"):
        metrics_listen()


def test_metric_names_are_the_documented_ones(asgi_app):
    """Alert rules match on these names and labels: a rename breaks them silently."""
    names = {metric.name: (metric.type, tuple(sorted({k for s in metric.samples for k in s.labels})))
             for metric in REGISTRY.collect() if metric.name.startswith("chat_")}
    assert names == {
        "chat_websockets_open": ("gauge", ()),
        "chat_websocket_handshakes": ("counter", ("outcome",)),
        "chat_messages_posted": ("counter", ()),
        "chat_messages_stored": ("counter", ()),
        "chat_messages_refused": ("counter", ("reason",)),
        "chat_fanout_delivery_seconds": ("histogram", ("le",)),
        "chat_behind_notices": ("counter", ()),
        "chat_hub_recoveries": ("counter", ()),
        "chat_db_call_seconds": ("histogram", ("kind", "le")),
        "chat_database_failover_waits": ("counter", ("kind", "outcome")),
        "chat_database_failover_wait_seconds": ("histogram", ("kind", "le")),
        "chat_release_info": ("gauge", ("interface", "release")),
        "chat_http_responses": ("counter", ("status",)),
    }
