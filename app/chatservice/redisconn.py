"""The one place that builds connections to the app's Redis: the channel
layer's pool, the asyncio clients (the hub's watchdog, the address rate
limit) and the health check's client.

Redis is reached either at REDIS_URL itself, or, with REDIS_SENTINELS set,
at the master that Redis Sentinel names for REDIS_SENTINEL_MASTER. Then
every new connection asks the sentinels first (redis-py's
SentinelConnectionPool), so after a failover reconnecting is all it takes:
no new settings, no restart. REDIS_URL still gives the data nodes'
credentials and database number; its host and port are not used.

Connections that are already open need more. redis-py drops one whose
master answers READONLY (demoted to a replica; FollowingConnection makes
the retry reconnect through the sentinels too), and the sentinels close
the clients of an old master when they make it a replica. But after a
forced failover (SENTINEL FAILOVER) or a partition, the old master stays a
writable master for 10 s or more before they do (Redis 7.0: 8 s after its
role was last reported, then its next INFO), and processes still on it
would publish where the others no longer listen. So the hub's watchdog
asks the sentinels every second and closes this process's connections to
any other master (follow_master); they reconnect to the one named. The
health check needs none of this: it connects afresh each time.

Callers keep their own timeouts and retry policy; the sentinels get the
caller's connect timeout shared out between them (each at least 0.1 s), so
finding the master takes no longer than one connect, even with a sentinel
that swallows packets, and a sentinel that does not answer is not retried:
the next one is asked.
"""

import asyncio
import weakref
from dataclasses import dataclass, field

import redis
import redis.asyncio
import redis.asyncio.sentinel
import redis.sentinel
from django.core.exceptions import ImproperlyConfigured
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.connection import parse_url
from redis.retry import Retry

from .env import env_host_ports, env_str

DEFAULT_URL = "redis://127.0.0.1:6379/0"
DEFAULT_MASTER = "chat"
# The shortest time a sentinel is given to connect or answer.
SENTINEL_TIMEOUT_MIN = 0.1


@dataclass(frozen=True)
class RedisTarget:
    """Where the app's Redis is: a URL, or the master the sentinels name.

    Hashable, so clients can be cached per target. Passwords stay out of
    repr() and str(), which end up in logs.
    """

    url: str | None = field(default=DEFAULT_URL, repr=False)
    sentinels: tuple = ()
    master: str = DEFAULT_MASTER
    # The data nodes' credentials and database, from REDIS_URL (sentinels only).
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    db: int = 0
    sentinel_username: str | None = None
    sentinel_password: str | None = field(default=None, repr=False)

    def __str__(self):
        if not self.sentinels:
            try:
                kwargs = parse_url(self.url)
            except ValueError:
                return "REDIS_URL"
            if "path" in kwargs:
                return kwargs["path"]
            return format_addresses([(kwargs.get("host", "localhost"), kwargs.get("port", 6379))])
        return f"master {self.master!r} of sentinels {format_addresses(self.sentinels)}"


def format_addresses(addresses):
    return ", ".join(f"[{host}]:{port}" if ":" in host else f"{host}:{port}" for host, port in addresses)


def build(url, sentinels=(), master=DEFAULT_MASTER, sentinel_username=None, sentinel_password=None):
    """A RedisTarget from the settings' values; a bad REDIS_URL for sentinels stops start-up."""
    if not sentinels:
        return RedisTarget(url=url)
    try:
        if not url.startswith("redis://"):
            raise ValueError
        kwargs = parse_url(url)
    except ValueError:
        # Not repeated in the message: REDIS_URL holds the data nodes' password.
        raise ImproperlyConfigured(
            "REDIS_URL must be redis://[[USER]:PASSWORD@]HOST[:PORT]/DB when REDIS_SENTINELS is set "
            "(only its credentials and database number are used; TLS and unix sockets are not supported)."
        ) from None
    return RedisTarget(
        url=None,
        sentinels=tuple((host, int(port)) for host, port in sentinels),
        master=master or DEFAULT_MASTER,
        username=kwargs.get("username"),
        password=kwargs.get("password"),
        db=int(kwargs.get("db", 0)),
        sentinel_username=sentinel_username or None,
        sentinel_password=sentinel_password or None,
    )


