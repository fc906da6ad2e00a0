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

from chatservice.env import env_bool, env_list
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
    assert database["OPTIONS"]["pool"] == {"min_size": 1, "max_size": 6, "timeout": 3.0}


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
