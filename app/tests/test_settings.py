"""Settings read from the environment, and how they reach Django, channels and redis-py."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import redis
from channels_redis.core import RedisChannelLayer
from channels_redis.pubsub import RedisPubSubChannelLayer
from django.core.exceptions import ImproperlyConfigured

from chatservice import dburl, redisconn
from chatservice.env import env_bool, env_host_ports, env_list
from chatservice.layers import build_channel_layers

from .conftest import layers_for, redis_server

APP_DIR = Path(__file__).resolve().parent.parent


def settings_under(env, *names):
    """Imports chatservice.settings in a fresh interpreter with exactly this environment."""
    script = (
        "import json, sys\n"
        "import chatservice.settings as s\n"
        "print(json.dumps({n: getattr(s, n, None) for n in sys.argv[1:]}, default=str))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, *names],
        cwd=APP_DIR,
        env={"PATH": os.environ.get("PATH", ""), **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    return result


def read_settings(env, *names):
    result = settings_under(env, *names)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_missing_secret_key_stops_start_up_with_a_clear_message():
    result = settings_under({})
    assert result.returncode != 0
    assert "ImproperlyConfigured" in result.stderr
    assert "SECRET_KEY is not set" in result.stderr


def test_a_value_signed_with_a_rotated_key_verifies_while_it_is_a_fallback():
    """SECRET_KEY rotated: what the old key signed verifies with it in SECRET_KEY_FALLBACKS, not after."""
    script = (
        "import sys\n"
        "from django.conf import settings\n"
        "from django.core import signing\n"
        "settings.configure(SECRET_KEY=sys.argv[1], SECRET_KEY_FALLBACKS=sys.argv[2:])\n"
        "print(signing.dumps('kept') if len(sys.argv) == 2 else signing.loads(sys.stdin.read().strip()))\n"
    )

    def run(*keys, stdin=""):
        return subprocess.run([sys.executable, "-c", script, *keys], cwd=APP_DIR, input=stdin,
                              capture_output=True, text=True, timeout=60)

    signed = run("old-key-" + "o" * 50).stdout.strip()
    assert run("new-key-" + "n" * 50, "old-key-" + "o" * 50, stdin=signed).stdout.strip() == "kept"
    refused = run("new-key-" + "n" * 50, "other-" + "x" * 50, stdin=signed)
    assert refused.returncode != 0 and "BadSignature" in refused.stderr
    values = read_settings({"SECRET_KEY": "k" * 50, "SECRET_KEY_FALLBACKS": "a" * 50 + ", " + "b" * 50},
                           "SECRET_KEY_FALLBACKS")
    assert values["SECRET_KEY_FALLBACKS"] == ["a" * 50, "b" * 50]


def test_debug_needs_no_secret_key_and_allows_localhost():
    values = read_settings({"DEBUG": "yes", "ALLOWED_HOSTS": "chat.example"}, "DEBUG", "ALLOWED_HOSTS")
    assert values["DEBUG"] is True
    assert values["ALLOWED_HOSTS"] == ["chat.example", "localhost", "127.0.0.1", "[::1]"]


def test_production_defaults():
    values = read_settings(
        {"SECRET_KEY": "k"},
        "DEBUG", "ALLOWED_HOSTS", "CSRF_TRUSTED_ORIGINS", "RELEASE", "DATABASES", "STATIC_ROOT",
        "SECURE_PROXY_SSL_HEADER", "SESSION_COOKIE_SECURE", "CSRF_COOKIE_SECURE",
        "USE_X_FORWARDED_HOST", "CHANNEL_LAYERS", "LOG_LEVEL", "CHAT_MAX_BODY_LENGTH",
        "CHAT_RATE_PER_SECOND", "CHAT_RATE_BURST",
    )
    assert values["DEBUG"] is False
    assert values["ALLOWED_HOSTS"] == ["localhost", "127.0.0.1"]
    assert values["CSRF_TRUSTED_ORIGINS"] == []
    assert values["RELEASE"] == "dev"
    database = values["DATABASES"]["default"]
    assert database["ENGINE"] == "django.db.backends.sqlite3"
    assert database["NAME"] == str(APP_DIR / "db.sqlite3")
    assert database["CONN_MAX_AGE"] == 60
    assert values["STATIC_ROOT"] == str(APP_DIR / "staticfiles")
    assert values["SECURE_PROXY_SSL_HEADER"] is None
    assert values["SESSION_COOKIE_SECURE"] is False and values["CSRF_COOKIE_SECURE"] is False
    assert values["USE_X_FORWARDED_HOST"] is False
    layer = values["CHANNEL_LAYERS"]["default"]
    assert layer["BACKEND"] == "channels_redis.pubsub.RedisPubSubChannelLayer"
    host = dict(layer["CONFIG"]["hosts"][0])
    retry = host.pop("retry")
    assert host == {
        "address": "redis://127.0.0.1:6379/0",
        "socket_timeout": None,
        "socket_connect_timeout": 5,
        "max_connections": 1000,
        "health_check_interval": 15,
    }
    assert retry.startswith("<redis.asyncio.retry.Retry")
    assert values["LOG_LEVEL"] == "INFO"
    assert (values["CHAT_MAX_BODY_LENGTH"], values["CHAT_RATE_PER_SECOND"], values["CHAT_RATE_BURST"]) == (2000, 10.0, 20)


def test_proxy_and_database_settings_from_the_environment(tmp_path):
    values = read_settings(
        {
            "SECRET_KEY": "k",
            "ALLOWED_HOSTS": " chat.example , www.chat.example ,",
            "CSRF_TRUSTED_ORIGINS": "https://chat.example",
            "TRUST_X_FORWARDED_PROTO": "true",
            "SECURE_COOKIES": "1",
            "DATA_DIR": str(tmp_path),
            "DATABASE_CONN_MAX_AGE": "5",
            "STATIC_ROOT": str(tmp_path / "static"),
            "RELEASE": "20250101T000000",
        },
        "ALLOWED_HOSTS", "CSRF_TRUSTED_ORIGINS", "SECURE_PROXY_SSL_HEADER",
        "SESSION_COOKIE_SECURE", "CSRF_COOKIE_SECURE", "DATABASES", "STATIC_ROOT", "RELEASE",
    )
    assert values["ALLOWED_HOSTS"] == ["chat.example", "www.chat.example"]
    assert values["CSRF_TRUSTED_ORIGINS"] == ["https://chat.example"]
    assert values["SECURE_PROXY_SSL_HEADER"] == ["HTTP_X_FORWARDED_PROTO", "https"]
    assert values["SESSION_COOKIE_SECURE"] is True and values["CSRF_COOKIE_SECURE"] is True
    assert values["DATABASES"]["default"]["NAME"] == str(tmp_path / "db.sqlite3")
    assert values["DATABASES"]["default"]["CONN_MAX_AGE"] == 5
    assert values["STATIC_ROOT"] == str(tmp_path / "static")
    assert values["RELEASE"] == "20250101T000000"


@pytest.mark.parametrize("interface", ["wsgi", "asgi"])
def test_postgresql_gets_a_connection_pool_per_process(interface):
    """Under both servers a PostgreSQL connection is borrowed from a pool, not
    opened per request or per message; Django refuses a pool with persistent
    connections, so those are off."""
    values = read_settings(
        {"SECRET_KEY": "k", "CHAT_INTERFACE": interface, "DATABASE_POOL_SIZE": "6",
         "DATABASE_URL": "postgres://chat:pw@db.internal:5432/chat"},
        "DATABASES",
    )
    database = values["DATABASES"]["default"]
    assert database["ENGINE"] == "django.db.backends.postgresql"
    assert (database["HOST"], database["PORT"], database["NAME"], database["USER"]) == (
        "db.internal", 5432, "chat", "chat")
    assert database["CONN_MAX_AGE"] == 0
    # The pool checks a connection before lending it (one that died with a
    # PostgreSQL restart is replaced).
    assert database["CONN_HEALTH_CHECKS"] is True
    # The pool connects when asked, not on its own backoff (chat/failover.py).
    assert database["OPTIONS"]["pool"] == {"min_size": 1, "max_size": 6, "timeout": 3.0, "reconnect_timeout": 0}


def test_a_previous_database_password_gives_the_pool_its_fallback():
    """During a rotation (chatservice/pgauth.py) the pool's connections fall back on the old password."""
    values = read_settings(
        {"SECRET_KEY": "k", "DATABASE_URL": "postgres://chat:new@db.internal:5432/chat",
         "DATABASE_PASSWORD_PREVIOUS": "old"},
        "DATABASES",
    )
    pool = values["DATABASES"]["default"]["OPTIONS"]["pool"]
    assert "pgauth.connection_class.<locals>.RotatingPasswordConnection" in pool["connection_class"]
    assert values["DATABASES"]["default"]["PASSWORD"] == "new"


