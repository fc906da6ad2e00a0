"""chat/dbcalls.py: the threads where the WebSocket side's database calls run."""

import pytest
from django.db import connection

from chat import dbcalls

pytestmark = pytest.mark.django_db(transaction=True)


@dbcalls.writes
def _writer_connection():
    connection.ensure_connection()
    # The object itself: while the test holds it, no other can take its id.
    return connection.connection


@dbcalls.writes
def _leave_a_transaction_open():
    connection.ensure_connection()
    connection.set_autocommit(False)
    return connection.connection


async def test_the_writer_thread_keeps_its_sqlite_connection_from_one_call_to_the_next():
    if connection.vendor != "sqlite":
        pytest.skip("SKIPPED: PostgreSQL's connections go back to the pool after each call")
    first = await _writer_connection()
    assert await _writer_connection() is first


async def test_a_connection_left_in_a_bad_state_is_still_closed():
    if connection.vendor != "sqlite":
        pytest.skip("SKIPPED: PostgreSQL's connections go back to the pool after each call")
    # Autocommit left off is one of Django's reasons to close, besides age.
    left = await _leave_a_transaction_open()
    assert await _writer_connection() is not left
