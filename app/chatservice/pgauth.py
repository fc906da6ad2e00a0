"""PostgreSQL logins that live through a change of the app's password.

PostgreSQL keeps one password per role, so a rotation cannot have two at
once as Redis's ACL users do. Instead the app holds both for a while: the
new one in DATABASE_URL and the one the role has until now in
DATABASE_PASSWORD_PREVIOUS. Every app process gets both first; only then
is the role's password changed (`python -m chatservice.pgauth apply`, run
by the deploy once every app host has switched). In between, and after,
a new connection tries the password that worked last and falls back on
the other when PostgreSQL refuses it (README, "Operating: secrets").

Run as a command, with DATABASE_URL and DATABASE_PASSWORD_PREVIOUS in the
environment (never on the command line, where `ps` shows them):

    python -m chatservice.pgauth check   # prints which one the role takes: current or previous
    python -m chatservice.pgauth apply   # gives the role the current one if it has the previous

Both exit 1, naming neither password, when the role takes neither.
"""

import os
import sys

import psycopg
from psycopg import sql

# SQLSTATE of a wrong password (invalid_password); libpq reports a refused
# login as a connection failure, so its message is read too.
INVALID_PASSWORD = "28P01"
REFUSED = "password authentication failed"


def refused_password(error):
    """Whether a failed connection was PostgreSQL refusing the password (not a host down)."""
    return getattr(error, "sqlstate", None) == INVALID_PASSWORD or REFUSED in str(error)


def connection_class(previous):
    """A psycopg Connection class for the pool (OPTIONS["pool"]["connection_class"])
    that logs in with the password it is given, or with PREVIOUS when that is refused."""

    class RotatingPasswordConnection(psycopg.Connection):
        # The password that logged in last: tried first by the next
        # connection, so only the first after the change pays a refusal.
        use_previous = False

        @classmethod
        def connect(cls, conninfo="", **kwargs):
            passwords = {False: kwargs.get("password"), True: previous}
            first = cls.use_previous
            try:
                return super().connect(conninfo, **{**kwargs, "password": passwords[first]})
            except psycopg.OperationalError as error:
                if not refused_password(error):
                    raise
            connection = super().connect(conninfo, **{**kwargs, "password": passwords[not first]})
            # Set, not toggled: connections opened at once all saw the same.
            cls.use_previous = not first
            return connection

    return RotatingPasswordConnection


def _login_kwargs(url):
    """libpq's keywords from a DATABASE_URL (chatservice.dburl's reading of it)."""
    from chatservice import dburl

    config = dburl.parse(url)
    if config["ENGINE"] != "django.db.backends.postgresql":
        raise SystemExit("pgauth: DATABASE_URL is not a PostgreSQL URL")
    kwargs = {"host": config["HOST"], "port": str(config["PORT"] or ""), "user": config["USER"],
              "dbname": config["NAME"], **config.get("OPTIONS", {})}
    return {key: value for key, value in kwargs.items() if value not in ("", None)}, config["PASSWORD"]


def _takes(kwargs, password):
    """Whether the role logs in with PASSWORD; errors other than a refused password propagate."""
    try:
        psycopg.connect(**kwargs, password=password, autocommit=True).close()
        return True
    except psycopg.OperationalError as error:
        if refused_password(error):
            return False
        raise


def which(kwargs, current, previous):
    """'current' or 'previous': the password the role takes now. SystemExit when neither."""
    if _takes(kwargs, current):
        return "current"
    if previous and _takes(kwargs, previous):
        return "previous"
    raise SystemExit(
        f"pgauth: PostgreSQL refuses role {kwargs.get('user')!r} the password of DATABASE_URL"
        + (" and DATABASE_PASSWORD_PREVIOUS as well" if previous else
           "; if the password was rotated, give the one the role has now as the previous one"))


def apply(kwargs, current, previous):
    """Gives the role the current password if it has the previous one: 'changed' or 'unchanged'."""
    if which(kwargs, current, previous) == "current":
        return "unchanged"
    with psycopg.connect(**kwargs, password=previous, autocommit=True) as connection:
        # Hashed here by libpq, as the server would store it: the statement
        # (in the server's log or pg_stat_activity) never holds the password.
        algorithm = connection.execute("SHOW password_encryption").fetchone()[0]
        verifier = connection.pgconn.encrypt_password(current.encode(), kwargs["user"].encode(), algorithm.encode())
        connection.execute(sql.SQL("ALTER ROLE CURRENT_USER PASSWORD {}").format(sql.Literal(verifier.decode())))
    if not _takes(kwargs, current):
        raise SystemExit("pgauth: the role's password was changed, and the new one is still refused")
    return "changed"


def main(argv):
    if len(argv) != 2 or argv[1] not in ("check", "apply"):
        raise SystemExit("usage: python -m chatservice.pgauth check|apply  (DATABASE_URL, DATABASE_PASSWORD_PREVIOUS)")
    kwargs, current = _login_kwargs(os.environ.get("DATABASE_URL", ""))
    previous = os.environ.get("DATABASE_PASSWORD_PREVIOUS", "")
    try:
        print(which(kwargs, current, previous) if argv[1] == "check" else apply(kwargs, current, previous))
    except psycopg.OperationalError as error:
        raise SystemExit(f"pgauth: cannot reach PostgreSQL: {error}") from None


if __name__ == "__main__":
    main(sys.argv)