@pytest.mark.parametrize("url, env, expected", [
    ("postgres://chat:pw@10.0.0.4:5432,10.0.0.5:5432/chat?target_session_attrs=read-write", {}, [10.0, 5.0]),
    ("postgres://chat:pw@db.internal:5432/chat",
     {"DATABASE_FAILOVER_WAIT": "20", "HEALTH_DATABASE_FAILOVER_WAIT": "0"}, [20.0, 0.0]),
    # SQLite has nothing to fail over to, whatever the environment says.
    ("sqlite:////tmp/chat.sqlite3", {"DATABASE_FAILOVER_WAIT": "20", "HEALTH_DATABASE_FAILOVER_WAIT": "5"}, [0.0, 0.0]),
])
def test_the_waits_for_a_postgresql_primary(url, env, expected):
    values = read_settings({"SECRET_KEY": "k", "DATABASE_URL": url, **env},
                           "DATABASE_FAILOVER_WAIT", "HEALTH_DATABASE_FAILOVER_WAIT")
    assert [values["DATABASE_FAILOVER_WAIT"], values["HEALTH_DATABASE_FAILOVER_WAIT"]] == expected


def test_a_negative_failover_wait_stops_the_start():
    result = settings_under({"SECRET_KEY": "k", "DATABASE_URL": "postgres://chat:pw@db.internal:5432/chat",
                             "DATABASE_FAILOVER_WAIT": "-1"}, "DATABASE_FAILOVER_WAIT")
    assert result.returncode != 0 and "DATABASE_FAILOVER_WAIT=-1.0 must be at least 0.0" in result.stderr


