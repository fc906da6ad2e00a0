"""Redis through Sentinel: the channel layer, the watchdog, the rate limit and /healthz.

Each test runs a SentinelCluster of real processes (conftest.py): two
redis-servers and three sentinels. The failover tests check that what the
app built before the failover (the layer, the rate limit's client, the
settings) works against the new master afterwards, within a bound, and
print how long each took (pytest -s shows it).
"""

import asyncio
import contextlib
import signal
import time

import pytest
import redis
from asgiref.sync import sync_to_async
from channels.db import database_sync_to_async
from channels.layers import channel_layers, get_channel_layer
from channels_redis.core import RedisChannelLayer
from channels_redis.pubsub import RedisPubSubChannelLayer
from django.db import connections
from django.test import override_settings
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import SentinelConnectionPool
from redis.backoff import NoBackoff

from chat import addressrate, fanout, health, store
from chatservice import redisconn
from chatservice.layers import build_channel_layers

from .conftest import free_port, receive_messages, sample
from .test_consumers import send_message
from .test_faults import _eventually

pytestmark = pytest.mark.django_db(transaction=True)

# Seconds within which the app must work against the new master, from the
# failover's start. Below the 10 s or so a demoted master stays writable
# after SENTINEL FAILOVER, so only following the sentinels passes.
FAILOVER_BOUND = 7.0
# From SIGKILL: the sentinels need 1 s to call the master down, then a vote.
KILL_BOUND = 10.0


def layers_through(cluster, kind, monkeypatch):
    """CHANNEL_LAYERS as settings build them from the cluster's environment."""
    for name, value in {**cluster.env(), "CHANNEL_LAYER": kind}.items():
        monkeypatch.setenv(name, value)
    return build_channel_layers()


@pytest.fixture
async def app_through(sentinel_cluster, monkeypatch, request):
    """The app's settings pointing at the cluster, as a deployment's
    environment would; the layer's kind from indirect parametrization."""
    kind = getattr(request, "param", "pubsub")
    with override_settings(CHANNEL_LAYERS=layers_through(sentinel_cluster, kind, monkeypatch),
                           **sentinel_cluster.settings()):
        yield sentinel_cluster
        # Before the loop ends, and after the sockets left (requested before join).
        for layer in list(channel_layers.backends.values()):
            with contextlib.suppress(Exception):
                await layer.flush()
        channel_layers.backends = {}


async def _post_from_another_process(room_name, body):
    """What a poster in another Daphne does: store, then publish through a layer of its own.

    Unlike test_faults' helper, it does not flush the core layer afterwards,
    which would delete every asgi* key (the groups, the watchdog's key).
    """
    message = (await database_sync_to_async(store.post_message)(room_name, "bob", body)).as_frame()
    other = type(get_channel_layer())(**channel_layers.configs["default"]["CONFIG"])
    try:
        await other.group_send(fanout.group_name(room_name), {"type": fanout.EVENT_TYPE, "message": message})
    finally:
        await (other.close_pools() if isinstance(other, RedisChannelLayer) else other.flush())
    return message


@sync_to_async
def _healthz(client):
    try:
        return client.get("/healthz")
    finally:
        # The test client leaves the thread its connection: on PostgreSQL,
        # one of the pool's, for good.
        connections.close_all()


def _app_clients(cluster, node):
    """The connections this test process's app holds to a data node: all but
    the sentinels' (named sentinel-...), replication links and this listing."""
    with contextlib.closing(cluster.client(node)) as client:
        return [c for c in client.client_list()
                if not c["name"] and not set(c["flags"]) & {"S", "M"} and c["cmd"] != "client|list"]


async def _until(check, started, bound, what):
    """Seconds from started until check() (a coroutine function) returns true; fails after bound."""
    while True:
        try:
            if await check():
                return time.monotonic() - started
        except Exception:  # noqa: S110 (still failing over: ask again)
            pass
        if time.monotonic() - started > bound:
            raise AssertionError(f"{what} within {bound} s")
        await asyncio.sleep(0.1)


