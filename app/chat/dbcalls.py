"""Where the WebSocket side's database calls run: one writer thread, a pool of readers.

channels' ``database_sync_to_async`` runs every call of a process on one
thread (thread-sensitive mode). One message write waiting for SQLite's write
lock (up to its busy timeout) then held up every history read and every join
of every socket of the process. Here writes run on a thread of their own (one
writer per process: SQLite takes one writer at a time anyway, and the hub
already stores concurrent posts together), and reads on a small pool of
their own, so a stuck write delays only the posts behind it.

With SQLite each of these threads keeps its connection from one call to the
next. Under ASGI Django's connections are otherwise closed after every use
(settings.py: the threads of an ASGI request do not last), and opening one
costs a file open, Django's ~30 SQL functions registered, and on close a WAL
checkpoint: more than half of a one-message write (3.6 ms against 1.4 ms,
docs/benchmark.md). These threads last as long as the process, so the
connections they keep are bounded (one per thread). A connection found
unusable is still closed, and PostgreSQL's go back to the pool after each
call as before (a pool is shared between the threads).
"""

import functools
import time
from concurrent.futures import ThreadPoolExecutor

from channels.db import DatabaseSyncToAsync
from django.db import DEFAULT_DB_ALIAS, connections

from chatservice.env import env_int

from . import failover, metrics

WRITER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chat-db-write")
READERS = ThreadPoolExecutor(max_workers=env_int("CHAT_DB_READ_THREADS", 4, minimum=1),
                             thread_name_prefix="chat-db-read")


def _keeping_sqlite_connection(func):
    """func, after which a SQLite connection it opened is not closed for its age.

    Django closes a connection past its close_at (set from CONN_MAX_AGE, 0
    under ASGI) before and after each call; None spares it, and leaves the
    other reasons to close it (errors, autocommit left off) as they are.
    """

    @functools.wraps(func)
    def call(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        finally:
            connection = connections[DEFAULT_DB_ALIAS]
            if connection.vendor == "sqlite" and connection.connection is not None:
                connection.close_at = None

    return call


def _timed(call, histogram):
    """call, observed in chat_db_call_seconds: from the await to the result or
    error, so the wait for a free thread (a write behind another) counts too."""

    @functools.wraps(call.func)
    async def timed(*args, **kwargs):
        started = time.perf_counter()
        try:
            return await call(*args, **kwargs)
        finally:
            histogram.observe(time.perf_counter() - started)

    return timed


def writes(func):
    """Runs func on the writer thread (closing old connections like database_sync_to_async, SQLite's kept)."""
    return _timed(DatabaseSyncToAsync(_keeping_sqlite_connection(func), thread_sensitive=False, executor=WRITER),
                  metrics.DB_WRITE_SECONDS)


def reads(func):
    """Runs func on one of the reader threads, waiting out a primary change (chat/failover.py)."""
    return _timed(DatabaseSyncToAsync(_keeping_sqlite_connection(failover.read(func)), thread_sensitive=False,
                                      executor=READERS),
                  metrics.DB_READ_SECONDS)