def test_https_settings_default_off_and_come_from_the_environment():
    names = ("SECURE_SSL_REDIRECT", "SECURE_HSTS_SECONDS", "SECURE_HSTS_INCLUDE_SUBDOMAINS",
             "SECURE_HSTS_PRELOAD", "SILENCED_SYSTEM_CHECKS")
    defaults = read_settings({"SECRET_KEY": "k"}, *names)
    assert (defaults["SECURE_SSL_REDIRECT"], defaults["SECURE_HSTS_SECONDS"]) == (False, 0)
    assert defaults["SECURE_HSTS_INCLUDE_SUBDOMAINS"] is False
    values = read_settings(
        {"SECRET_KEY": "k", "SECURE_SSL_REDIRECT": "true", "SECURE_HSTS_SECONDS": "63072000",
         "SECURE_HSTS_INCLUDE_SUBDOMAINS": "true", "SECURE_HSTS_PRELOAD": "false"},
        *names,
    )
    assert values["SECURE_SSL_REDIRECT"] is True
    assert values["SECURE_HSTS_SECONDS"] == 63072000
    assert values["SECURE_HSTS_INCLUDE_SUBDOMAINS"] is True
    assert values["SILENCED_SYSTEM_CHECKS"] == ["security.W021"]
    preload = read_settings({"SECRET_KEY": "k", "SECURE_HSTS_PRELOAD": "yes"}, "SILENCED_SYSTEM_CHECKS")
    assert preload["SILENCED_SYSTEM_CHECKS"] == []