def from_env():
    """The Redis the environment names (REDIS_URL, REDIS_SENTINELS, ...)."""
    return build(
        env_str("REDIS_URL", DEFAULT_URL),
        env_host_ports("REDIS_SENTINELS"),
        env_str("REDIS_SENTINEL_MASTER").strip() or DEFAULT_MASTER,
        env_str("REDIS_SENTINEL_USERNAME"),
        env_str("REDIS_SENTINEL_PASSWORD"),
    )


def from_settings():
    """The Redis the Django settings name (what /healthz checks)."""
    from django.conf import settings

    return build(
        settings.REDIS_URL,
        getattr(settings, "REDIS_SENTINELS", ()),
        getattr(settings, "REDIS_SENTINEL_MASTER", DEFAULT_MASTER),
        getattr(settings, "REDIS_SENTINEL_USERNAME", None),
        getattr(settings, "REDIS_SENTINEL_PASSWORD", None),
    )


def of(value):
    """A RedisTarget from a target, a redis:// URL or a channel layer's hosts
    entry (layer_host's); None for None or another form of entry."""
    if value is None or isinstance(value, RedisTarget):
        return value
    if isinstance(value, dict) and "sentinels" in value:
        sentinel_kwargs = value.get("sentinel_kwargs") or {}
        return RedisTarget(
            url=None,
            sentinels=tuple((host, int(port)) for host, port in value["sentinels"]),
            master=value["master_name"],
            username=value.get("username"),
            password=value.get("password"),
            db=value.get("db", 0),
            sentinel_username=sentinel_kwargs.get("username"),
            sentinel_password=sentinel_kwargs.get("password"),
        )
    if isinstance(value, dict):
        value = value.get("address")
    return RedisTarget(url=value) if isinstance(value, str) else None


def _sentinel_kwargs(target, connect_timeout, retry_class):
    timeout = max(SENTINEL_TIMEOUT_MIN, (connect_timeout or 5.0) / len(target.sentinels))
    kwargs = {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        # redis-py's default retries a sentinel ten times before asking the next.
        "retry": retry_class(NoBackoff(), 0),
    }
    if target.sentinel_username:
        kwargs["username"] = target.sentinel_username
    if target.sentinel_password:
        kwargs["password"] = target.sentinel_password
    return kwargs


def _master_kwargs(target):
    kwargs = {"db": target.db}
    if target.username:
        kwargs["username"] = target.username
    if target.password:
        kwargs["password"] = target.password
    return kwargs


def layer_host(target, options):
    """The channel layer's hosts entry: options are redis-py pool keywords (layers.redis_pool_options).

    channels_redis (utils.create_pool, both layers) hands an entry with
    "address" to ConnectionPool.from_url(address, **rest), and one with
    "master_name" to SentinelConnectionPool(master_name,
    Sentinel(sentinels, sentinel_kwargs=...), **rest).
    """
    if not target.sentinels:
        return {"address": target.url, **options}
    return {
        "sentinels": list(target.sentinels),
        "master_name": target.master,
        "sentinel_kwargs": _sentinel_kwargs(target, options.get("socket_connect_timeout"), AsyncRetry),
        # Lets the watchdog close connections left on a master the sentinels no longer name.
        "connection_class": FollowingConnection,
        **_master_kwargs(target),
        **options,
    }


# This process's connections to a sentinel-named master, per event loop, for follow_master.
_connections = {}


