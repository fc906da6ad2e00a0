"""The WebSocket protocol against a real Redis channel layer."""

import asyncio
import socket
import time

import pytest
from channels.db import database_sync_to_async

from chat import store
from chat.models import Message

from .conftest import HOST, ORIGIN, receive_messages

pytestmark = pytest.mark.django_db(transaction=True)


async def send_message(communicator, body, nickname="alice"):
    await communicator.send_json_to({"type": "message", "nickname": nickname, "body": body})


async def test_two_clients_exchange_a_message(join, room, layer_kind):
    alice, alice_history = await join(room)
    bob, bob_history = await join(room)
    assert alice_history == bob_history == []

    await send_message(alice, "hello bob")

    for communicator in (alice, bob):
        frame = await communicator.receive_json_from(timeout=5)
        assert frame["type"] == "message"
        assert frame["seq"] == 1
        assert frame["room"] == room
        assert frame["nickname"] == "alice"
        assert frame["body"] == "hello bob"
        assert frame["created"].endswith("+00:00")
    stored = await database_sync_to_async(Message.objects.get)(id=frame["id"])
    assert (stored.seq, stored.body) == (1, "hello bob")


async def test_rooms_are_separate(join, room):
    here, _ = await join(room)
    elsewhere, _ = await join(room + "-other")
    await send_message(here, "only here")
    assert (await here.receive_json_from(timeout=5))["body"] == "only here"
    assert await elsewhere.receive_nothing(timeout=0.3)


async def test_joining_sends_the_last_50_messages(join, room):
    for number in range(1, 61):
        await database_sync_to_async(store.post_message)(room, "bot", f"m{number}")
    _, history = await join(room)
    assert [m["seq"] for m in history] == list(range(11, 61))
    assert history[-1]["body"] == "m60"
    assert set(history[0]) == {"type", "id", "seq", "room", "nickname", "body", "created", "client_id"}


async def test_history_since_answers_with_the_missing_messages(join, room):
    client, _ = await join(room)
    for number in range(1, 4):
        await send_message(client, f"live {number}")
        await client.receive_json_from(timeout=5)
    # Stored but never broadcast: only a history request can return it.
    await database_sync_to_async(store.post_message)(room, "bot", "quiet")

    await client.send_json_to({"type": "history", "since": 2})
    frame = await client.receive_json_from(timeout=5)
    assert frame["type"] == "history"
    assert [(m["seq"], m["body"]) for m in frame["messages"]] == [(3, "live 3"), (4, "quiet")]


async def test_history_pages_are_capped_at_200(join, room):
    await database_sync_to_async(_post_many)(room, 210)
    client, _ = await join(room)
    await client.send_json_to({"type": "history", "since": 0})
    first = (await client.receive_json_from(timeout=5))["messages"]
    assert [m["seq"] for m in first] == list(range(1, 201))
    await client.send_json_to({"type": "history", "since": 200})
    rest = (await client.receive_json_from(timeout=5))["messages"]
    assert [m["seq"] for m in rest] == list(range(201, 211))


def _post_many(room_name, count):
    for number in range(count):
        store.post_message(room_name, "bot", f"m{number}")


async def test_ping_gets_pong(join, room):
    client, _ = await join(room)
    await client.send_json_to({"type": "ping"})
    assert await client.receive_json_from(timeout=5) == {"type": "pong"}


async def test_body_is_stored_as_text(join, room):
    client, _ = await join(room)
    markup = "<script>alert(1)</script> &amp;"
    await send_message(client, markup, nickname="Zoë_o.k-1 x")
    frame = await client.receive_json_from(timeout=5)
    assert frame["body"] == markup
    assert frame["nickname"] == "Zoë_o.k-1 x"


@pytest.mark.parametrize(
    "frame, code",
    [
        ("not json", "invalid_json"),
        ('["a", "list"]', "invalid_json"),
        ('{"type": "shout"}', "unknown_type"),
        ('{"body": "no type"}', "unknown_type"),
        ('{"type": "message", "nickname": "alice", "body": "   "}', "empty_body"),
        ('{"type": "message", "nickname": "alice"}', "empty_body"),
        ('{"type": "message", "nickname": "alice", "body": 42}', "empty_body"),
        ('{"type": "message", "nickname": "", "body": "hi"}', "invalid_nickname"),
        ('{"type": "message", "nickname": "<b>", "body": "hi"}', "invalid_nickname"),
        ('{"type": "message", "nickname": "' + "n" * 33 + '", "body": "hi"}', "invalid_nickname"),
        ('{"type": "message", "body": "hi"}', "invalid_nickname"),
        ('{"type": "history"}', "invalid_since"),
        ('{"type": "history", "since": -1}', "invalid_since"),
        ('{"type": "history", "since": "3"}', "invalid_since"),
        ('{"type": "history", "since": 1.5}', "invalid_since"),
        ('{"type": "history", "since": true}', "invalid_since"),
        ('{"type": "message", "nickname": "alice", "body": "hi", "client_id": ""}', "invalid_client_id"),
        ('{"type": "message", "nickname": "alice", "body": "hi", "client_id": 7}', "invalid_client_id"),
        ('{"type": "message", "nickname": "alice", "body": "hi", "client_id": "a b"}', "invalid_client_id"),
        ('{"type": "message", "nickname": "alice", "body": "hi", "client_id": "' + "x" * 65 + '"}',
         "invalid_client_id"),
    ],
)
async def test_bad_frame_gets_error_and_connection_stays_usable(join, room, frame, code):
    client, _ = await join(room)
    await client.send_to(text_data=frame)
    error = await client.receive_json_from(timeout=5)
    assert error["type"] == "error"
    assert error["code"] == code
    assert isinstance(error["detail"], str) and error["detail"]
    await client.send_json_to({"type": "ping"})
    assert await client.receive_json_from(timeout=5) == {"type": "pong"}