def test_deploy_check_is_clean_with_the_deployments_https_settings(tmp_path):
    """The environment the Ansible deployment writes passes `check --deploy`."""
    env = {
        "PATH": os.environ.get("PATH", ""), "SECRET_KEY": "x7" * 25 + "-Qz_aB9",
        "ALLOWED_HOSTS": "chat.example", "CSRF_TRUSTED_ORIGINS": "https://chat.example",
        "TRUST_X_FORWARDED_PROTO": "true", "SECURE_COOKIES": "true", "SECURE_SSL_REDIRECT": "true",
        "SECURE_HSTS_SECONDS": "63072000", "SECURE_HSTS_INCLUDE_SUBDOMAINS": "true",
        "DATA_DIR": str(tmp_path),
    }
    result = subprocess.run(
        [sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"],
        cwd=APP_DIR, env=env, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no issues" in result.stdout


def test_postgresql_url_and_asgi_connection_lifetime():
    values = read_settings(
        {
            "SECRET_KEY": "k",
            "DATABASE_URL": "postgres://chat:pw@db.internal:5432/chat",
            "CHAT_INTERFACE": "asgi",
            "DATABASE_CONN_MAX_AGE": "600",
        },
        "DATABASES",
    )
    database = values["DATABASES"]["default"]
    assert database["ENGINE"] == "django.db.backends.postgresql"
    assert (database["HOST"], database["PORT"], database["NAME"], database["USER"]) == (
        "db.internal", 5432, "chat", "chat",
    )
    # Under ASGI connections are never kept, whatever the WSGI setting says.
    assert database["CONN_MAX_AGE"] == 0
    assert "transaction_mode" not in database.get("OPTIONS", {})


@pytest.mark.parametrize(
    "env, message",
    [
        ({"DEBUG": "maybe"}, "DEBUG='maybe' is not a boolean"),
        ({"CHANNEL_LAYER": "memory"}, "CHANNEL_LAYER='memory' is not supported"),
        ({"REDIS_MAX_CONNECTIONS": "lots"}, "REDIS_MAX_CONNECTIONS='lots' is not an integer"),
        ({"CHAT_RATE_BURST": "0"}, "CHAT_RATE_BURST=0 must be at least 1"),
        ({"LOG_LEVEL": "loud"}, "LOG_LEVEL='LOUD' is not one of"),
        ({"REDIS_SENTINELS": "10.0.0.1:26379,10.0.0.2"}, "REDIS_SENTINELS: '10.0.0.2' is not HOST:PORT"),
        ({"REDIS_SENTINELS": "10.0.0.1:26379,,10.0.0.3:26379"},
         "REDIS_SENTINELS='10.0.0.1:26379,,10.0.0.3:26379': entry 2 is empty"),
        ({"REDIS_SENTINELS": "10.0.0.1:26379,"}, "entry 2 is empty"),
        ({"REDIS_SENTINELS": "sentinel-1:263x9"}, "REDIS_SENTINELS: 'sentinel-1:263x9' has no port 1-65535"),
        ({"REDIS_SENTINELS": "sentinel-1:70000"}, "REDIS_SENTINELS: 'sentinel-1:70000' has no port 1-65535"),
        ({"DATABASE_URL": "postgres://chat:pw@10.0.0.4:5432,10.0.0.5:54x2/chat"},
         "DATABASE_URL: host 2 of its list, '10.0.0.5:54x2', is not HOST, HOST:PORT"),
    ],
)
def test_malformed_values_stop_start_up(env, message):
    result = settings_under({"SECRET_KEY": "k", **env})
    assert result.returncode != 0
    assert message in result.stderr


@pytest.mark.parametrize(
    "raw, expected",
    [("true", True), ("Yes", True), ("1", True), ("on", True),
     ("false", False), ("NO", False), ("0", False), ("off", False), ("", False)],
)
def test_env_bool(monkeypatch, raw, expected):
    monkeypatch.setenv("FLAG", raw)
    assert env_bool("FLAG") is expected


def test_env_bool_rejects_other_words(monkeypatch):
    monkeypatch.setenv("FLAG", "enabled")
    with pytest.raises(ImproperlyConfigured, match="FLAG='enabled'"):
        env_bool("FLAG")


def test_env_list(monkeypatch):
    monkeypatch.setenv("HOSTS", "a, b,,c ")
    assert env_list("HOSTS") == ["a", "b", "c"]
    monkeypatch.delenv("HOSTS")
    assert env_list("HOSTS", "x,y") == ["x", "y"]


def test_pubsub_layer_config(monkeypatch):
    monkeypatch.setenv("CHANNEL_LAYER", "pubsub")
    monkeypatch.setenv("REDIS_URL", "redis://:pw@redis.internal:6380/2")
    monkeypatch.setenv("REDIS_MAX_CONNECTIONS", "2500")
    monkeypatch.setenv("REDIS_RETRIES", "5")
    monkeypatch.setenv("REDIS_HEALTH_CHECK_INTERVAL", "7")
    layer = build_channel_layers()["default"]
    assert layer["BACKEND"] == "channels_redis.pubsub.RedisPubSubChannelLayer"
    [host] = layer["CONFIG"]["hosts"]
    retry = host.pop("retry")
    assert host == {
        "address": "redis://:pw@redis.internal:6380/2",
        "socket_timeout": None,
        "socket_connect_timeout": 5,
        "max_connections": 2500,
        "health_check_interval": 7,
    }
    assert retry.get_retries() == 5
    assert redis.exceptions.ConnectionError in retry._supported_errors


def test_core_layer_capacity_and_expiry(monkeypatch):
    monkeypatch.setenv("CHANNEL_LAYER", "core")
    assert build_channel_layers()["default"]["CONFIG"]["capacity"] == 1000
    monkeypatch.setenv("CHANNEL_CAPACITY", "500")
    monkeypatch.setenv("CHANNEL_EXPIRY", "30")
    config = build_channel_layers()["default"]["CONFIG"]
    assert (config["capacity"], config["expiry"]) == (500, 30)


def _pool_of(layer):
    """The redis-py pool a live layer actually talks through."""
    if isinstance(layer, RedisChannelLayer):
        return layer.connection(0).connection_pool
    return layer._shards[0]._redis.connection_pool


@pytest.mark.parametrize("kind", ["core", "pubsub"])
async def test_pool_options_reach_redis_py(kind, monkeypatch, tmp_path):
    """Both layers hand the hosts entry to redis-py; check on a live, password-protected server."""
    monkeypatch.setenv("REDIS_MAX_CONNECTIONS", "1234")
    with redis_server(tmp_path, "--requirepass", "pw") as url:
        config = layers_for(url, kind)["default"]["CONFIG"]
        layer_class = RedisChannelLayer if kind == "core" else RedisPubSubChannelLayer
        layer = layer_class(**config)
        try:
            channel = await layer.new_channel()
            await layer.group_add("probe", channel)
            await layer.group_send("probe", {"type": "probe.message", "text": "hi"})
            assert (await layer.receive(channel))["text"] == "hi"
            pool = _pool_of(layer)
            assert pool.max_connections == 1234
            assert pool.connection_kwargs["socket_timeout"] is None
            assert pool.connection_kwargs["socket_connect_timeout"] == 5
            assert pool.connection_kwargs["password"] == "pw"
            assert pool.connection_kwargs["health_check_interval"] == 15
            # The pool hands each connection a copy of the retry policy.
            connection = pool.make_connection()
            assert connection.retry.get_retries() == 3
        finally:
            await layer.flush()


# Redis Sentinel ------------------------------------------------------------------

def test_env_host_ports(monkeypatch):
    monkeypatch.setenv("SENTINELS", " 10.0.0.1:26379, sentinel-2:26380 ,[2001:db8::3]:26381")
    assert env_host_ports("SENTINELS") == [("10.0.0.1", 26379), ("sentinel-2", 26380), ("2001:db8::3", 26381)]
    monkeypatch.setenv("SENTINELS", "  ")
    assert env_host_ports("SENTINELS") == []
    monkeypatch.delenv("SENTINELS")
    assert env_host_ports("SENTINELS") == []
    for bad in ("10.0.0.1", ":26379", "2001:db8::3:26379", "[2001:db8::3]", "a:1,b", "a:0"):
        monkeypatch.setenv("SENTINELS", bad)
        with pytest.raises(ImproperlyConfigured, match="SENTINELS"):
            env_host_ports("SENTINELS")


@pytest.mark.parametrize("kind", ["core", "pubsub"])
def test_sentinel_layer_config(monkeypatch, kind):
    """With REDIS_SENTINELS, both layers get channels_redis's sentinel form of a
    hosts entry: the master's credentials and database from REDIS_URL (its
    host unused), the sentinels' own credentials in sentinel_kwargs, and the
    pool options as without sentinels."""
    monkeypatch.setenv("CHANNEL_LAYER", kind)
    monkeypatch.setenv("REDIS_URL", "redis://chat:data%40pw@ignored:1/3")
    monkeypatch.setenv("REDIS_SENTINELS", "10.0.0.1:26379, 10.0.0.2:26379,sentinel-3:26380")
    monkeypatch.setenv("REDIS_SENTINEL_MASTER", "chat-prod")
    monkeypatch.setenv("REDIS_SENTINEL_USERNAME", "chat-app")
    monkeypatch.setenv("REDIS_SENTINEL_PASSWORD", "sentinel-pw")
    monkeypatch.setenv("REDIS_RETRIES", "5")
    [host] = build_channel_layers()["default"]["CONFIG"]["hosts"]
    retry = host.pop("retry")
    sentinel_retry = host["sentinel_kwargs"].pop("retry")
    assert host == {
        "sentinels": [("10.0.0.1", 26379), ("10.0.0.2", 26379), ("sentinel-3", 26380)],
        "master_name": "chat-prod",
        "sentinel_kwargs": {"socket_timeout": 5 / 3, "socket_connect_timeout": 5 / 3,
                            "username": "chat-app", "password": "sentinel-pw"},
        "connection_class": redisconn.FollowingConnection,
        "username": "chat",
        "password": "data@pw",
        "db": 3,
        "socket_timeout": None,
        "socket_connect_timeout": 5,
        "max_connections": 1000,
        "health_check_interval": 15,
    }
    assert retry.get_retries() == 5
    # A sentinel that does not answer is not retried: the next one is asked.
    assert sentinel_retry.get_retries() == 0


def test_sentinel_settings_and_their_defaults():
    values = read_settings(
        {"SECRET_KEY": "k", "REDIS_SENTINELS": "10.0.0.1:26379,10.0.0.2:26379,10.0.0.3:26379"},
        "REDIS_SENTINELS", "REDIS_SENTINEL_MASTER", "REDIS_SENTINEL_USERNAME", "REDIS_SENTINEL_PASSWORD",
        "CHANNEL_LAYERS",
    )
    assert values["REDIS_SENTINELS"] == [["10.0.0.1", 26379], ["10.0.0.2", 26379], ["10.0.0.3", 26379]]
    assert values["REDIS_SENTINEL_MASTER"] == "chat"
    assert values["REDIS_SENTINEL_USERNAME"] == values["REDIS_SENTINEL_PASSWORD"] == ""
    host = values["CHANNEL_LAYERS"]["default"]["CONFIG"]["hosts"][0]
    assert host["master_name"] == "chat"
    assert "username" not in host["sentinel_kwargs"] and "password" not in host["sentinel_kwargs"]
    assert (host["db"], "password" in host) == (0, False)
    # Without sentinels nothing of them reaches the layer (test_production_defaults).
    assert read_settings({"SECRET_KEY": "k"}, "REDIS_SENTINELS")["REDIS_SENTINELS"] == []


def test_a_redis_url_sentinels_cannot_use_stops_start_up_without_showing_it():
    result = settings_under({"SECRET_KEY": "k", "REDIS_SENTINELS": "10.0.0.1:26379",
                             "REDIS_URL": "rediss://:data-pw@redis.internal:6380/0"})
    assert result.returncode != 0
    assert "REDIS_URL must be redis://" in result.stderr
    assert "data-pw" not in result.stderr


def test_a_target_from_a_layers_hosts_entry_is_the_one_from_settings(monkeypatch):
    """The hub's watchdog and the rate limit take their Redis from the layer's
    hosts entry (redisconn.of): the same master, credentials and database."""
    monkeypatch.setenv("REDIS_URL", "redis://:data-pw@ignored/2")
    monkeypatch.setenv("REDIS_SENTINELS", "10.0.0.1:26379,10.0.0.2:26379")
    monkeypatch.setenv("REDIS_SENTINEL_PASSWORD", "sentinel-pw")
    [host] = build_channel_layers()["default"]["CONFIG"]["hosts"]
    assert redisconn.of(host) == redisconn.from_env()
    assert redisconn.of({"address": "redis://x:6379/0"}) == redisconn.of("redis://x:6379/0")
    target = redisconn.from_env()
    assert "pw" not in repr(target) + str(target)
    assert str(target) == "master 'chat' of sentinels 10.0.0.1:26379, 10.0.0.2:26379"


# PostgreSQL with several hosts ------------------------------------------------------

def test_a_postgresql_url_with_several_hosts_becomes_libpqs_lists():
    values = read_settings(
        {"SECRET_KEY": "k", "CHAT_INTERFACE": "asgi",
         "DATABASE_URL": "postgres://chat:p%40w@10.0.0.4:5432,10.0.0.5:5432,10.0.0.6:5432/chat"
                         "?target_session_attrs=read-write&connect_timeout=3&sslmode=require"},
        "DATABASES",
    )
    database = values["DATABASES"]["default"]
    assert database["ENGINE"] == "django.db.backends.postgresql"
    assert (database["HOST"], database["PORT"]) == ("10.0.0.4,10.0.0.5,10.0.0.6", "5432,5432,5432")
    assert (database["NAME"], database["USER"], database["PASSWORD"]) == ("chat", "chat", "p@w")
    assert database["OPTIONS"] == {
        "target_session_attrs": "read-write", "connect_timeout": 3, "sslmode": "require",
        "pool": {"min_size": 1, "max_size": 4, "timeout": 3.0, "reconnect_timeout": 0},
    }
    assert (database["CONN_MAX_AGE"], database["CONN_HEALTH_CHECKS"]) == (0, True)


@pytest.mark.parametrize("url, host, port", [
    ("postgres://chat:pw@db1,db2,db3/chat", "db1,db2,db3", ""),
    ("postgresql://chat:pw@db1:5433,db2/chat", "db1,db2", "5433,"),
    ("postgres://chat:pw@[2001:db8::4]:5432,[2001:db8::5]:5432/chat", "2001:db8::4,2001:db8::5", "5432,5432"),
    ("postgres://%2Fvar%2Frun%2Fpostgresql,db2:5432/chat", "/var/run/postgresql,db2", ",5432"),
])
def test_postgresql_host_lists(url, host, port):
    database = dburl.parse(url)
    assert (database["HOST"], database["PORT"], database["NAME"]) == (host, port, "chat")


@pytest.mark.parametrize("url", [
    "postgres://chat:pw@db.internal:5432/chat?sslmode=require&connect_timeout=3",
    "postgres://chat:pw@db.internal/chat",
    "sqlite:////srv/chat/db.sqlite3",
    "sqlite://:memory:",
    "mysql://chat:pw@db1:3306/chat",
])
def test_a_url_with_one_host_is_parsed_as_ever(url):
    import dj_database_url

    assert dburl.parse(url, conn_max_age=5) == dj_database_url.parse(url, conn_max_age=5)


@pytest.mark.parametrize("hosts", [
    "db1,,db3", "db1:5432,:5432", "db1,db2:port", "db1,[2001:db8::5", "db1,db2:0",
])
def test_a_bad_host_list_names_the_host_not_the_password(hosts):
    with pytest.raises(ImproperlyConfigured, match="DATABASE_URL: host [0-9] of its list") as error:
        dburl.parse(f"postgres://chat:s3cret@{hosts}/chat")
    assert "s3cret" not in str(error.value)
