"""Channel layer configuration (CHANNEL_LAYERS) built from the environment."""

from django.core.exceptions import ImproperlyConfigured
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from . import redisconn
from .env import env_int, env_str

BACKENDS = {
    "core": "channels_redis.core.RedisChannelLayer",
    "pubsub": "channels_redis.pubsub.RedisPubSubChannelLayer",
}


def redis_pool_options():
    """Keyword arguments that channels_redis hands to redis-py's ConnectionPool.

    Both layers pass every key of a hosts dict except "address" straight to
    ``redis.asyncio.ConnectionPool.from_url(address, **options)``, or, through
    sentinels, to ``SentinelConnectionPool`` (channels_redis.utils.create_pool;
    see redisconn.layer_host), which is how these reach redis-py.
    """
    return {
        # redis-py 8 defaults socket_timeout to 5 s, the same length as the core
        # layer's blocking BZPOPMIN: every idle consumer would then die with a
        # TimeoutError every 5 s (channels_redis#422). None waits as long as the
        # pop asks; dead peers are still found by redis-py's TCP keepalive.
        "socket_timeout": None,
        # A stuck connect must not hang a handshake forever.
        "socket_connect_timeout": 5,
        # redis-py's async pool defaults to 100 connections; a burst of more
        # simultaneous group_add calls raises MaxConnectionsError (handshake 500).
        "max_connections": env_int("REDIS_MAX_CONNECTIONS", 1000, minimum=1),
        # After a Redis restart every pooled connection is dead; without a
        # retry each one fails once before it is replaced (a socket closed with
        # 1011, a handshake answered 500). A connection error now reconnects
        # and retries a few times with jittered backoff (0.1 s doubling up to
        # 1 s: about 2 s in all), which rides through a restart; a longer
        # outage still raises, and the hub (chat/fanout.py) takes over.
        "retry": Retry(
            ExponentialWithJitterBackoff(base=0.1, cap=1.0),
            env_int("REDIS_RETRIES", 3, minimum=0),
            supported_errors=(RedisConnectionError, RedisTimeoutError, ConnectionError),
        ),
        # A pooled connection idle this long is PINGed before use, so a dead
        # one is found before a command is sent on it.
        "health_check_interval": env_int("REDIS_HEALTH_CHECK_INTERVAL", 15, minimum=0),
    }


def build_channel_layers():
    # pubsub by default: with one group member per process (chat/fanout.py) a
    # group send is one PUBLISH instead of the core layer's script over a
    # sorted set per member, nothing is buffered to be dropped at a capacity,
    # and on one core it delivered a room of 100 at 200 msg/s with a lower p99
    # than core (bench/results). Messages lost in a Redis reconnect are read
    # back from the database by the hub.
    name = env_str("CHANNEL_LAYER", "pubsub").strip().lower()
    if name not in BACKENDS:
        raise ImproperlyConfigured(
            f"CHANNEL_LAYER={name!r} is not supported; use 'core' or 'pubsub'."
        )
    config = {"hosts": [redisconn.layer_host(redisconn.from_env(), redis_pool_options())]}
    if name == "core":
        # Only the core layer buffers per channel; the pub/sub layer ignores these.
        # The channel is the process's hub (all its rooms), not one socket:
        # 1000 covers a few seconds of a busy process falling behind.
        config["capacity"] = env_int("CHANNEL_CAPACITY", 1000, minimum=1)
        config["expiry"] = env_int("CHANNEL_EXPIRY", 60, minimum=1)
    return {"default": {"BACKEND": BACKENDS[name], "CONFIG": config}}