async def test_binary_frame_is_refused(join, room):
    client, _ = await join(room)
    await client.send_to(bytes_data=b'{"type": "ping"}')
    error = await client.receive_json_from(timeout=5)
    assert error["code"] == "binary_not_supported"
    await client.send_json_to({"type": "ping"})
    assert await client.receive_json_from(timeout=5) == {"type": "pong"}


async def test_body_length_limit(join, room, settings):
    settings.CHAT_MAX_BODY_LENGTH = 10
    client, _ = await join(room)
    await send_message(client, "x" * 11)
    assert (await client.receive_json_from(timeout=5))["code"] == "body_too_long"
    await send_message(client, "x" * 10)
    assert (await client.receive_json_from(timeout=5))["body"] == "x" * 10


async def test_default_body_limit_is_2000(join, room):
    client, _ = await join(room)
    await send_message(client, "y" * 2001)
    assert (await client.receive_json_from(timeout=5))["code"] == "body_too_long"
    await send_message(client, "y" * 2000)
    assert len((await client.receive_json_from(timeout=5))["body"]) == 2000


async def test_rate_limit_refuses_frames_beyond_the_burst(join, room, settings):
    settings.CHAT_RATE_BURST = 3
    # One token back every 2 s: the four frames are answered well within
    # that even on a loaded machine (at 20 a second, 50 ms between the first
    # and the fourth refilled one, and the check failed beside two Molecule runs).
    settings.CHAT_RATE_PER_SECOND = 0.5
    client, _ = await join(room)
    for _ in range(4):
        await client.send_json_to({"type": "history", "since": 0})
    replies = [await client.receive_json_from(timeout=5) for _ in range(4)]
    assert [reply["type"] for reply in replies[:3]] == ["history"] * 3
    assert replies[3]["type"] == "error" and replies[3]["code"] == "rate_limited"
    # The bucket refills: the connection recovers.
    await asyncio.sleep(2.1)
    await client.send_json_to({"type": "history", "since": 0})
    assert (await client.receive_json_from(timeout=5))["type"] == "history"


async def test_sockets_of_one_address_share_its_message_rate(asgi_app, room, settings, close_layers, monkeypatch):
    """Two sockets from one address: together they get the address's rate,
    counted in Redis (where every process and host sees it), not one each."""
    from channels.testing import WebsocketCommunicator
    from chat import addressrate

    settings.CHAT_MESSAGES_PER_ADDRESS_PER_SECOND = 3
    # Every post counted at one instant: the four posts below fall in one
    # window however slowly a loaded machine answers them.
    at, allow = time.time(), addressrate.allow
    monkeypatch.setattr(addressrate, "allow",
                        lambda url, address, per_second: allow(url, address, per_second, now=lambda: at))

    def from_address(address):
        async def app(scope, receive, send):
            return await asgi_app({**scope, "client": [address, 40000]}, receive, send)
        return app

    sockets = []
    try:
        for address in ("2001:db8:9::1", "2001:db8:9::2", "203.0.113.77"):  # two of one /64, one other
            socket_ = WebsocketCommunicator(from_address(address), f"/ws/chat/{room}/", headers=[ORIGIN, HOST])
            assert (await socket_.connect(timeout=5))[0]
            assert (await socket_.receive_json_from(timeout=5))["type"] == "history"
            sockets.append(socket_)
        first, second, other = sockets

        async def post(socket_, body):
            """Its answer: "stored" (the echo of its post) or the error's code."""
            await send_message(socket_, body)
            while True:
                frame = await socket_.receive_json_from(timeout=5)
                if frame.get("body") == body or frame["type"] == "error":
                    return frame.get("code", "stored")

        answers = [await post(socket_, f"m{n}") for n, socket_ in enumerate([first, second, first, second])]
        assert answers == ["stored", "stored", "stored", "rate_limited"]
        assert await post(other, "another address") == "stored"
    finally:
        for socket_ in sockets:
            await socket_.disconnect()


