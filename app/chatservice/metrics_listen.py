"""CHAT_METRICS_LISTEN: the address a server process serves its metrics on.

Read, like env.py's helpers, so that a bad value stops the start with a
message naming the variable. Apart from env.py because Gunicorn's master
reads it (gunicorn_hooks.py) and its workers must not: a module the master
has imported is inherited as it is by workers forked after a graceful
reload (HUP) to a new release, and the workers import env.py.
"""

import ipaddress
import os

from django.core.exceptions import ImproperlyConfigured

VARIABLE = "CHAT_METRICS_LISTEN"


def env_address(name):
    """ADDRESS:PORT to listen on, as (address, port); None when unset or empty.

    ADDRESS is an IP address, IPv6 in brackets ([::1]:9201); a host name or
    a missing address is refused, so that a listener never ends up on every
    interface by accident (0.0.0.0 says so explicitly).
    """
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return None
    address, _, port = raw.strip().rpartition(":")
    if address.startswith("[") and address.endswith("]"):
        address, version = address[1:-1], 6
    else:
        version = 4
    try:
        if ipaddress.ip_address(address).version != version or not port.isdigit():
            raise ValueError(raw)
        number = int(port)
        if not 1 <= number <= 65535:
            raise ValueError(port)
    except ValueError:
        raise ImproperlyConfigured(
            f"{name}={raw!r} is not ADDRESS:PORT with an IP address and a port 1-65535 "
            "(e.g. 127.0.0.1:9201, 10.0.0.5:9201 or [::1]:9201)."
        ) from None
    return address, number


def metrics_listen():
    """Where to serve metrics: (address, port), or None for nowhere."""
    return env_address(VARIABLE)
