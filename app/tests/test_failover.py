"""The wait for a PostgreSQL primary (chat/failover.py), with fakes: which
errors are waited out, the deadline, the pace, COMMIT's unknown outcome,
and SQLite left alone. Real servers: test_pg_failover.py."""

import logging
import sqlite3
import types

import django.db
import psycopg
import psycopg_pool
import pytest

from chat import failover, health, store
from chat.models import Message, Room

from .conftest import sample
from .test_faults import _django_wrapped


def _raises(error):
    """A function raising error (a psycopg error, as Django hands it on: wrapped, the cause kept)."""

    def call():
        if isinstance(error, psycopg.Error):
            django_class = (django.db.utils.OperationalError if isinstance(error, psycopg.OperationalError)
                            else django.db.utils.InternalError)
            _django_wrapped(error, django_class)
        raise error

    return call


NO_PRIMARY = {
    "pool-timeout": psycopg_pool.PoolTimeout("couldn't get a connection after 3.00 sec"),
    "connect-failed": psycopg.OperationalError("connection failed: connection to server at 10.0.0.4 port 5432 "
                                               "failed: session is read-only"),
    "connection-lost": psycopg.OperationalError("consuming input failed: server closed the connection unexpectedly"),
    "class-08": psycopg.errors.ConnectionFailure("connection failure"),
    "admin-shutdown": psycopg.errors.AdminShutdown("terminating connection due to administrator command"),
    "crash-shutdown": psycopg.errors.CrashShutdown("terminating connection because of crash of another process"),
    "cannot-connect-now": psycopg.errors.CannotConnectNow("the database system is shutting down"),
    "read-only": psycopg.errors.ReadOnlySqlTransaction("cannot execute UPDATE in a read-only transaction"),
}
OTHER = {
    "deadlock": psycopg.errors.DeadlockDetected("deadlock detected"),
    "statement-timeout": psycopg.errors.QueryCanceled("canceling statement due to statement timeout"),
    "unique": psycopg.errors.UniqueViolation("duplicate key"),
    "sqlite-locked": django.db.utils.OperationalError("database is locked"),
    "not-a-database-error": RuntimeError("bug"),
}


@pytest.mark.parametrize("name", NO_PRIMARY)
def test_errors_that_mean_no_primary(name):
    with pytest.raises(Exception) as caught:
        _raises(NO_PRIMARY[name])()
    assert failover.no_primary(caught.value)
    # Unwrapped too (the pool's own PoolTimeout, say).
    assert failover.no_primary(NO_PRIMARY[name])


@pytest.mark.parametrize("name", OTHER)
def test_other_errors_are_not_waited_out(name):
    error = OTHER[name]
    if name == "sqlite-locked":
        error.__cause__ = sqlite3.OperationalError("database is locked")
    with pytest.raises(Exception) as caught:
        _raises(error)()
    assert not failover.no_primary(caught.value)


class Clock:
    """time.monotonic and time.sleep for chat.failover, without waiting."""

    def __init__(self):
        self.now = 1000.0

    def monotonic(self):
        return self.now

    def sleep(self, seconds):
        assert seconds >= 0
        self.now += seconds


class Pool:
    """psycopg_pool as failover sees it: getconn waits its timeout when there is no primary."""

    def __init__(self, clock, up_at=float("inf")):
        self.clock, self.up_at, self.asked, self.returned = clock, up_at, [], 0

    def getconn(self, timeout):
        self.asked.append(timeout)
        if self.clock.now + timeout < self.up_at:
            self.clock.sleep(timeout)
            raise psycopg_pool.PoolTimeout(f"couldn't get a connection after {timeout:.2f} sec")
        self.clock.now = max(self.clock.now, self.up_at)
        return object()

    def putconn(self, conn):
        self.returned += 1