async def _seen_within(communicator, body, seconds):
    """Whether a message with this body reaches the communicator within seconds.

    Never lets a receive time out: a timeout cancels the communicator's app.
    """
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if await communicator.receive_nothing(timeout=min(0.05, max(0.0, deadline - time.monotonic()))):
            continue
        frame = await communicator.receive_json_from()
        if body in [m["body"] for m in frame.get("messages", [frame]) if m.get("type", "message") == "message"]:
            return True
    return False


# The configuration ------------------------------------------------------------

@pytest.mark.parametrize("kind", ["core", "pubsub"])
async def test_the_layer_carries_a_group_message_through_sentinels(sentinel_cluster, kind, monkeypatch):
    config = layers_through(sentinel_cluster, kind, monkeypatch)["default"]["CONFIG"]
    [host] = config["hosts"]
    assert host["sentinels"] == sentinel_cluster.sentinels
    assert host["master_name"] == "chat"
    layer = (RedisChannelLayer if kind == "core" else RedisPubSubChannelLayer)(**config)
    try:
        channel = await layer.new_channel()
        await layer.group_add("probe", channel)
        await layer.group_send("probe", {"type": "probe.message", "text": "hi"})
        assert (await asyncio.wait_for(layer.receive(channel), 5))["text"] == "hi"
        pool = layer.connection(0).connection_pool if kind == "core" else layer._shards[0]._redis.connection_pool
        assert isinstance(pool, SentinelConnectionPool)
        assert pool.master_address == sentinel_cluster.master()
        # The layer's own pool options, as without sentinels.
        assert pool.max_connections == 1000
        assert pool.connection_kwargs["socket_timeout"] is None
        assert pool.connection_kwargs["password"] == sentinel_cluster.DATA_PASSWORD
    finally:
        await layer.flush()


async def test_rate_limit_and_health_through_sentinels(app_through, client):
    cluster = app_through
    target = redisconn.from_settings()
    allowed = [await addressrate.allow(target, "203.0.113.7", 2) for _ in range(3)]
    assert allowed == [True, True, False]
    with contextlib.closing(cluster.client(cluster.master())) as master:
        assert master.zcard(addressrate.KEY_PREFIX + "203.0.113.7") == 3
    response = await _healthz(client)
    assert response.status_code == 200
    body = response.json()
    assert body["checks"]["redis"] == "ok"
    host, port = cluster.master()
    assert body["redis_master"] == f"{host}:{port}"


async def test_health_says_why_no_master_was_found(app_through, client):
    with override_settings(REDIS_SENTINEL_MASTER="nope"):
        result, master = await sync_to_async(health.check_redis)()
        response = await _healthz(client)
    assert master is None
    assert result.startswith("no master for 'nope' from sentinels 127.0.0.1:")
    assert result.count("knows no such master") == 3
    assert response.status_code == 503
    assert response.json()["checks"]["redis"] == result
    assert "redis_master" not in response.json()

    with override_settings(REDIS_SENTINEL_PASSWORD="wrong"):
        result, _ = await sync_to_async(health.check_redis)()
    assert result.startswith("no master for 'chat' from sentinels ")
    assert result.count("AuthenticationError") == 3

    nobody = [("127.0.0.1", free_port()), ("127.0.0.1", free_port())]
    with override_settings(REDIS_SENTINELS=nobody):
        started = time.monotonic()
        result, _ = await sync_to_async(health.check_redis)()
    assert result == (f"no master for 'chat' from sentinels 127.0.0.1:{nobody[0][1]} ConnectionError, "
                      f"127.0.0.1:{nobody[1][1]} ConnectionError")
    assert time.monotonic() - started < 2 * 2.0 + 1

    # The data nodes' password comes from REDIS_URL, whose host is not used.
    with override_settings(REDIS_URL="redis://:wrong@unused.invalid/0"):
        result, _ = await sync_to_async(health.check_redis)()
    assert result.startswith("AuthenticationError")


# Failover -----------------------------------------------------------------------

