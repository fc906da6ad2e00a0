"""Where the WebSocket side's database calls run: one writer thread, a pool of readers.

channels' ``database_sync_to_async`` runs every call of a process on one
thread (thread-sensitive mode). One message write waiting for SQLite's write
lock (up to its busy timeout) then held up every history read and every join
of every socket of the process. Here writes run on a thread of their own (one
writer per process: SQLite takes one writer at a time anyway, and the hub
already stores concurrent posts together), and reads on a small pool of
their own, so a stuck write delays only the posts behind it.
"""

import functools
import time
from concurrent.futures import ThreadPoolExecutor

from channels.db import DatabaseSyncToAsync

from chatservice.env import env_int

from . import failover, metrics

WRITER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chat-db-write")
READERS = ThreadPoolExecutor(max_workers=env_int("CHAT_DB_READ_THREADS", 4, minimum=1),
                             thread_name_prefix="chat-db-read")


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
    """Runs func on the writer thread (closing old connections like database_sync_to_async)."""
    return _timed(DatabaseSyncToAsync(func, thread_sensitive=False, executor=WRITER), metrics.DB_WRITE_SECONDS)


def reads(func):
    """Runs func on one of the reader threads, waiting out a primary change (chat/failover.py)."""
    return _timed(DatabaseSyncToAsync(failover.read(func), thread_sensitive=False, executor=READERS),
                  metrics.DB_READ_SECONDS)
