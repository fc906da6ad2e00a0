#!/usr/bin/env python3
"""Start or remove a local Debian systemd host in a container.

The container options come from the platform of Molecule's default scenario,
so the demo host and the tested host are made the same way:

    host.py up NAME PORT TLS_PORT
                             start NAME with its port 80 on 127.0.0.1:PORT
                             and its port 443 on 127.0.0.1:TLS_PORT
        [--publish PORT:HOSTPORT ...]   and more of its ports on 127.0.0.1
        [--network NET [--alias NAME ...]]
                             on the bridge network NET (made if missing)
                             instead of the default one: Docker's DNS there
                             gives other hosts its address for each NAME
    host.py up NAME --network NET ...  the same without published ports
    host.py down NAME [--network NET]  remove NAME (and NET once unused)
"""

import argparse
import os
import pathlib
import re
import sys
import time

import docker
import yaml

REPO = pathlib.Path(__file__).resolve().parent.parent
PLATFORM_FILE = REPO / "molecule" / "default" / "molecule.yml"


def expand(value):
    """Expand ${VAR:-default} the way Molecule does in molecule.yml."""
    return re.sub(r"\$\{(\w+):-([^}]*)\}", lambda m: os.environ.get(m.group(1)) or m.group(2), value)


def platform():
    return yaml.safe_load(PLATFORM_FILE.read_text())["platforms"][0]


def wait_for_systemd(container, timeout=60):
    """Wait until systemd in the container finished booting."""
    deadline = time.monotonic() + timeout
    state = ""
    while time.monotonic() < deadline:
        result = container.exec_run(["systemctl", "is-system-running"])
        state = result.output.decode().strip()
        if state in ("running", "degraded"):
            return state
        time.sleep(1)
    sys.exit(f"systemd in {container.name} did not finish booting in {timeout} s (state: {state})")


def network(client, name):
    """The bridge network NAME, made if missing."""
    try:
        return client.networks.get(name)
    except docker.errors.NotFound:
        return client.networks.create(name, driver="bridge")


def up(client, name, port=None, tls_port=None, publish=(), network_name=None, aliases=()):
    published = {f"{inner}/tcp": ("127.0.0.1", int(outer)) for inner, outer in publish}
    if port is not None:
        published["80/tcp"] = ("127.0.0.1", int(port))
    if tls_port is not None:
        published["443/tcp"] = ("127.0.0.1", int(tls_port))
    attach = {}
    if network_name:
        network(client, network_name)
        attach = {"network": network_name, "networking_config": {
            network_name: client.api.create_endpoint_config(aliases=list(aliases))}}
    try:
        container = client.containers.get(name)
    except docker.errors.NotFound:
        p = platform()
        container = client.containers.run(
            expand(p["image"]),
            name=name,
            hostname=name,
            command=p["command"],
            detach=True,
            stop_signal=p["stop_signal"],
            cap_add=p["capabilities"],
            security_opt=p["security_opts"],
            cgroupns=p["cgroupns_mode"],
            volumes=p["volumes"],
            tmpfs={path: "" for path in p["tmpfs"]},
            sysctls=p.get("sysctls", {}),
            ports=published,
            # A reboot of the machine brings the demo back.
            restart_policy={"Name": "unless-stopped"},
            **attach,
        )
    if container.status != "running":
        container.start()
    print(f"{name}: systemd {wait_for_systemd(container)}")


def down(client, name, network_name=None):
    try:
        client.containers.get(name).remove(force=True)
        print(f"{name}: removed")
    except docker.errors.NotFound:
        print(f"{name}: not there")
    if network_name:
        try:
            net = client.networks.get(network_name)
        except docker.errors.NotFound:
            return
        net.reload()
        if not net.containers:
            net.remove()
            print(f"{network_name}: removed")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="action", required=True)
    p_up = sub.add_parser("up")
    p_up.add_argument("name")
    p_up.add_argument("port", type=int, nargs="?")
    p_up.add_argument("tls_port", type=int, nargs="?")
    p_up.add_argument("--publish", action="append", default=[], metavar="PORT:HOSTPORT",
                      type=lambda value: tuple(value.split(":", 1)))
    p_up.add_argument("--network", metavar="NET")
    p_up.add_argument("--alias", action="append", default=[], metavar="NAME")
    p_down = sub.add_parser("down")
    p_down.add_argument("name")
    p_down.add_argument("--network", metavar="NET")
    args = parser.parse_args()
    client = docker.from_env()
    if args.action == "up":
        if (args.port is None) != (args.tls_port is None):
            parser.error("give both PORT and TLS_PORT, or neither")
        up(client, args.name, args.port, args.tls_port, args.publish, args.network, args.alias)
    else:
        down(client, args.name, args.network)


if __name__ == "__main__":
    main()
