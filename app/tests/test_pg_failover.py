"""A PostgreSQL primary change against real servers: two local PostgreSQL
instances and an app process (tests/failover_driver.py) whose DATABASE_URL
lists both with target_session_attrs=read-write.

A Patroni switchover, played by hand: A is the primary; B holds the same
schema but takes no writes (default_transaction_read_only, as libpq sees a
standby). A is shut down (fast, as Patroni demotes: its connections break),
and B is made writable ("promoted") about 2 s later. A post and /healthz's
database check made in that gap must go through; with nothing coming back
within the deadline they must fail, in bounded time.

Skipped when PostgreSQL's server binaries are not installed (Debian:
apt-get install postgresql). Under root the servers run as the postgres
user. Everything stays on 127.0.0.1 and in a temporary folder.
"""

import glob
import json
import os
import pwd
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psycopg
import pytest

from .conftest import free_port, stop

APP_DIR = Path(__file__).resolve().parent.parent
GAP = 2.0  # seconds without a primary in a planned switchover


def _bindir():
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(p.split("/")[4]))
    if found:
        return Path(found[-1]).parent
    pg_ctl = shutil.which("pg_ctl")
    return Path(pg_ctl).parent if pg_ctl else None


BINDIR = _bindir()
pytestmark = pytest.mark.skipif(BINDIR is None, reason="PostgreSQL server binaries (pg_ctl) are not installed")


def _server_user():
    """PostgreSQL refuses to run as root: under root, its own user."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam("postgres")
    except KeyError:
        pytest.skip("running as root, and there is no postgres user to run PostgreSQL as")


class PgServer:
    """One PostgreSQL instance on 127.0.0.1, its data and socket in a folder of its own."""

    def __init__(self, root, name, user):
        self.data = root / name
        self.port = free_port()
        self.user = user

    def _run(self, *args):
        subprocess.run([str(BINDIR / args[0]), *args[1:]], check=True, capture_output=True, timeout=60,
                       user=self.user.pw_uid if self.user else None,
                       group=self.user.pw_gid if self.user else None)

    def init(self):
        self._run("initdb", "-D", str(self.data), "-U", "chat", "--auth=trust", "-E", "UTF8", "--no-sync")

    def copy_to(self, other):
        """A copy of this (stopped) instance's data: the same schema and rows."""
        shutil.copytree(self.data, other.data, symlinks=True)
        if self.user:
            for folder, _, files in os.walk(other.data):
                for path in [folder, *(os.path.join(folder, f) for f in files)]:
                    os.chown(path, self.user.pw_uid, self.user.pw_gid)

    def start(self):
        options = (f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.data} -c fsync=off "
                   "-c max_connections=30")
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.data / "log"), "-w", "start")

    def stop(self):
        # Fast: what a switchover does to the old primary; its sessions are
        # terminated (57P01) and new ones refused while it shuts down.
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def running(self):
        return (self.data / "postmaster.pid").exists()

    def set_read_only(self, read_only):
        """As libpq's target_session_attrs sees a standby, or a promoted one."""
        with psycopg.connect(host="127.0.0.1", port=self.port, user="chat", dbname="postgres", autocommit=True,
                             options="-c default_transaction_read_only=off") as admin:
            admin.execute(f"ALTER SYSTEM SET default_transaction_read_only = {'on' if read_only else 'off'}")
            admin.execute("SELECT pg_reload_conf()")
        # The reload reaches the postmaster's children asynchronously.
        time.sleep(0.3)


class App:
    """tests/failover_driver.py in a process of its own, with the real settings."""

    def __init__(self, database_url, workdir):
        env = {"PATH": os.environ.get("PATH", ""), "SECRET_KEY": "tests-only", "DATABASE_URL": database_url,
               "DATA_DIR": str(workdir), "LOG_LEVEL": "INFO", "DATABASE_POOL_TIMEOUT": "3"}
        self.process = subprocess.Popen([sys.executable, "-m", "tests.failover_driver"], cwd=APP_DIR, env=env,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        text=True)
        self.results, self.log = queue.Queue(), []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.process.stdout:
            if line.startswith("RESULT "):
                self.results.put(json.loads(line[len("RESULT "):]))
            else:
                self.log.append(line.rstrip("\n"))

    def send(self, op, **fields):
        self.process.stdin.write(json.dumps({"op": op, **fields}) + "\n")
        self.process.stdin.flush()

    def result(self, timeout=30):
        try:
            return self.results.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError("the app did not answer; its log:\n" + "\n".join(self.log)) from None

    def call(self, op, **fields):
        self.send(op, **fields)
        return self.result()

    def close(self):
        self.process.stdin.close()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            stop(self.process)


