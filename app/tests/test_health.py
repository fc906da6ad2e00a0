import json
import socket
import time

import pytest
from channels.testing import HttpCommunicator
from django.db import connection

from .conftest import free_port, redis_server

pytestmark = pytest.mark.django_db


def test_healthz_ok_under_wsgi(client, settings):
    settings.RELEASE = "20240101-abc"
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response["Content-Type"] == "application/json"
    payload = response.json()
    # The server's name is proved against real servers (test_servers.py).
    assert payload.pop("server") in {"daphne", "uvicorn", "gunicorn", "unknown"}
    assert payload == {
        "status": "ok",
        "release": "20240101-abc",
        "interface": "wsgi",
        "host": socket.gethostname(),
        "database": connection.vendor,  # sqlite, or postgresql under DATABASE_URL=postgres://
        "checks": {"database": "ok", "disk": "ok", "redis": "ok"},
    }
    assert "no-cache" in response["Cache-Control"]


def test_healthz_fails_fast_when_redis_is_unreachable(client, settings):
    settings.REDIS_URL = f"redis://127.0.0.1:{free_port()}/0"
    started = time.monotonic()
    response = client.get("/healthz")
    elapsed = time.monotonic() - started
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "fail"
    assert body["checks"]["database"] == "ok"
    assert body["checks"]["redis"] != "ok"
    assert "ConnectionError" in body["checks"]["redis"]
    assert elapsed < settings.HEALTH_REDIS_TIMEOUT + 1


def test_healthz_reports_a_database_failure(client, monkeypatch):
    def broken_cursor(*args, **kwargs):
        raise RuntimeError("database is gone")

    monkeypatch.setattr(connection, "cursor", broken_cursor)
    response = client.get("/healthz")
    assert response.status_code == 503
    assert response.json()["checks"] == {
        "database": "RuntimeError: database is gone",
        "disk": "ok",
        "redis": "ok",
    }


def test_healthz_authenticates_with_the_password_in_redis_url(client, settings, tmp_path):
    with redis_server(tmp_path, "--requirepass", "s3cret") as url:
        assert url.startswith("redis://:s3cret@")
        settings.REDIS_URL = url
        assert client.get("/healthz").json()["checks"]["redis"] == "ok"
        settings.REDIS_URL = url.replace(":s3cret@", "")
        response = client.get("/healthz")
    assert response.status_code == 503
    assert "AuthenticationError" in response.json()["checks"]["redis"]


@pytest.mark.django_db(transaction=True)
async def test_healthz_says_asgi_under_asgi(asgi_app):
    communicator = HttpCommunicator(
        asgi_app, "GET", "/healthz", headers=[(b"host", b"localhost")]
    )
    response = await communicator.get_response(timeout=10)
    assert response["status"] == 200
    body = json.loads(response["body"])
    assert body["interface"] == "asgi"
    assert body["status"] == "ok"


@pytest.mark.django_db(transaction=True)
def test_healthz_names_a_locked_database(client, settings):
    """Reads still pass under WAL while a writer holds the lock: the check asks for the lock."""
    import sqlite3

    settings.HEALTH_DATABASE_TIMEOUT = 0.2
    holder = sqlite3.connect(connection.settings_dict["NAME"], isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")
        response = client.get("/healthz")
        assert response.status_code == 503
        assert "locked" in response.json()["checks"]["database"]
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert client.get("/healthz").json()["checks"]["database"] == "ok"


def test_healthz_reports_a_nearly_full_disk(client, settings, tmp_path):
    settings.DATA_DIR = tmp_path
    settings.HEALTH_MIN_FREE_MB = 10**9  # more than any test machine has
    response = client.get("/healthz")
    assert response.status_code == 503
    disk = response.json()["checks"]["disk"]
    assert "free in" in disk and str(tmp_path) in disk


@pytest.mark.parametrize(("forwarded_for", "sources", "detail"), [
    ("203.0.113.7", [], False),  # a visitor through the proxy
    ("127.0.0.1", [], True),  # the deploy's gate through the host's own proxy
    (None, [], True),  # not through the proxy: a probe on the app's own socket
    ("10.0.5.9", ["10.0.5.0/24"], True),  # the monitoring
    ("10.0.6.9", ["10.0.5.0/24"], False),
])
def test_healthz_detail_is_for_trusted_callers_only(client, settings, forwarded_for, sources, detail):
    import ipaddress

    settings.REDIS_URL = f"redis://127.0.0.1:{free_port()}/0"  # a failing check: its text is detail
    settings.HEALTH_DETAIL_SOURCES = [ipaddress.ip_network(source) for source in sources]
    headers = {"HTTP_X_FORWARDED_FOR": forwarded_for} if forwarded_for else {}
    response = client.get("/healthz", **headers)
    assert response.status_code == 503
    if detail:
        assert response.json()["checks"]["redis"] != "ok"
    else:
        assert response.json() == {"status": "fail"}


def test_healthz_detail_sources_must_be_networks(monkeypatch):
    from django.core.exceptions import ImproperlyConfigured

    from chatservice.env import env_networks

    monkeypatch.setenv("HEALTH_DETAIL_SOURCES", "10.0.5.0/24, 2001:db8::/64,192.0.2.7")
    assert [str(n) for n in env_networks("HEALTH_DETAIL_SOURCES")] == ["10.0.5.0/24", "2001:db8::/64", "192.0.2.7/32"]
    monkeypatch.setenv("HEALTH_DETAIL_SOURCES", "10.0.5.0/24,monitoring")
    with pytest.raises(ImproperlyConfigured, match="'monitoring' is not an IP network"):
        env_networks("HEALTH_DETAIL_SOURCES")
