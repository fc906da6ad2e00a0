"""The app's PostgreSQL password changed under it (chatservice/pgauth.py), against a real server.

One local PostgreSQL that asks for passwords over TCP (scram-sha-256), as
the deployed one does. The role starts with the old password; the app is
given the new one and the old one beside it, as rotate.yml's first step
does: its pool logs in while the role still has the old password, and
after `pgauth apply` changed it, with the new one, without a refused
borrow. The command names neither password in what it prints.

Skipped, like test_pg_failover, where PostgreSQL's server binaries are
not installed.
"""

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import psycopg
import pytest
from psycopg_pool import ConnectionPool

from chatservice import pgauth

from .test_pg_failover import APP_DIR, BINDIR, PgServer, _server_user

pytestmark = pytest.mark.skipif(BINDIR is None, reason="PostgreSQL server binaries (pg_ctl) are not installed")

OLD, NEW, WRONG = "old-password-" + "o" * 24, "new-password-" + "n" * 24, "wrong-password-" + "w" * 24


class ScramServer(PgServer):
    """Trust on its own socket (the test's admin), passwords over TCP."""

    def init(self):
        # initdb wants a first password where it is to ask for one.
        pwfile = self.data.parent / "pwfile"
        pwfile.write_text(OLD)
        if self.user:
            os.chown(pwfile, self.user.pw_uid, self.user.pw_gid)
        self._run("initdb", "-D", str(self.data), "-U", "chat", "--auth-local=trust",
                  "--auth-host=scram-sha-256", f"--pwfile={pwfile}", "-E", "UTF8", "--no-sync")

    def set_password(self, password):
        with psycopg.connect(host=str(self.data), port=self.port, user="chat", dbname="postgres",
                             autocommit=True) as admin:
            admin.execute(psycopg.sql.SQL("ALTER ROLE chat PASSWORD {}").format(psycopg.sql.Literal(password)))

    def stored_verifier(self):
        with psycopg.connect(host=str(self.data), port=self.port, user="chat", dbname="postgres") as admin:
            return admin.execute("SELECT rolpassword FROM pg_authid WHERE rolname = 'chat'").fetchone()[0]

    def url(self, password):
        return f"postgres://chat:{password}@127.0.0.1:{self.port}/postgres"


@pytest.fixture(scope="module")
def server():
    # Not pytest's tmp_path: under root it is closed to the postgres user.
    root = Path(tempfile.mkdtemp(prefix="chat-pgauth-"))
    user = _server_user()
    if user:
        os.chown(root, user.pw_uid, user.pw_gid)
    server = ScramServer(root, "pg", user)
    try:
        server.init()
        server.start()
        yield server
    finally:
        if server.running():
            server.stop()
        shutil.rmtree(root, ignore_errors=True)


def pgauth_command(server, action, password, previous):
    env = {"PATH": os.environ.get("PATH", ""), "DATABASE_URL": server.url(password),
           "DATABASE_PASSWORD_PREVIOUS": previous}
    return subprocess.run([sys.executable, "-m", "chatservice.pgauth", action], cwd=APP_DIR, env=env,
                          capture_output=True, text=True, timeout=60)


def borrow(pool):
    with pool.connection(timeout=5) as connection:
        return connection.execute("SELECT current_user").fetchone()[0]


def test_a_pool_logs_in_before_and_after_the_role_changes_password(server):
    server.set_password(OLD)
    kwargs = {"host": "127.0.0.1", "port": server.port, "user": "chat", "dbname": "postgres", "password": NEW}
    rotating = pgauth.connection_class(OLD)

    def pool():
        return ConnectionPool(kwargs=kwargs, connection_class=rotating, min_size=1, max_size=2, open=True,
                              reconnect_timeout=0)

    # The control: the new password alone is refused now.
    with pytest.raises(psycopg.OperationalError, match=pgauth.REFUSED):
        psycopg.connect(**kwargs).close()
    with pool() as before:
        assert borrow(before) == "chat"
    # The old one worked: the next connection tries it first.
    assert rotating.use_previous is True
    result = pgauth_command(server, "apply", NEW, OLD)
    assert (result.returncode, result.stdout.strip()) == (0, "changed"), result.stderr
    # New connections log in with the new password (the old one refused once).
    with pool() as after:
        assert [borrow(after) for _ in range(3)] == ["chat"] * 3
    assert rotating.use_previous is False
    psycopg.connect(**kwargs).close()
    with pytest.raises(psycopg.OperationalError, match=pgauth.REFUSED):
        psycopg.connect(**{**kwargs, "password": OLD}).close()


def test_check_and_apply_say_which_password_the_role_takes(server):
    server.set_password(OLD)
    assert pgauth_command(server, "check", OLD, "").stdout.strip() == "current"
    assert pgauth_command(server, "check", NEW, OLD).stdout.strip() == "previous"
    before = server.stored_verifier()
    result = pgauth_command(server, "apply", OLD, "")
    assert (result.returncode, result.stdout.strip()) == (0, "unchanged")
    assert server.stored_verifier() == before
    result = pgauth_command(server, "apply", NEW, OLD)
    assert (result.returncode, result.stdout.strip()) == (0, "changed"), result.stderr
    # Stored hashed, as PostgreSQL would hash it: the statement never held the password.
    assert server.stored_verifier().startswith("SCRAM-SHA-256$")
    assert pgauth_command(server, "check", NEW, "").stdout.strip() == "current"


@pytest.mark.parametrize("password, previous, says", [
    (WRONG, "", "if the password was rotated"),
    (WRONG, NEW, "DATABASE_PASSWORD_PREVIOUS as well"),
])
def test_a_password_the_role_does_not_take_stops_without_showing_it(server, password, previous, says):
    server.set_password(OLD)
    before = server.stored_verifier()
    for action in ("check", "apply"):
        result = pgauth_command(server, action, password, previous)
        assert result.returncode == 1, result
        assert says in result.stderr
        assert WRONG not in result.stderr + result.stdout and NEW not in result.stderr + result.stdout
    assert server.stored_verifier() == before


def test_a_server_that_is_down_is_not_taken_for_a_refusal():
    env = {"PATH": os.environ.get("PATH", ""), "DATABASE_PASSWORD_PREVIOUS": OLD,
           "DATABASE_URL": f"postgres://chat:{NEW}@127.0.0.1:1/postgres?connect_timeout=2"}
    result = subprocess.run([sys.executable, "-m", "chatservice.pgauth", "check"], cwd=APP_DIR, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "cannot reach PostgreSQL" in result.stderr, result
    assert NEW not in result.stderr and OLD not in result.stderr