class FollowingConnection(redis.asyncio.sentinel.SentinelManagedConnection):
    """A connection to the master the sentinels named when it connected, which follow_master can close."""

    async def send_packed_command(self, command, check_health=True):
        if not self.is_connected:
            # redis-py (8.1) reconnects here, when it retries a command or a
            # health check, to the address the connection had, without asking
            # the sentinels: after a failover, the old master, so the retry
            # of a command that met READONLY meets it again.
            await self.connect()
        await super().send_packed_command(command, check_health)

    async def connect_to(self, address):
        await super().connect_to(address)
        loop = asyncio.get_running_loop()
        connections = _connections.get(loop)
        if connections is None:
            for old in [old for old in _connections if old.is_closed()]:
                del _connections[old]
            connections = _connections[loop] = weakref.WeakSet()
        connections.add(self)


class _AsyncMaster(redis.asyncio.Redis):
    """A master_for() client that also closes its connections to the sentinels."""

    async def aclose(self, close_connection_pool=None):
        try:
            await super().aclose(close_connection_pool)
        finally:
            await self.connection_pool.sentinel_manager.aclose()


class _SyncMaster(redis.Redis):
    """A master_for() client that also closes its connections to the sentinels."""

    def close(self):
        try:
            super().close()
        finally:
            self.connection_pool.sentinel_manager.close()


def async_client(target, **options):
    """A redis.asyncio client; options (timeouts, retry) as for redis.asyncio.Redis."""
    target = of(target)
    if not target.sentinels:
        return redis.asyncio.Redis.from_url(target.url, **options)
    sentinel = redis.asyncio.sentinel.Sentinel(
        target.sentinels,
        sentinel_kwargs=_sentinel_kwargs(target, options.get("socket_connect_timeout"), AsyncRetry))
    return sentinel.master_for(target.master, redis_class=_AsyncMaster, connection_class=FollowingConnection,
                               **_master_kwargs(target), **options)


def sync_client(target, **options):
    """A redis.Redis client; options (timeouts, retry) as for redis.Redis."""
    target = of(target)
    if not target.sentinels:
        return redis.Redis.from_url(target.url, **options)
    sentinel = redis.sentinel.Sentinel(
        target.sentinels, sentinel_kwargs=_sentinel_kwargs(target, options.get("socket_connect_timeout"), Retry))
    return sentinel.master_for(target.master, redis_class=_SyncMaster, **_master_kwargs(target), **options)


def master_address(client):
    """The (host, port) a sentinel client's pool last connected to; None for a direct client."""
    return getattr(client.connection_pool, "master_address", None)


async def follow_master(client):
    """Asks the sentinels for the master now and closes this event loop's
    connections to any other (they reconnect to it when next used, or at
    once if they were waiting for a reply); returns its (host, port).

    None for a client of a plain REDIS_URL. Raises when no sentinel names
    a master (MasterNotFoundError, a ConnectionError).
    """
    pool = client.connection_pool
    if not isinstance(pool, redis.asyncio.sentinel.SentinelConnectionPool):
        return None
    master = await pool.sentinel_manager.discover_master(pool.service_name)
    for connection in list(_connections.get(asyncio.get_running_loop(), ())):
        try:
            stale = (connection.connection_pool.service_name == pool.service_name
                     and connection.is_connected and (connection.host, connection.port) != master)
        except ReferenceError:  # its pool is gone, and with it the connection's use
            continue
        if stale:
            await connection.disconnect()
    return master


def explain_no_master(client):
    """Why the sentinels of a sync client named no master: what each of them said, in one line."""
    pool = client.connection_pool
    answers = []
    for sentinel in pool.sentinel_manager.sentinels:
        where = format_addresses([(sentinel.connection_pool.connection_kwargs["host"],
                                   sentinel.connection_pool.connection_kwargs["port"])])
        try:
            state = sentinel.sentinel_masters().get(pool.service_name)
        except Exception as error:  # each sentinel's failure is part of the answer
            answers.append(f"{where} {type(error).__name__}")
        else:
            answers.append(f"{where} knows no such master" if state is None else f"{where} says {state['flags']}")
    return f"no master for {pool.service_name!r} from sentinels {', '.join(answers)}"