async def test_pings_do_not_count_against_the_message_rate(join, room, settings):
    """The page pings every 25 s: those keepalives must never cost it a message."""
    settings.CHAT_RATE_BURST = 2
    settings.CHAT_RATE_PER_SECOND = 0.01
    client, _ = await join(room)
    for _ in range(2):
        await client.send_json_to({"type": "ping"})
        assert await client.receive_json_from(timeout=5) == {"type": "pong"}
    # The pings spent nothing of the message bucket: both messages go through.
    for body in ("one", "two"):
        await send_message(client, body)
        assert (await client.receive_json_from(timeout=5))["body"] == body
    await send_message(client, "three")
    assert (await client.receive_json_from(timeout=5))["code"] == "rate_limited"


async def test_a_flood_of_pings_is_still_limited(join, room, settings):
    settings.CHAT_RATE_BURST = 2
    settings.CHAT_RATE_PER_SECOND = 0.01
    client, _ = await join(room)
    for _ in range(3):
        await client.send_json_to({"type": "ping"})
    replies = [await client.receive_json_from(timeout=5) for _ in range(3)]
    assert replies[:2] == [{"type": "pong"}] * 2
    assert replies[2]["code"] == "rate_limited"
    # ...and that flood cost the message bucket nothing.
    await send_message(client, "still allowed")
    assert (await client.receive_json_from(timeout=5))["body"] == "still allowed"


async def test_invalid_frames_count_against_the_rate(join, room, settings):
    settings.CHAT_RATE_BURST = 1
    settings.CHAT_RATE_PER_SECOND = 0.01
    client, _ = await join(room)
    await client.send_to(text_data="not json")
    assert (await client.receive_json_from(timeout=5))["code"] == "invalid_json"
    await client.send_to(text_data="not json either")
    assert (await client.receive_json_from(timeout=5))["code"] == "rate_limited"


async def test_rate_limited_message_is_not_stored(join, room, settings):
    settings.CHAT_RATE_BURST = 1
    settings.CHAT_RATE_PER_SECOND = 0.01
    client, _ = await join(room)
    await send_message(client, "first")
    assert (await client.receive_json_from(timeout=5))["seq"] == 1
    await send_message(client, "second")
    assert (await client.receive_json_from(timeout=5))["code"] == "rate_limited"
    count = await database_sync_to_async(Message.objects.filter(room__name=room).count)()
    assert count == 1


@pytest.mark.parametrize(
    "name", ["UPPER", "a" * 51, "dots.in.name", "sp%20ace", "%C3%A9t%C3%A9"]
)
async def test_invalid_room_is_closed_with_4004(connect, name):
    client = await connect(f"/ws/chat/{name}/")
    assert await client.receive_output(timeout=5) == {"type": "websocket.close", "code": 4004}


async def test_longest_valid_room_name_is_accepted(join):
    _, history = await join("a-" + "z" * 46 + "_9")
    assert history == []


async def test_unknown_websocket_path_is_closed_with_4004(connect):
    client = await connect("/ws/nothing-here/")
    assert await client.receive_output(timeout=5) == {"type": "websocket.close", "code": 4004}


@pytest.mark.parametrize(
    "headers",
    [
        [(b"origin", b"http://evil.example"), HOST],
        [HOST],  # no Origin at all
    ],
    ids=["foreign-origin", "no-origin"],
)
async def test_origin_validator_refuses_handshake(asgi_app, room, headers, close_layers):
    from channels.testing import WebsocketCommunicator

    communicator = WebsocketCommunicator(asgi_app, f"/ws/chat/{room}/", headers=headers)
    connected, _ = await communicator.connect(timeout=5)
    assert connected is False


async def test_websocket_health(connect, settings):
    settings.RELEASE = "r-2024"
    client = await connect("/ws/health/")
    frame = await client.receive_json_from(timeout=5)
    # The server's name is proved against real servers (test_servers.py).
    assert frame.pop("server") in {"daphne", "uvicorn", "gunicorn", "unknown"}
    assert frame == {"status": "ok", "interface": "asgi", "release": "r-2024", "host": socket.gethostname()}
    assert await client.receive_output(timeout=5) == {"type": "websocket.close", "code": 1000}