class Connection:
    """django.db.connection as failover sees it."""

    def __init__(self, pool, in_atomic_block=False):
        self.pool, self.in_atomic_block, self.closed = pool, in_atomic_block, []
        self.connection = types.SimpleNamespace(close=lambda: self.closed.append("raw"))

    def close(self):
        self.closed.append("django")
        self.connection = None


@pytest.fixture
def clock(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(failover, "time", types.SimpleNamespace(monotonic=clock.monotonic, sleep=clock.sleep))
    return clock


def _fake_connection(monkeypatch, clock, up_at=float("inf"), **kwargs):
    fake = Connection(Pool(clock, up_at), **kwargs)
    monkeypatch.setattr(failover, "connection", fake)
    return fake


class Work:
    """A database call that fails for want of a primary until the clock reaches up_at."""

    def __init__(self, clock, up_at, error="connection-lost", committing=False):
        self.clock, self.up_at, self.error, self.committing = clock, up_at, error, committing
        self.calls = []

    def __call__(self, attempt):
        self.calls.append(self.clock.now)
        if self.clock.now < self.up_at:
            attempt.committing = self.committing
            _raises(NO_PRIMARY[self.error])()
        return "stored"


def _waits(kind, outcome):
    return (sample("chat_database_failover_waits_total", kind=kind, outcome=outcome),
            sample("chat_database_failover_wait_seconds_count", kind=kind))


def test_a_switchover_is_waited_out_and_logged_once(monkeypatch, clock, caplog):
    fake = _fake_connection(monkeypatch, clock, up_at=1002.6)
    work = Work(clock, up_at=1002.6)
    before = _waits("write", "ok")
    with caplog.at_level(logging.INFO, logger="chat.failover"):
        assert failover.ride_through(work, 10, "write") == "stored"
    # Paused 0.25 s doubling to 1 s, asking the pool meanwhile; tried again
    # only once the pool had a connection (the primary came back at +2.6 s).
    assert fake.pool.asked == [0.25, 0.5, 1.0, 1.0]
    assert work.calls == [1000.0, 1000.0 + 0.25 + 0.5 + 1.0 + 1.0]
    # The broken connection was closed, raw first: the pool discards it.
    assert fake.closed == ["raw", "django"]
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    assert record.getMessage() == "database: write went through after waiting 2.8 s for a primary (attempts: 2)"
    after = _waits("write", "ok")
    assert (after[0] - before[0], after[1] - before[1]) == (1, 1)


def test_the_deadline_is_kept_when_no_primary_comes_back(monkeypatch, clock, caplog):
    fake = _fake_connection(monkeypatch, clock)
    work = Work(clock, up_at=float("inf"), error="pool-timeout")
    before = _waits("health", "failed")
    with pytest.raises(django.db.utils.OperationalError, match="couldn't get a connection"):
        failover.ride_through(work, 5, "health")
    assert clock.now == 1005.0
    # The last pause is cut to the deadline; no attempt without a connection.
    assert fake.pool.asked == [0.25, 0.5, 1.0, 1.0, 1.0, 1.0, 0.25]
    assert work.calls == [1000.0]
    [record] = caplog.records
    assert record.getMessage().startswith(
        "database: health gave up after waiting 5.0 s for a primary (attempts: 1): OperationalError: couldn't")
    after = _waits("health", "failed")
    assert (after[0] - before[0], after[1] - before[1]) == (1, 1)


def test_a_call_that_keeps_failing_on_working_connections_is_paced(monkeypatch, clock):
    """The pool lends connections, yet each attempt finds a read-only server:
    attempts stay at least a pause apart, no tight loop."""
    _fake_connection(monkeypatch, clock, up_at=0)
    work = Work(clock, up_at=float("inf"), error="read-only")
    with pytest.raises(django.db.utils.InternalError):
        failover.ride_through(work, 3, "write")
    gaps = [round(b - a, 2) for a, b in zip(work.calls, work.calls[1:])]
    assert gaps == [0.25, 0.5, 1.0, 1.0, 0.25]


@pytest.mark.parametrize("repeatable", [True, False])
def test_a_commit_of_unknown_outcome_is_repeated_only_when_repeating_is_harmless(monkeypatch, clock, repeatable):
    _fake_connection(monkeypatch, clock, up_at=0)
    work = Work(clock, up_at=1001, committing=True)
    if repeatable:
        assert failover.ride_through(work, 10, "write", repeatable=True) == "stored"
    else:
        with pytest.raises(django.db.utils.OperationalError):
            failover.ride_through(work, 10, "write", repeatable=False)
        assert len(work.calls) == 1


@pytest.mark.parametrize("error", ["connect-failed", "read-only", "admin-shutdown"])
def test_a_failure_before_commit_is_repeated_even_when_repeating_is_not_harmless(monkeypatch, clock, error):
    _fake_connection(monkeypatch, clock, up_at=1001)
    work = Work(clock, up_at=1001, error=error)
    assert failover.ride_through(work, 10, "write", repeatable=False) == "stored"
    assert len(work.calls) == 2


@pytest.mark.parametrize("name", ["deadlock", "sqlite-locked", "not-a-database-error"])
def test_other_errors_are_raised_at_once_and_keep_the_connection(monkeypatch, clock, name):
    fake = _fake_connection(monkeypatch, clock, up_at=0)
    calls = []

    def work(attempt):
        calls.append(attempt)
        raise OTHER[name]

    with pytest.raises(type(OTHER[name])):
        failover.ride_through(work, 10, "write")
    assert len(calls) == 1 and fake.closed == [] and clock.now == 1000.0


@pytest.mark.parametrize("wait, in_atomic_block", [(0, False), (10, True)])
def test_no_retry_without_a_wait_or_inside_a_transaction_but_the_connection_is_dropped(
        monkeypatch, clock, wait, in_atomic_block):
    """A connection found read-only leaves the pool in any case: Django's pool
    would lend it out again, and every post on it would fail (until
    psycopg_pool expired it, an hour later)."""
    fake = _fake_connection(monkeypatch, clock, up_at=0, in_atomic_block=in_atomic_block)
    work = Work(clock, up_at=float("inf"), error="read-only")
    with pytest.raises(django.db.utils.InternalError):
        failover.ride_through(work, wait, "write")
    assert len(work.calls) == 1 and clock.now == 1000.0
    assert fake.closed == ["raw", "django"]


# --- Through store and /healthz, on the test database ---------------------------

def _failing_commits(monkeypatch, count):
    """The posts' COMMIT fails `count` times as a connection lost during it
    would (here it was not committed, which a client cannot know). The room
    exists already: creating it would commit first (get_or_create's own
    transaction, before the posts', and repeated safely)."""
    from django.db import connection

    Room.objects.create(name="general")
    real = connection.commit
    failures = []

    def commit():
        if len(failures) < count:
            failures.append(1)
            _raises(psycopg.OperationalError("consuming input failed: server closed the connection unexpectedly"))()
        real()

    monkeypatch.setattr(connection, "commit", commit)
    return failures


@pytest.mark.django_db(transaction=True)
def test_a_batch_without_client_ids_is_not_stored_again_after_a_failed_commit(monkeypatch, settings):
    settings.DATABASE_FAILOVER_WAIT = 5
    failures = _failing_commits(monkeypatch, 1)
    with pytest.raises(django.db.utils.OperationalError):
        store.post_messages([("general", "alice", "with id", "c-1"), ("general", "bob", "without", None)])
    assert len(failures) == 1
    assert Message.objects.count() == 0


@pytest.mark.django_db(transaction=True)
def test_a_batch_with_client_ids_only_is_tried_again_after_a_failed_commit(monkeypatch, settings):
    settings.DATABASE_FAILOVER_WAIT = 5
    failures = _failing_commits(monkeypatch, 1)
    [first, second] = store.post_messages([("general", "alice", "one", "c-1"), ("general", "bob", "two", "c-2")])
    assert len(failures) == 1
    assert [(m.seq, m.body, m.repeat) for m in (first, second)] == [(1, "one", False), (2, "two", False)]
    assert Message.objects.count() == 2


@pytest.mark.django_db(transaction=True)
def test_sqlites_own_errors_are_never_retried(monkeypatch, settings):
    settings.DATABASE_FAILOVER_WAIT = 5
    calls = []

    def locked(posts, attempt):
        calls.append(posts)
        raise django.db.utils.OperationalError("database is locked")

    monkeypatch.setattr(store, "_post_messages", locked)
    with pytest.raises(django.db.utils.OperationalError, match="locked"):
        store.post_messages([("general", "alice", "hi", "c-1")])
    assert len(calls) == 1


def test_sqlite_waits_for_no_primary(settings):
    """The settings (chatservice/settings.py): SQLite has no failover."""
    if settings.DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
        assert (settings.DATABASE_FAILOVER_WAIT, settings.HEALTH_DATABASE_FAILOVER_WAIT) == (0, 0)


@pytest.mark.django_db(transaction=True)
def test_healthz_rides_through_a_switchover(monkeypatch, settings, caplog):
    settings.HEALTH_DATABASE_FAILOVER_WAIT = 3
    real, calls = health._query_database, []

    def switching():
        calls.append(1)
        if len(calls) < 3:
            _raises(psycopg.errors.AdminShutdown("terminating connection due to administrator command"))()
        real()

    monkeypatch.setattr(health, "_query_database", switching)
    assert health.check_database() == "ok"
    assert len(calls) == 3
    assert "database: health went through after waiting" in caplog.text


@pytest.mark.django_db(transaction=True)
def test_healthz_reports_no_primary_after_its_wait(monkeypatch, settings):
    settings.HEALTH_DATABASE_FAILOVER_WAIT = 0.3
    monkeypatch.setattr(health, "_query_database", _raises(NO_PRIMARY["connect-failed"]))
    assert health.check_database().startswith("OperationalError: connection failed")


@pytest.mark.django_db(transaction=True)
def test_the_lobby_and_a_sockets_history_ride_through_a_switchover(monkeypatch, settings, client):
    """Reads wait for the primary as posts do: a page asked in the gap is late, not a 500."""
    settings.DATABASE_FAILOVER_WAIT = 3
    calls = []

    def switching(*args, **kwargs):
        calls.append(1)
        if len(calls) < 3:
            _raises(psycopg.errors.AdminShutdown("terminating connection due to administrator command"))()
        return "rooms"

    assert failover.read(switching)() == "rooms"
    assert len(calls) == 3
    # The lobby's query runs inside the wrapped view (the template reads it).
    real, lobby_calls = Room.objects.filter, []

    def filter_in_the_gap(*args, **kwargs):
        lobby_calls.append(1)
        if len(lobby_calls) < 2:
            _raises(NO_PRIMARY["connect-failed"])()
        return real(*args, **kwargs)

    monkeypatch.setattr(Room.objects, "filter", filter_in_the_gap)
    assert client.get("/").status_code == 200
    assert len(lobby_calls) == 2


@pytest.mark.django_db(transaction=True)
def test_a_page_that_outlasts_its_wait_answers_503_not_500(monkeypatch, settings, client):
    settings.DATABASE_FAILOVER_WAIT = 0.3
    def no_primary(*args, **kwargs):
        _raises(NO_PRIMARY["connect-failed"])()

    monkeypatch.setattr(Room.objects, "filter", no_primary)
    response = client.get("/")
    assert response.status_code == 503
    assert response["Retry-After"] == "5"
    # Any other error is still a 500.
    def bug(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(Room.objects, "filter", bug)
    client.raise_request_exception = False
    assert client.get("/").status_code == 500