async def _app_works_after(cluster, fail, bound, join, room):
    """Joins a room through the cluster, fails it over with fail(), and checks
    that the layer, the rate limit and /healthz, all built before, work
    against the new master within bound seconds of the failover's start
    (printed). Then live messages flow both ways without the database's help."""
    alice, _ = await join(room)
    hub = fanout.get_hub()
    target = redisconn.from_settings()
    rate_key = addressrate.KEY_PREFIX + "203.0.113.8"
    assert await addressrate.allow(target, "203.0.113.8", 1000)
    old = cluster.master()

    started = time.monotonic()
    promoted = await asyncio.to_thread(fail)
    new = cluster.master()
    assert new != old
    numbers = iter(range(1, 1000))

    async def layer_carries():
        # Another process stores and publishes through a layer of its own,
        # built now, so on the new master; alice's process must hear it.
        body = f"after {next(numbers)}"
        await _post_from_another_process(room, body)
        return await _seen_within(alice, body, 1.0)

    async def rate_counts():
        with contextlib.closing(cluster.client(new)) as master:
            before = master.zcard(rate_key)
            await addressrate.allow(target, "203.0.113.8", 1000)
            return master.zcard(rate_key) > before

    async def health_ok():
        return await sync_to_async(health.check_redis)() == ("ok", redisconn.format_addresses([new]))

    layer, rate, healthz = await asyncio.gather(
        _until(layer_carries, started, bound, "the layer did not carry messages"),
        _until(rate_counts, started, bound, "the rate limit did not count on the new master"),
        _until(health_ok, started, bound, "/healthz did not reach the new master"))
    print(f"\n{fail.__name__} ({type(hub.layer).__name__}): sentinels agreed after {promoted:.1f} s; "
          f"worked again after: layer {layer:.1f} s, rate limit {rate:.1f} s, health {healthz:.1f} s")

    # Nothing of this process is left on the old master (which, when it
    # still runs, is still a writable master for a while).
    if cluster.processes[old].poll() is None:
        assert _app_clients(cluster, old) == []
    # Once the watchdog has seen the new master (and recovered, if it had
    # to), messages flow live: no recovery reads them from the database.
    await asyncio.sleep(fanout.WATCH_INTERVAL * 1.5)
    await _eventually(lambda: hub.layer_ok, bound, "the hub did not recover")
    while not await alice.receive_nothing(timeout=0.3):
        await alice.receive_json_from()
    recoveries = sample("chat_hub_recoveries_total")
    posted = await _post_from_another_process(room, "live again")
    [message], _ = await receive_messages(alice, 1, timeout=2)
    assert message == posted
    await send_message(alice, "from alice")
    [echo], _ = await receive_messages(alice, 1)
    assert echo["body"] == "from alice"
    assert sample("chat_hub_recoveries_total") == recoveries
    return promoted, layer, rate, healthz


@pytest.mark.parametrize("app_through", ["pubsub", "core"], indirect=True)
async def test_the_app_follows_sentinel_failover(app_through, join, room):
    await _app_works_after(app_through, app_through.failover, FAILOVER_BOUND, join, room)


@pytest.mark.parametrize("app_through", ["pubsub", "core"], indirect=True)
async def test_the_app_rides_through_a_killed_master(app_through, join, room):
    await _app_works_after(app_through, app_through.kill_master, KILL_BOUND, join, room)