@pytest.mark.parametrize(("forwarded_for", "sources", "detail"), [
    ("203.0.113.7", [], False),  # a visitor through the proxy
    ("127.0.0.1", [], True),  # the deploy's gate through the host's own proxy
    ("10.0.5.9", ["10.0.5.0/24"], True),  # the monitoring
    ("2001:db8::9", ["2001:db8::/64"], True),
    ("not-an-address", ["10.0.5.0/24"], False),
])
async def test_websocket_health_names_the_release_only_to_trusted_callers(
        connect, settings, forwarded_for, sources, detail):
    import ipaddress

    settings.RELEASE = "r-2024"
    settings.HEALTH_DETAIL_SOURCES = [ipaddress.ip_network(source) for source in sources]
    client = await connect("/ws/health/", headers=(ORIGIN, HOST, (b"x-forwarded-for", forwarded_for.encode())))
    frame = await client.receive_json_from(timeout=5)
    assert frame["status"] == "ok"
    assert ("release" in frame) is detail, frame
    if not detail:
        assert frame == {"status": "ok"}


async def test_websocket_health_checks_origin(asgi_app, close_layers):
    from channels.testing import WebsocketCommunicator

    communicator = WebsocketCommunicator(
        asgi_app, "/ws/health/", headers=[(b"origin", b"https://evil.example"), HOST]
    )
    connected, _ = await communicator.connect(timeout=5)
    assert connected is False


async def test_idle_consumer_outlives_redis_py_default_socket_timeout(join, room):
    """redis-py 8 would time out the core layer's 5 s blocking pop without our pool options."""
    listener, _ = await join(room)
    await asyncio.sleep(6.5)
    sender, _ = await join(room)
    await send_message(sender, "still there?")
    assert (await listener.receive_json_from(timeout=5))["body"] == "still there?"


async def test_frames_are_counted_per_connection(join, room, settings):
    settings.CHAT_RATE_BURST = 2
    settings.CHAT_RATE_PER_SECOND = 0.01
    first, _ = await join(room)
    second, _ = await join(room)
    for client in (first, second):
        for _ in range(2):
            await client.send_json_to({"type": "ping"})
            assert await client.receive_json_from(timeout=5) == {"type": "pong"}


async def _post(communicator, body, client_id, nickname="alice"):
    await communicator.send_json_to({"type": "message", "nickname": nickname, "body": body,
                                     "client_id": client_id})


async def test_a_repeated_client_id_gets_the_stored_message_back_not_a_second_copy(join, room):
    alice, _ = await join(room)
    bob, _ = await join(room)
    await _post(alice, "once", "f47ac10b-58cc-4372-a567-0e02b2c3d479")
    first = await alice.receive_json_from(timeout=5)
    assert (first["seq"], first["client_id"]) == (1, "f47ac10b-58cc-4372-a567-0e02b2c3d479")
    assert (await bob.receive_json_from(timeout=5))["seq"] == 1
    # The same post again (a resend): the sender gets the stored message.
    await _post(alice, "once", "f47ac10b-58cc-4372-a567-0e02b2c3d479")
    again = await alice.receive_json_from(timeout=5)
    assert again == first
    assert await bob.receive_nothing(timeout=0.3)
    # Posts without an id, or with another one, are stored as usual.
    await send_message(alice, "once")
    await _post(alice, "once", "another")
    messages, _ = await receive_messages(alice, 2)
    assert [m["seq"] for m in messages] == [2, 3]
    stored = await database_sync_to_async(lambda: list(
        Message.objects.filter(room__name=room).values_list("seq", "client_id")))()
    assert stored == [(1, "f47ac10b-58cc-4372-a567-0e02b2c3d479"), (2, None), (3, "another")]


async def test_a_post_stored_by_a_process_that_died_is_answered_and_reaches_the_room(join, room):
    """The resend path: stored, but its process died before answering or publishing."""
    bob, _ = await join(room)
    # What the killed process left: the message in the database, nothing published.
    await database_sync_to_async(store.post_message)(room, "alice", "in flight", "resend-1")
    assert await bob.receive_nothing(timeout=0.3)
    # The page reconnects and resends its unacknowledged post.
    alice, history = await join(room)
    assert history == []  # this process never heard of it
    await _post(alice, "in flight", "resend-1")
    # The answer, and the same message live (the room's live stream here).
    answers, _ = await receive_messages(alice, 2)
    assert [(m["seq"], m["body"], m["client_id"]) for m in answers] == [(1, "in flight", "resend-1")] * 2
    # Handed out again: the others get it now, once.
    live = await bob.receive_json_from(timeout=5)
    assert (live["seq"], live["client_id"]) == (1, "resend-1")
    assert await database_sync_to_async(Message.objects.filter(room__name=room).count)() == 1


async def test_an_error_frame_names_the_refused_post(join, room, settings):
    settings.CHAT_MAX_BODY_LENGTH = 5
    alice, _ = await join(room)
    await _post(alice, "too long", "post-7")
    assert await alice.receive_json_from(timeout=5) == {
        "type": "error", "code": "body_too_long", "detail": "body is longer than 5 characters",
        "client_id": "post-7"}
