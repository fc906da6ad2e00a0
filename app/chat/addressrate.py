"""A message rate per client address, shared by all of its sockets in every process and on every host.

The per-socket bucket (ratelimit.TokenBucket) bounds one socket; one address
with a hundred sockets (Nginx's limit) could still store a thousand messages
a second. This counts an address's messages over the last second in Redis
(a sorted set of their times: a sliding window, with the commands the app's
Redis user already has), where every Daphne (or uvicorn worker) of every app
host sees the same count. An IPv6 client is counted by its /64, which one
client usually holds whole.

It fails open: when Redis does not answer, posts are stored as ever (they
reach the room once Redis is back), as a rate limit must not turn a Redis
outage into refused messages.
"""

import asyncio
import ipaddress
import logging
import time
import uuid

from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from chatservice import redisconn

log = logging.getLogger(__name__)

# Under the layer's prefix, which the app's Redis user may use.
KEY_PREFIX = "asgi:chat-rate:"
# Seconds a post waits for the count before it is let through.
TIMEOUT = 0.5

_clients = {}


def address_key(address):
    """The key an address is counted by: an IPv4 address, or an IPv6 /64."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if ip.version == 6:
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


def _client(target):
    loop = asyncio.get_running_loop()
    target = redisconn.of(target)
    client = _clients.get((loop, target))
    if client is None:
        for key in [key for key in _clients if key[0].is_closed()]:
            del _clients[key]
        client = _clients[(loop, target)] = redisconn.async_client(
            target, socket_timeout=TIMEOUT, socket_connect_timeout=TIMEOUT, retry=Retry(NoBackoff(), 0))
    return client


async def allow(redis, address, per_second, now=time.time):
    """Whether one more message from address fits in per_second (0: no limit).

    redis: where to count, a redisconn.RedisTarget or a redis:// URL.
    """
    if not per_second or not address or not redis:
        return True
    key = KEY_PREFIX + address_key(address)
    at = now()
    try:
        pipe = _client(redis).pipeline(transaction=False)
        pipe.zremrangebyscore(key, "-inf", at - 1).zadd(key, {f"{at}-{uuid.uuid4().hex[:8]}": at})
        _, _, count, _ = await pipe.zcount(key, at - 1, "+inf").expire(key, 2).execute()
    except Exception as error:  # Redis away: let the post through (see the module's doc)
        log.debug("counting messages of %s failed: %s", address, error)
        return True
    return count <= per_second