async def test_a_master_with_no_replica_in_sync_keeps_the_layer(app_through, join, room):
    """With min-replicas-to-write (roles/redis, for a master cut off from the others), a master
    whose replicas are all silent refuses writes (NOREPLICAS) but still takes PUBLISH: the
    pub/sub layer works, and the watchdog's write refused is no reason to call the layer down
    (which refused every new room until a recovery). Here the replica is stopped (SIGSTOP)."""
    alice, _ = await join(room)
    hub = fanout.get_hub()
    master, replica = app_through.master(), next(node for node in app_through.data_nodes
                                                 if node != app_through.master())
    with contextlib.closing(app_through.client(master)) as client:
        client.config_set("min-replicas-to-write", 1)
        client.config_set("min-replicas-max-lag", 1)
        recoveries = sample("chat_hub_recoveries_total")
        app_through.processes[replica].send_signal(signal.SIGSTOP)
        try:
            await _eventually(lambda: client.info("replication")["min_slaves_good_slaves"] == 0, 10,
                              "the master still counts its stopped replica")
            with pytest.raises(redis.exceptions.ResponseError, match="NOREPLICAS"):
                client.set("k", "refused")
            # The watchdog has met the refusal a few times meanwhile.
            await asyncio.sleep(fanout.WATCH_INTERVAL * 3)
            # Down even for a moment (then recovered in 0.2 s) counts: a room
            # opened then was refused.
            assert hub.layer_ok, "a master refusing writes was taken for a layer down"
            assert sample("chat_hub_recoveries_total") == recoveries, "the hub went down and recovered meanwhile"
            posted = await _post_from_another_process(room, "published without replicas")
            [message], _ = await receive_messages(alice, 1, timeout=2)
            assert message == posted
            bob, _ = await join(room + "-new")
            await send_message(bob, "a new room")
            [echo], _ = await receive_messages(bob, 1)
            assert echo["body"] == "a new room"
        finally:
            app_through.processes[replica].send_signal(signal.SIGCONT)
            client.config_set("min-replicas-to-write", 0)


# What the app relies on in redis-py, and its own follow_master ---------------------

def _client_of(cluster):
    target = redisconn.build(cluster.env()["REDIS_URL"], cluster.sentinels, "chat",
                             cluster.APP_USER, cluster.APP_PASSWORD)
    return redisconn.async_client(target, socket_timeout=2, socket_connect_timeout=2, retry=Retry(NoBackoff(), 1))


async def test_a_connection_to_a_demoted_master_is_dropped_on_readonly(sentinel_cluster):
    """READONLY from its master means a failover happened: redis-py's
    SentinelManagedConnection disconnects, and the retry reconnects through
    the sentinels (redisconn.FollowingConnection: redis-py 8.1 alone went
    back to the old address, and met READONLY again). Here the old master is
    demoted by hand right after the failover, as the sentinels do 10 s
    later, minus their CLIENT KILL."""
    client = _client_of(sentinel_cluster)
    try:
        await client.set("k", "before")
        old = sentinel_cluster.master()
        assert redisconn.master_address(client) == old
        await asyncio.to_thread(sentinel_cluster.failover)
        new = sentinel_cluster.master()
        with contextlib.closing(sentinel_cluster.client(old)) as demoted:
            demoted.replicaof(*new)
            assert demoted.role()[0] == "slave"
        await client.set("k", "after")  # READONLY, disconnect, retry through the sentinels
        with contextlib.closing(sentinel_cluster.client(new)) as master:
            assert master.get("k") == "after"
        assert redisconn.master_address(client) == new
        assert _app_clients(sentinel_cluster, old) == []
    finally:
        await client.aclose()


async def test_follow_master_closes_connections_to_a_master_no_longer_named(sentinel_cluster):
    """After SENTINEL FAILOVER the old master stays a writable master for a
    while, and a connection on it goes on writing there. follow_master (the
    watchdog's, every second) closes it; the next command reaches the new
    master."""
    client = _client_of(sentinel_cluster)
    try:
        old = sentinel_cluster.master()
        assert await redisconn.follow_master(client) == old
        await client.set("k", "before")
        await asyncio.to_thread(sentinel_cluster.failover)
        new = sentinel_cluster.master()
        assert _app_clients(sentinel_cluster, old) != []
        assert await redisconn.follow_master(client) == new
        assert _app_clients(sentinel_cluster, old) == []
        await client.set("k", "after")
        with contextlib.closing(sentinel_cluster.client(new)) as master:
            assert master.get("k") == "after"
    finally:
        await client.aclose()


async def test_follow_master_is_a_no_op_without_sentinels(redis_url):
    client = redisconn.async_client(redis_url)
    try:
        assert await redisconn.follow_master(client) is None
    finally:
        await client.aclose()
