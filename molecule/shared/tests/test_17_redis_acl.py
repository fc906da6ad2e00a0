"""Redis users: the app's may run only what the channel layer needs, `default` is off."""

import hashlib
import re

import pytest

from clients import inventory_value

# The app's Redis URL is read from its env file, and redis-cli runs on the
# Redis host: both on one host (the cluster proves its own Redis access).
pytestmark = pytest.mark.needs("redis", "app")


@pytest.fixture(scope="module")
def app_url(host):
    """The app's own Redis URL, from its env file (what Gunicorn and Daphne use)."""
    env = host.check_output("cat /srv/chat/shared/chat.env")
    return re.search(r"^REDIS_URL='([^']+)'", env, re.MULTILINE).group(1)


@pytest.fixture(scope="module")
def admin_password(host):
    """As the inventory resolves it: a generated secret (local) or the vault's (ssh)."""
    return inventory_value(host.backend.get_hostname(), "chat_redis_admin_password")


def redis(host, url, *command):
    """One command through redis-cli as the URL's user; its reply or error text."""
    result = host.run("redis-cli --no-auth-warning -u %s " + " ".join(["%s"] * len(command)),
                      url, *command)
    return (result.stdout + result.stderr).strip()


def test_app_user_runs_what_the_channel_layer_needs(host, app_url):
    assert redis(host, app_url, "PING") == "PONG"
    assert redis(host, app_url, "ZADD", "asgi-acl-probe", "1", "member") == "1"
    assert redis(host, app_url, "DEL", "asgi-acl-probe") == "1"


@pytest.mark.parametrize("command", [
    ["FLUSHALL"], ["FLUSHDB"], ["CONFIG", "GET", "maxmemory"], ["CONFIG", "SET", "maxmemory", "1"],
    ["KEYS", "*"], ["SHUTDOWN"], ["ACL", "LIST"],
])
def test_app_user_cannot_administer(host, app_url, command):
    reply = redis(host, app_url, *command)
    assert "NOPERM" in reply, f"{' '.join(command)} answered: {reply}"


def test_app_user_keeps_to_the_layers_keys(host, app_url):
    reply = redis(host, app_url, "ZADD", "not-the-layers-key", "1", "member")
    assert "NOPERM" in reply, reply


def test_default_user_is_off(host):
    unauthenticated = host.run("redis-cli -h 127.0.0.1 PING")
    assert "NOAUTH" in unauthenticated.stdout + unauthenticated.stderr
    login = host.run("redis-cli -h 127.0.0.1 --no-auth-warning --user default --pass anything PING")
    assert "PONG" not in login.stdout
    assert "WRONGPASS" in login.stdout + login.stderr


def test_admin_user_can_administer(host, admin_password):
    url = f"redis://admin:{admin_password}@127.0.0.1:6379/0"
    assert redis(host, url, "CONFIG", "GET", "maxmemory-policy").split() == ["maxmemory-policy", "volatile-ttl"]
    users = redis(host, url, "ACL", "USERS").split()
    # monitor: the metrics exporter's, where a host is in group monitoring.
    assert sorted(users) in (["admin", "chat", "default"], ["admin", "chat", "default", "monitor"]), users


def test_the_exporters_user_reads_statistics_only(host, admin_password):
    admin = f"redis://admin:{admin_password}@127.0.0.1:6379/0"
    if "monitor" not in redis(host, admin, "ACL", "USERS").split():
        pytest.skip("SKIPPED: no host in group monitoring, no exporter's user")
    password = inventory_value(host.backend.get_hostname(), "redis_monitor_password")
    url = f"redis://monitor:{password}@127.0.0.1:6379/0"
    assert "used_memory:" in redis(host, url, "INFO", "memory")
    for command in (["GET", "asgi:anything"], ["CONFIG", "SET", "maxmemory", "1"], ["FLUSHALL"], ["KEYS", "*"],
                    ["PUBLISH", "asgi:x", "forged"]):
        assert "NOPERM" in redis(host, url, *command), command


def test_passwords_are_stored_hashed(host, app_url):
    password = app_url.split("@")[0].rsplit(":", 1)[1]
    conf = host.check_output("cat /etc/redis/redis.conf /etc/redis/users.conf")
    assert password not in conf
    assert "requirepass" not in conf
    # The users file holds the hash.
    assert f"#{hashlib.sha256(password.encode()).hexdigest()}" in conf
