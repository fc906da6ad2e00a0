"""Dependency checks for /healthz. Each returns "ok" or a short error text."""

import ipaddress
import shutil
import sys
from pathlib import Path

from django.conf import settings
from django.db import connection
from redis.sentinel import MasterNotFoundError

from chatservice import redisconn

from . import failover


# The server a process runs under, told by what it has imported. WSGI is
# only ever Gunicorn's sync workers here. Of the ASGI servers, Gunicorn's
# uvicorn workers import uvicorn; Daphne does not (every process imports
# daphne, an installed app, so daphne's modules tell nothing).
def server_software(asgi):
    """gunicorn, daphne or uvicorn: the server that runs this process."""
    if asgi:
        return "uvicorn" if "uvicorn" in sys.modules else "daphne"
    return "gunicorn" if "gunicorn" in sys.modules else "unknown"


def detail_allowed(forwarded_for):
    """Whether a health caller may see more than the status.

    The proxy (Nginx) always sets X-Forwarded-For to the client's address.
    Without it, the caller did not come through the proxy: a probe on a
    unix socket or on this host's private address, which only this host and
    the web hosts reach. Through the proxy, only loopback (the deploy's gate
    on the host itself) and HEALTH_DETAIL_SOURCES (the monitoring) may: the
    release, host, server, database and error texts help an attacker more
    than a visitor.
    """
    if not forwarded_for:
        return True
    try:
        address = ipaddress.ip_address(forwarded_for.split(",")[0].strip())
    except ValueError:
        return False
    return address.is_loopback or any(address in network for network in settings.HEALTH_DETAIL_SOURCES)


def _describe(error):
    return f"{type(error).__name__}: {error}"[:200]


def _query_database():
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
        cursor.fetchone()
        if connection.vendor == "sqlite" and not connection.in_atomic_block:
            # Reads pass while a writer holds SQLite's lock (WAL): ask for
            # the write lock itself, briefly, as a post would, and give it
            # back without writing.
            cursor.execute(f"PRAGMA busy_timeout = {int(settings.HEALTH_DATABASE_TIMEOUT * 1000)}")
            cursor.execute("BEGIN IMMEDIATE")
            cursor.execute("ROLLBACK")


def check_database():
    try:
        # A PostgreSQL primary change (no primary for a few seconds) is
        # waited out, up to HEALTH_DATABASE_FAILOVER_WAIT, as posts wait it
        # out: a planned switchover fails neither. 0 (SQLite): one try.
        failover.ride_through(lambda attempt: _query_database(), settings.HEALTH_DATABASE_FAILOVER_WAIT, "health")
    except Exception as error:  # any failure is a failed check, reported, not raised
        return _describe(error)
    finally:
        if connection.vendor == "sqlite" and connection.connection is not None:
            # Back to the connection's own busy timeout for what follows.
            timeout = settings.DATABASES["default"].get("OPTIONS", {}).get("timeout", 5)
            try:
                connection.connection.execute(f"PRAGMA busy_timeout = {int(timeout * 1000)}")
            except Exception:  # noqa: S110 (a broken connection is already reported)
                pass
    return "ok"


def check_disk():
    """Free space where the data lives (the SQLite file, its journal)."""
    folder = Path(settings.DATA_DIR)
    try:
        free = shutil.disk_usage(folder).free
    except OSError as error:
        return _describe(error)
    if free < settings.HEALTH_MIN_FREE_MB * 2**20:
        return f"{free // 1024} KiB free in {folder}, below {settings.HEALTH_MIN_FREE_MB} MiB"
    return "ok"


def check_redis():
    """"ok" or a short error text, and the master the PING reached
    ("host:port") when the sentinels named one (None for a plain REDIS_URL)."""
    target = redisconn.from_settings()
    timeout = settings.HEALTH_REDIS_TIMEOUT
    client = redisconn.sync_client(
        target,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        # A failed health check must answer now, not after redis-py's retries.
        retry=None,
    )
    try:
        client.ping()
        master = redisconn.master_address(client)
    except MasterNotFoundError:
        # redis-py's own text is a repr of every sentinel's client.
        return redisconn.explain_no_master(client)[:200], None
    except Exception as error:
        return _describe(error), None
    finally:
        client.close()
    return "ok", None if master is None else redisconn.format_addresses([master])
