"""Riding through a PostgreSQL primary change: a bounded wait for the primary.

During a planned switchover (Patroni) the old primary shuts down, breaking
its connections, and a replica is promoted 1-5 s later; meanwhile no server
takes writes, so every connection attempt with target_session_attrs=
read-write fails, and a connection that still reaches the old primary may
find it read-only. Without a wait every post in that gap would be refused
(store_failed) and /healthz would answer 503. So a database call that fails
for want of a primary is repeated on a fresh connection, backing off, until
its deadline (DATABASE_FAILOVER_WAIT for posts, HEALTH_DATABASE_FAILOVER_WAIT
for /healthz). An unplanned failover longer than that still fails the call,
within the deadline plus one attempt (bounded by the pool's timeout).

Callers run in threads (the hub's writer thread, a WSGI worker), never on
the event loop: the wait sleeps.
"""

import contextlib
import functools
import logging
import time

import psycopg
from django.conf import settings
from django.db import connection, transaction

from . import metrics

log = logging.getLogger(__name__)

# read_only_sql_transaction: a standby, or a primary being demoted.
READ_ONLY_SQLSTATE = "25006"
# admin_shutdown, crash_shutdown, cannot_connect_now: the server is going
# down or not up yet.
SHUTDOWN_SQLSTATES = {"57P01", "57P02", "57P03"}
# Pause between attempts: doubling from the first to the longest.
FIRST_PAUSE, LONGEST_PAUSE = 0.25, 1.0


def no_primary(error):
    """Whether a database error means "no primary right now".

    That is: no connection could be had (libpq found no host taking writes,
    or the pool lent none in time: PoolTimeout), the connection broke (a
    client-side OperationalError, without a SQLSTATE, or class 08), the
    server is shutting down or starting (57P0x), or it takes no writes
    (25006). Only psycopg's errors qualify, so SQLite's never do; nor do
    server errors such as a deadlock or a statement timeout, which a
    primary change does not cause.
    """
    cause = error if isinstance(error, psycopg.Error) else error.__cause__
    if not isinstance(cause, psycopg.Error):
        return False
    sqlstate = cause.sqlstate
    if sqlstate == READ_ONLY_SQLSTATE or sqlstate in SHUTDOWN_SQLSTATES:
        return True
    return isinstance(cause, psycopg.OperationalError) and (sqlstate is None or sqlstate.startswith("08"))


def drop_connection():
    """Closes this thread's connection, so that the pool discards it instead
    of lending it out again, and the next one goes through libpq's host
    list again (where target_session_attrs=read-write finds the primary).

    Django's pool takes back an open connection as it is: one found
    read-only would stay read-only until it expired (psycopg_pool: an hour).
    The raw connection is closed first; the pool discards a closed one.
    """
    if connection.connection is not None:
        connection.connection.close()
    connection.close()


class Attempt:
    """One try of a call; `committing` says whether COMMIT may have been sent."""

    def __init__(self):
        self.committing = False

    @contextlib.contextmanager
    def atomic(self):
        """transaction.atomic(), noting when its body is done and COMMIT follows.

        A failure before that point rolled the transaction back for sure
        (the server never saw COMMIT); one after it, say a connection lost
        during COMMIT, leaves unknown whether the transaction was committed.
        """
        with transaction.atomic():
            yield
            self.committing = True


def ride_through(work, wait, kind, *, repeatable=True):
    """work(attempt), tried again while it fails for want of a primary, for up to wait seconds.

    kind names the caller in the log and the metrics ("write", "health").
    repeatable: doing work twice is harmless even after a COMMIT whose
    outcome is unknown (posts with a client_id are stored once). Otherwise
    work is repeated only when it certainly failed before COMMIT.

    Between attempts it pauses, 0.25 s doubling to 1 s, and while pausing
    asks the pool for a connection, so that the pool tries to connect at
    that pace (see wait_for_connection); it tries again only once the pool
    could lend one, and gives up (raising the last error) when the deadline
    passes first. Inside a transaction of the caller's there is no retry:
    a fresh connection cannot continue it.
    """
    started = time.monotonic()
    deadline = started + wait
    pause, attempts = FIRST_PAUSE, 0
    while True:
        attempt = Attempt()
        attempts += 1
        try:
            result = work(attempt)
        except Exception as error:
            if not no_primary(error):
                raise
            drop_connection()
            if connection.in_atomic_block or attempt.committing and not repeatable:
                _gave_up(kind, wait, started, attempts, error)
                raise
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    _gave_up(kind, wait, started, attempts, error)
                    raise
                available = wait_for_connection(min(pause, remaining))
                pause = min(pause * 2, LONGEST_PAUSE)
                if available:
                    break
        else:
            if attempts > 1:
                waited = time.monotonic() - started
                log.warning("database: %s went through after waiting %.1f s for a primary (attempts: %d)",
                            kind, waited, attempts)
                metrics.failover_wait(kind, "ok", waited)
            return result


def read(function):
    """function (a read: harmless to repeat) riding through a primary change, for up to
    DATABASE_FAILOVER_WAIT seconds: the lobby, a socket's history. Without it
    a page or a join in the gap fails while the posts around it wait."""

    @functools.wraps(function)
    def reading(*args, **kwargs):
        return ride_through(lambda attempt: function(*args, **kwargs), settings.DATABASE_FAILOVER_WAIT, "read")

    return reading


def _gave_up(kind, wait, started, attempts, error):
    """Logs and counts a call that failed for want of a primary while it could wait for one."""
    if wait > 0:
        waited = time.monotonic() - started
        log.warning("database: %s gave up after waiting %.1f s for a primary (attempts: %d): %s",
                    kind, waited, attempts, f"{type(error).__name__}: {error}"[:200])
        metrics.failover_wait(kind, "failed", waited)


def wait_for_connection(pause):
    """Pauses for `pause` seconds; True if the pool could lend a connection meanwhile.

    Waiting for a connection from psycopg_pool is what makes it try to
    connect (it grows when a client waits; a connection lost is replaced
    only on demand, as the pool gives up reconnecting at once:
    reconnect_timeout 0 in settings.py, instead of its own backoff of 1, 2,
    4, ... s that could outlast the gap by seconds). The connection goes
    straight back, for the next attempt to take. It still pauses the whole
    time, so that a call that keeps failing on connections that work is
    not repeated in a tight loop. Without a pool it only pauses.
    """
    until = time.monotonic() + pause
    pool = getattr(connection, "pool", None)
    available = pool is None
    if pool is not None:
        try:
            pool.putconn(pool.getconn(timeout=pause))
            available = True
        except psycopg.Error:  # PoolTimeout: no primary yet (or the pool is closed)
            pass
    time.sleep(max(0.0, until - time.monotonic()))
    return available
