"""Typed readers for environment variables.

Every setting comes from the environment so that one release directory can be
deployed unchanged to any host; a malformed value stops start-up with a message
that names the variable instead of surfacing later as an odd runtime error.
"""

import ipaddress
import os

from django.core.exceptions import ImproperlyConfigured

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def env_str(name, default=""):
    return os.environ.get(name, default)


def env_bool(name, default=False):
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ImproperlyConfigured(
        f"{name}={raw!r} is not a boolean; use one of true/false, 1/0, yes/no, on/off."
    )


def _env_number(name, default, minimum, convert, kind):
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = convert(raw)
    except ValueError:
        raise ImproperlyConfigured(f"{name}={raw!r} is not {kind}.") from None
    if minimum is not None and value < minimum:
        raise ImproperlyConfigured(f"{name}={value} must be at least {minimum}.")
    return value


def env_int(name, default, minimum=None):
    return _env_number(name, default, minimum, int, "an integer")


def env_float(name, default, minimum=None):
    return _env_number(name, default, minimum, float, "a number")


def env_list(name, default=""):
    """A comma-separated list; blanks around items and empty items are dropped."""
    raw = os.environ.get(name, default)
    return [item.strip() for item in raw.split(",") if item.strip()]


def env_networks(name, default=""):
    """A comma-separated list of IP networks (an address alone is a network of one)."""
    networks = []
    for item in env_list(name, default):
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError as error:
            raise ImproperlyConfigured(
                f"{name}: {item!r} is not an IP network (10.0.5.0/24, 2001:db8::/64 or an address)."
            ) from error
    return networks


def env_host_ports(name, default=""):
    """A comma-separated list of HOST:PORT (a name, an IPv4 address or [IPv6]), as (host, port) pairs.

    Unlike env_list, an empty item is an error: in a list of servers it is
    a typo (a stray comma), not something to skip silently.
    """
    raw = os.environ.get(name, default)
    if raw.strip() == "":
        return []
    pairs = []
    for number, item in enumerate(raw.split(","), start=1):
        item = item.strip()
        if not item:
            raise ImproperlyConfigured(f"{name}={raw!r}: entry {number} is empty.")
        host, colon, port = item.rpartition(":")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        if not colon or not host or ":" in host and not item.startswith("["):
            raise ImproperlyConfigured(
                f"{name}: {item!r} is not HOST:PORT (e.g. 10.0.0.5:26379, sentinel-1:26379, [2001:db8::5]:26379)."
            )
        if not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ImproperlyConfigured(f"{name}: {item!r} has no port 1-65535 after its last ':'.")
        pairs.append((host, int(port)))
    return pairs
