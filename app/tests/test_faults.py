"""Riding through faults: a Redis restart or outage, a failing database write.

Each Redis test runs its own redis-server (no persistence, like the
deployment's), stops and starts it on the same port, and talks to the app
through the real channel layer of both kinds.
"""

import asyncio
import contextlib
import logging
import shutil
import subprocess
import time

import django.db
import psycopg
import pytest
from channels.db import database_sync_to_async
from channels.layers import channel_layers, get_channel_layer
from django.db import OperationalError
from django.test import override_settings

from chat import fanout, store
from chat.models import Message
from chatservice.logformat import FoldConnectionErrors

from .conftest import free_port, layers_for, receive_messages, sample, stop, wait_for_redis
from .test_consumers import send_message


pytestmark = pytest.mark.django_db(transaction=True)

CLOSE_TRY_AGAIN_LATER = 1013


class RestartableRedis:
    """A private redis-server that a test can stop and start again on the same port."""

    def __init__(self, workdir):
        self.workdir = workdir
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process = None

    def start(self):
        self.process = subprocess.Popen(
            [shutil.which("redis-server"), "--bind", "127.0.0.1", "--port", str(self.port),
             "--save", "", "--appendonly", "no", "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_redis(self.url)
        return time.monotonic()

    def stop(self):
        if self.process is not None:
            stop(self.process)
            self.process = None


@pytest.fixture
async def private_redis(tmp_path, layer_kind):
    """A restartable Redis as the channel layer, of each kind; closed before the loop ends."""
    server = RestartableRedis(tmp_path)
    server.start()
    try:
        with override_settings(CHANNEL_LAYERS=layers_for(server.url, layer_kind)):
            yield server
            for layer in list(channel_layers.backends.values()):
                with contextlib.suppress(Exception):
                    await layer.flush()
            channel_layers.backends = {}
    finally:
        server.stop()


@database_sync_to_async
def _stored(room_name):
    return list(Message.objects.filter(room__name=room_name).order_by("seq").values_list("seq", "body"))


async def _post_from_another_process(room_name, body):
    """What a poster in another Daphne does: store, then publish through its own layer."""
    message = (await database_sync_to_async(store.post_message)(room_name, "bob", body)).as_frame()
    layer_class = type(get_channel_layer())
    other = layer_class(**channel_layers.configs["default"]["CONFIG"])
    try:
        await other.group_send(fanout.group_name(room_name), {"type": fanout.EVENT_TYPE, "message": message})
    finally:
        await other.flush()
    return message


async def _eventually(condition, timeout, what):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} within {timeout} s")
        await asyncio.sleep(0.05)


async def test_open_sockets_stay_open_through_a_redis_restart(private_redis, join, room):
    alice, _ = await join(room)
    private_redis.stop()
    answering_since = private_redis.start()
    # Another process posts as soon as Redis answers: this process must be
    # back in the room's group (Redis kept nothing) and hear it within 5 s.
    # It may miss the publish itself while rejoining; then the message comes
    # from the database, as the hub reads back what it could not hear.
    posted = await _post_from_another_process(room, "after the restart")
    [message], _ = await receive_messages(alice, 1, timeout=5)
    assert message == posted
    assert time.monotonic() - answering_since < 5
    # The socket itself still works both ways.
    await send_message(alice, "still here")
    [echo], _ = await receive_messages(alice, 1, timeout=5)
    assert (echo["seq"], echo["body"]) == (2, "still here")
    await _eventually(lambda: fanout.get_hub().layer_ok, 5, "the hub did not see the layer again")


async def test_later_messages_from_other_processes_flow_after_the_restart(private_redis, join, room):
    alice, _ = await join(room)
    private_redis.stop()
    private_redis.start()
    hub = fanout.get_hub()
    # Whether or not the hub noticed the restart, live publishes reach it again.
    for number in range(1, 4):
        await _post_from_another_process(room, f"live {number}")
    messages, _ = await receive_messages(alice, 3, timeout=5)
    assert [m["body"] for m in messages] == ["live 1", "live 2", "live 3"]
    assert hub.unpublished == []


async def test_a_message_sent_while_redis_is_down_is_stored_and_published_later(
        private_redis, join, room, monkeypatch):
    recoveries = sample("chat_hub_recoveries_total")
    alice, _ = await join(room)
    hub = fanout.get_hub()
    private_redis.stop()
    await send_message(alice, "during the outage")
    # Stored first, and this process's own sockets get it at once.
    [echo], _ = await receive_messages(alice, 1, timeout=10)
    assert echo["body"] == "during the outage"
    assert await _stored(room) == [(1, "during the outage")]
    await _eventually(lambda: not hub.layer_ok and hub.unpublished, 10, "the hub did not keep it")
    assert [message["seq"] for _, message, _ in hub.unpublished] == [1]

    # Another process that listens in the room gets it once Redis is back.
    restarted_at = time.time()
    private_redis.start()
    listener = type(get_channel_layer())(**channel_layers.configs["default"]["CONFIG"])
    try:
        channel = await listener.new_channel()
        await listener.group_add(fanout.group_name(room), channel)
        event = await asyncio.wait_for(listener.receive(channel), 10)
        assert event["message"]["seq"] == 1
        # Timed from when it was stored, not from when it could be published.
        assert event["stored_at"] < restarted_at
    finally:
        await listener.flush()
    await _eventually(lambda: hub.layer_ok and not hub.unpublished, 5, "the hub did not recover")
    assert sample("chat_hub_recoveries_total") == recoveries + 1
    # Nothing is sent twice to the socket that already has it.
    assert await alice.receive_nothing(timeout=0.5)


async def test_a_handshake_while_redis_is_down_is_closed_with_try_again_later(
        private_redis, connect, join, room):
    unavailable = sample("chat_websocket_handshakes_total", outcome="unavailable")
    private_redis.stop()
    communicator = await connect(f"/ws/chat/{room}/")
    closed = await communicator.receive_output(timeout=10)
    assert (closed["type"], closed["code"]) == ("websocket.close", CLOSE_TRY_AGAIN_LATER)
    assert sample("chat_websocket_handshakes_total", outcome="unavailable") == unavailable + 1
    answering_since = private_redis.start()
    # The page retries with jitter; within 5 s of Redis answering it gets in.
    while True:
        try:
            client, _ = await join(room)
            break
        except AssertionError:
            if time.monotonic() - answering_since > 5:
                raise
            await asyncio.sleep(0.2)
    await send_message(client, "in again")
    [message], _ = await receive_messages(client, 1, timeout=5)
    assert message["body"] == "in again"


async def test_an_outage_logs_one_line_not_a_traceback_per_attempt(private_redis, join, room, caplog):
    await join(room)
    hub = fanout.get_hub()
    with caplog.at_level(logging.WARNING, logger="chat.fanout"):
        private_redis.stop()
        await _eventually(lambda: not hub.layer_ok, 10, "the hub did not notice the outage")
        await asyncio.sleep(3)  # several failed reads and probes
        private_redis.start()
        await _eventually(lambda: hub.layer_ok, 10, "the hub did not recover")
    records = [r for r in caplog.records if r.name == "chat.fanout"]
    assert [r.getMessage().split(" (")[0].split(" after")[0] for r in records] == [
        "channel layer unreachable", "channel layer answers again"]
    assert all(r.exc_info is None for r in records)


async def test_a_failed_write_gets_an_error_frame_and_the_socket_stays_open(join, room, monkeypatch):
    store_failed = sample("chat_messages_refused_total", reason="store_failed")
    alice, _ = await join(room)
    real = store.post_messages

    def locked(posts):
        raise OperationalError("database is locked")

    monkeypatch.setattr(store, "post_messages", locked)
    await alice.send_json_to({"type": "message", "nickname": "alice", "body": "refused", "client_id": "p-1"})
    frame = await alice.receive_json_from(timeout=5)
    # The error names the post, so the page keeps exactly that one for the user.
    assert (frame["type"], frame["code"], frame["client_id"]) == ("error", "store_failed", "p-1")
    assert sample("chat_messages_refused_total", reason="store_failed") == store_failed + 1
    assert await _stored(room) == []
    # Back by itself once the database answers.
    monkeypatch.setattr(store, "post_messages", real)
    await send_message(alice, "accepted")
    [message], _ = await receive_messages(alice, 1, timeout=5)
    assert (message["seq"], message["body"]) == (1, "accepted")


def _django_wrapped(psycopg_error, django_class):
    """The error Django raises for a psycopg one (django.db.utils.DatabaseErrorWrapper)."""
    try:
        raise psycopg_error
    except psycopg.Error as error:
        raise django_class(*error.args) from error


@pytest.mark.parametrize("error", [
    # A demoted primary (or a standby) answering a write.
    lambda: _django_wrapped(psycopg.errors.ReadOnlySqlTransaction(
        "cannot execute SELECT FOR UPDATE in a read-only transaction"), django.db.utils.InternalError),
    # The primary going away under a connection, or a failover's restart.
    lambda: _django_wrapped(psycopg.errors.AdminShutdown(
        "terminating connection due to administrator command"), django.db.utils.OperationalError),
    lambda: _django_wrapped(psycopg.OperationalError(
        "connection failed: connection to server at 10.0.0.4 port 5432 failed"), django.db.utils.OperationalError),
    lambda: _django_wrapped(psycopg.InterfaceError("the connection is closed"), django.db.utils.InterfaceError),
], ids=["read-only", "admin-shutdown", "unreachable", "closed"])
async def test_a_leader_change_under_a_write_gets_store_failed(join, room, monkeypatch, settings, error):
    """What a PostgreSQL failover throws at a write reaches the sender as
    store_failed once the wait for a primary is over (chat/failover.py;
    test_failover.py); the socket stays open and the next post is stored."""
    settings.DATABASE_FAILOVER_WAIT = 0.3
    alice, _ = await join(room)
    real = store._post_messages

    def failing(posts, attempt):
        error()

    monkeypatch.setattr(store, "_post_messages", failing)
    await alice.send_json_to({"type": "message", "nickname": "alice", "body": "refused", "client_id": "p-2"})
    frame = await alice.receive_json_from(timeout=5)
    assert (frame["type"], frame["code"], frame["client_id"]) == ("error", "store_failed", "p-2")
    monkeypatch.setattr(store, "_post_messages", real)
    await send_message(alice, "accepted")
    [message], _ = await receive_messages(alice, 1, timeout=5)
    assert (message["seq"], message["body"]) == (1, "accepted")


async def test_a_failed_history_read_gets_an_error_frame(join, room, monkeypatch):
    alice, _ = await join(room)

    def locked(*args):
        raise OperationalError("disk I/O error")

    monkeypatch.setattr(store, "messages_since", locked)
    await alice.send_json_to({"type": "history", "since": 0})
    frame = await alice.receive_json_from(timeout=5)
    assert frame["type"] == "error" and frame["code"] == "history_failed"


def _record(error, name="channels_redis.pubsub", created=0.0):
    record = logging.LogRecord(name, logging.ERROR, __file__, 1, "Unexpected exception in receive task",
                               (), (type(error), error, None))
    record.created = created
    return record


def test_connection_tracebacks_are_folded_into_one_line_now_and_then():
    import redis

    fold = FoldConnectionErrors(every=30)
    first = _record(redis.ConnectionError("Connection refused"), created=100.0)
    assert fold.filter(first) is True
    assert first.exc_info is None
    assert first.getMessage().startswith("Unexpected exception in receive task: ConnectionError: Connection refused")
    assert fold.filter(_record(redis.ConnectionError("again"), created=110.0)) is False
    assert fold.filter(_record(redis.ConnectionError("later"), created=131.0)) is True
    # Other errors keep their traceback.
    other = _record(ValueError("a bug"), created=111.0)
    assert fold.filter(other) is True and other.exc_info is not None


async def test_a_write_waiting_for_the_lock_does_not_stall_other_sockets(join, room):
    """Before: every database call of the process ran on one thread, behind the stuck write."""
    import sqlite3

    from django.db import connection

    alice, _ = await join(room)
    bob, _ = await join(room)
    holder = sqlite3.connect(connection.settings_dict["NAME"], isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")
    try:
        await send_message(alice, "waits for the lock")
        await asyncio.sleep(0.3)  # the write is now waiting for SQLite's lock
        started = time.monotonic()
        await bob.send_json_to({"type": "history", "since": 0})
        frame = await bob.receive_json_from(timeout=5)
        answered = time.monotonic() - started
        assert frame == {"type": "history", "messages": []}
        assert answered < 1.0, f"a read waited {answered:.2f} s behind a stuck write"
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    # The write goes through once the lock is free.
    [message], _ = await receive_messages(alice, 1, timeout=10)
    assert message["body"] == "waits for the lock"
