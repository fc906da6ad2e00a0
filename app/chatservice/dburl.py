"""DATABASE_URL, with libpq's list of hosts for PostgreSQL.

A PostgreSQL URL may name several hosts, as libpq's own URLs do:
postgres://chat:pw@10.0.0.4:5432,10.0.0.5:5432,10.0.0.6:5432/chat?target_session_attrs=read-write
libpq tries them in order for each new connection and, with
target_session_attrs=read-write, keeps the first that takes writes: the
primary, wherever a failover put it, with no change here and no restart.

dj-database-url reads the host part with urllib, which takes one port at
most. So the host list is cut out, the rest parsed by dj-database-url with
the first host alone, and HOST and PORT set to libpq's comma-separated
lists (Django's postgresql backend hands both to libpq as they are). Any
other URL goes to dj-database-url untouched.
"""

import re
from urllib.parse import unquote

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

# dj-database-url's schemes for backends that connect through libpq.
LIBPQ_SCHEMES = {"postgres", "postgresql", "pgsql", "postgis", "timescale", "timescalegis"}

_URL = re.compile(r"^(?P<scheme>[^:/?#]+)://(?:(?P<userinfo>[^/?#]*)@)?(?P<hosts>[^/?#]*)(?P<rest>.*)$", re.S)


def _host_and_port(entry, number):
    """An item of the host list: HOST, HOST:PORT, [IPV6] or [IPV6]:PORT."""
    if entry.startswith("["):
        host, bracket, port = entry[1:].partition("]")
        if not bracket or port and not port.startswith(":"):
            host = ""
        port = port[1:]
    else:
        host, _, port = entry.partition(":")
    if not host or port and not port.isdigit() or port.isdigit() and not 1 <= int(port) <= 65535:
        # Not the URL itself: it holds the password.
        raise ImproperlyConfigured(
            f"DATABASE_URL: host {number} of its list, {entry!r}, is not HOST, HOST:PORT or [IPV6]:PORT "
            "(e.g. postgres://USER:PASSWORD@10.0.0.4:5432,10.0.0.5:5432/NAME)."
        )
    return unquote(host), port


def parse(url, **kwargs):
    """DATABASES["default"] from a database URL; kwargs as for dj_database_url.parse."""
    match = _URL.match(url)
    if match is None or match["scheme"] not in LIBPQ_SCHEMES or "," not in match["hosts"]:
        return dj_database_url.parse(url, **kwargs)
    hosts = [_host_and_port(entry.strip(), number)
             for number, entry in enumerate(match["hosts"].split(","), start=1)]
    userinfo = f"{match['userinfo']}@" if match["userinfo"] is not None else ""
    first = match["hosts"].split(",")[0].strip()
    config = dj_database_url.parse(f"{match['scheme']}://{userinfo}{first}{match['rest']}", **kwargs)
    config["HOST"] = ",".join(host for host, _ in hosts)
    # libpq: one port for every host, or one per host (empty: the default).
    ports = [port for _, port in hosts]
    config["PORT"] = ",".join(ports) if any(ports) else ""
    return config
