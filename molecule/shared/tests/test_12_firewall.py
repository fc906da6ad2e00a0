"""The inbound firewall: nftables drops what the layout does not need."""

import http.client

import docker
import pytest
from clients import groups_of

PROBE_PORT = "9999"  # a string: testinfra quotes its arguments


def test_ruleset_drops_by_default_and_loads_at_boot(host):
    table = host.check_output("nft list table inet chat_firewall")
    assert "policy drop;" in table
    # Only web hosts take the public's http and https.
    public = 'tcp dport { 80, 443 } accept comment "public"' in table
    assert public == ("web" in groups_of(host)), table
    assert host.service("nftables").is_enabled


def test_the_engines_own_tables_are_kept(host):
    """The file replaces only its own table: no 'flush ruleset'."""
    lines = host.file("/etc/nftables.conf").content_string.splitlines()
    assert not [line for line in lines if line.strip().startswith("flush")]


@pytest.fixture
def probe_server(host):
    """An HTTP server on a port no rule opens, on every address of the host."""
    host.check_output("systemd-run --unit chat-firewall-probe --collect "
                      "python3 -m http.server %s --bind 0.0.0.0 --directory /tmp",
                      PROBE_PORT)
    try:
        host.run("for i in $(seq 50); do ss -Htln 'sport = :%s' | grep -q . && break; sleep 0.1; done",
                 PROBE_PORT)
        yield
    finally:
        host.run("systemctl stop chat-firewall-probe")


def published_probe_port(host):
    ports = docker.from_env().containers.get(host.backend.get_hostname()).ports.get(f"{PROBE_PORT}/tcp")
    if not ports:
        pytest.skip(f"port {PROBE_PORT} is not published for this scenario")
    return int(ports[0]["HostPort"])


def answered(port):
    """Whether a request through the published port gets an HTTP answer."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.request("HEAD", "/")
        return connection.getresponse().status > 0
    except (OSError, http.client.HTTPException):
        return False
    finally:
        connection.close()


def test_a_port_no_rule_opens_is_dropped(host, probe_server):
    port = published_probe_port(host)
    assert not answered(port)
    # The control: the same server, the same path, with a rule that opens it.
    host.check_output("nft insert rule inet chat_firewall input tcp dport %s accept comment probe", PROBE_PORT)
    try:
        assert answered(port)
    finally:
        chain = host.check_output("nft -a list chain inet chat_firewall input")
        (handle,) = [line.split("# handle ")[1] for line in chain.splitlines() if 'comment "probe"' in line]
        host.check_output("nft delete rule inet chat_firewall input handle %s", handle)
    assert not answered(port)
