"""Dependency checks for /healthz. Each returns "ok" or a short error text."""

import redis
from django.conf import settings
from django.db import connection


def _describe(error):
    return f"{type(error).__name__}: {error}"[:200]


def check_database():
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
            cursor.fetchone()
    except Exception as error:  # any failure is a failed check, reported, not raised
        return _describe(error)
    return "ok"


def check_redis():
    timeout = settings.HEALTH_REDIS_TIMEOUT
    client = redis.Redis.from_url(
        settings.REDIS_URL,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        # A failed health check must answer now, not after redis-py's retries.
        retry=None,
    )
    try:
        client.ping()
    except Exception as error:
        return _describe(error)
    finally:
        client.close()
    return "ok"
