"""The per-address message rate, counted in Redis across sockets and processes."""

import pytest

from chat import addressrate

from .conftest import free_port


@pytest.mark.parametrize(("address", "key"), [
    ("203.0.113.5", "203.0.113.5"),
    ("2001:db8:1:0:8:5:6:7", "2001:db8:1::/64"),
    ("2001:db8:1::9", "2001:db8:1::/64"),  # the same /64
    ("::ffff:203.0.113.5", "203.0.113.5"),
    ("not-an-address", "not-an-address"),
])
def test_an_address_is_counted_by_its_ipv4_address_or_ipv6_64(address, key):
    assert addressrate.address_key(address) == key


async def test_every_socket_of_an_address_shares_one_count(redis_url):
    clock = [1000.0]

    def now():
        return clock[0]

    allowed = [await addressrate.allow(redis_url, "2001:db8:7::1", 5, now=now) for _ in range(3)]
    # Another address of the same /64, as from another socket or process.
    allowed += [await addressrate.allow(redis_url, "2001:db8:7::2", 5, now=now) for _ in range(3)]
    assert allowed == [True] * 5 + [False]
    # Another address has a count of its own.
    assert await addressrate.allow(redis_url, "203.0.113.9", 5, now=now)
    # A second later the window has moved on.
    clock[0] += 1.01
    assert await addressrate.allow(redis_url, "2001:db8:7::3", 5, now=now)


async def test_without_redis_posts_are_let_through():
    nobody = f"redis://127.0.0.1:{free_port()}/0"
    assert await addressrate.allow(nobody, "203.0.113.9", 1)
    assert await addressrate.allow(nobody, "203.0.113.9", 1)


async def test_no_limit_and_no_address_let_through(redis_url):
    assert await addressrate.allow(redis_url, "203.0.113.9", 0)
    assert await addressrate.allow(redis_url, None, 1)