@pytest.fixture
def cluster():
    """A (primary) and B (read-only), with the app's schema; removed afterwards."""
    user = _server_user()
    root = Path(tempfile.mkdtemp(prefix="chat-pg-"))
    if user:
        os.chown(root, user.pw_uid, user.pw_gid)
    a, b = PgServer(root, "a", user), PgServer(root, "b", user)
    try:
        a.init()
        a.start()
        with psycopg.connect(host="127.0.0.1", port=a.port, user="chat", dbname="postgres",
                             autocommit=True) as admin:
            admin.execute("CREATE DATABASE chat")
        subprocess.run([sys.executable, "manage.py", "migrate", "--noinput"], cwd=APP_DIR, check=True,
                       capture_output=True, timeout=120,
                       env={"PATH": os.environ.get("PATH", ""), "SECRET_KEY": "tests-only",
                            "DATABASE_URL": f"postgres://chat@127.0.0.1:{a.port}/chat"})
        a.stop()
        a.copy_to(b)
        a.start()
        b.start()
        b.set_read_only(True)
        yield a, b, root
    finally:
        for server in (a, b):
            if server.running():
                server.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def app(cluster):
    a, b, root = cluster
    url = (f"postgres://chat@127.0.0.1:{a.port},127.0.0.1:{b.port}/chat"
           "?target_session_attrs=read-write&connect_timeout=2")
    process = App(url, root)
    yield process
    process.close()


def _in_the_gap(app, promote, op, **fields):
    """op sent right after the primary went away; promote() run GAP seconds later."""
    app.send(op, **fields)
    time.sleep(GAP)
    promote()
    return app.result()


def test_a_switchover_refuses_no_post_and_fails_no_health_check(cluster, app):
    a, b, _ = cluster
    assert app.call("post", posts=[["general", "alice", "before", "c-0"]])["ok"] == [[1, "before", False]]
    assert app.call("health")["ok"] == "ok"

    # A goes away; B takes writes GAP s later. A batch with and without client_id:
    # the connection failed before any COMMIT, so both are safe to repeat.
    a.stop()
    result = _in_the_gap(app, lambda: b.set_read_only(False), "post",
                         posts=[["general", "bob", "during", "c-1"], ["general", "carol", "no id", None]])
    print(f"post through a {GAP} s switchover: {result}")
    # B never saw A's rows (no replication here): its seq starts again at 1.
    assert result["ok"] == [[1, "during", False], [2, "no id", False]], app.log
    assert GAP - 0.5 <= result["seconds"] < 10
    assert any("database: write went through after waiting" in line for line in app.log)

    # The other way round, for /healthz: B shuts down, A comes back.
    b.stop()
    result = _in_the_gap(app, a.start, "health")
    print(f"/healthz through a {GAP} s switchover: {result}")
    assert result["ok"] == "ok", app.log
    assert GAP - 0.5 <= result["seconds"] < 5 + 3
    assert any("database: health went through after waiting" in line for line in app.log)


def test_without_a_primary_for_longer_than_the_wait_posts_and_health_fail_in_bounded_time(cluster, app):
    a, b, _ = cluster
    assert app.call("post", posts=[["general", "alice", "before", "c-0"]])["ok"] == [[1, "before", False]]
    app.call("set", name="DATABASE_FAILOVER_WAIT", value=2)
    app.call("set", name="HEALTH_DATABASE_FAILOVER_WAIT", value=1)
    a.stop()  # and B stays read-only: an unplanned failover that takes longer than the wait

    result = app.call("post", posts=[["general", "bob", "refused", "c-1"]])
    print(f"post without a primary: {result}")
    # The consumer turns any such error into store_failed.
    assert "error" in result and "OperationalError" in result["error"]
    # The wait, plus at most one attempt's wait for a connection (the pool's timeout).
    assert 2 <= result["seconds"] < 2 + 3 + 1
    result = app.call("health")
    assert result["ok"] != "ok" and "OperationalError" in result["ok"]
    assert 1 <= result["seconds"] < 1 + 3 + 1
    assert any("database: write gave up after waiting" in line for line in app.log)

    # Back, the next post goes through at once.
    b.set_read_only(False)
    result = app.call("post", posts=[["general", "bob", "later", "c-1"]])
    assert result["ok"] == [[1, "later", False]] and result["seconds"] < 3
