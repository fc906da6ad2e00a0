"""Rolling maintenance (playbooks/maintenance.yml) under a room's traffic.

Runs where group app has two hosts or more (the cluster scenario). Each
host is rebooted for real as far as a container can be: `systemctl reboot`
ends its systemd, and the engine starts the container again (a restart
policy set here for the time of the check), so PID 1 starts anew and every
unit comes up by itself; only the kernel is the machine's. The clients are
harsh: half reconnect at once after a close, pollers ask for the lobby
(the database) throughout, senders post and count what the database holds.

- App hosts, one at a time: out of lb's rotation, WebSockets closed with
  1012, stopped, rebooted, gated, back: 0 failed requests, 0 failed
  handshakes, only 1012 closes, 0 refused posts, nothing lost.
- Data hosts, one at a time: the Redis primary and the PostgreSQL leader
  moved off each before its reboot, and each back as a replica before the
  next: 0 failed requests, 0 dropped sockets, 0 refused posts, nothing lost.
- A host alone in its tier (lb) is refused without the downtime accepted,
  before anything changes.
"""

import contextlib

import docker
import pytest
import testinfra.utils.ansible_runner

from clients import INVENTORY, edge_of, inventory_host, report, run_playbook
from test_50_deploy import assert_gentle_reconnects
from test_70_faults import account
from test_88_redis_ha import address, playbook_under_traffic, primary_host, roles
from test_89_db_ha import healthy

RUNNER = testinfra.utils.ansible_runner.AnsibleRunner(INVENTORY)
APP_HOSTS = RUNNER.get_hosts("app")
DATA_HOSTS = sorted(set(RUNNER.get_hosts("redis")) | set(RUNNER.get_hosts("db")))

pytestmark = pytest.mark.skipif(len(APP_HOSTS) < 2, reason="SKIPPED: one app host, nobody takes its share")

on = inventory_host


@pytest.fixture(scope="module")
def edge():
    return edge_of(on(RUNNER.get_hosts("web")[0]))


def pid1_started(name):
    return on(name).check_output("ps -o lstart= -p 1")


@contextlib.contextmanager
def rebootable(names):
    """The engine starts these containers again when their systemd ends (a reboot)."""
    containers = [docker.from_env().containers.get(name) for name in names]
    for container in containers:
        container.update(restart_policy={"Name": "unless-stopped"})
    try:
        yield
    finally:
        for container in containers:
            container.update(restart_policy={"Name": "no"})


def maintained_under_traffic(edge, names, name):
    """maintenance.yml with a reboot of each of NAMES, under a room's traffic. Returns the run,
    the traffic's counts and the seconds from the run's end until a message reached every socket."""
    before = {host: pid1_started(host) for host in names}
    with rebootable(names):
        result, counts, recovery, room = playbook_under_traffic(
            edge, name, "playbooks/maintenance.yml", "-e", "chat_maintenance_reboot=always", "--limit", ",".join(names))
    not_rebooted = [host for host in names if pid1_started(host) == before[host]]
    assert not_rebooted == [], f"not rebooted: {not_rebooted}"
    return result, counts, recovery, room


def test_app_hosts_rebooted_in_turn_fail_no_request_and_close_with_1012_only(edge):
    result, counts, recovery, room = maintained_under_traffic(edge, APP_HOSTS, "maintain-app")
    reconnects = assert_gentle_reconnects(counts)
    account("app hosts rebooted in turn", on(APP_HOSTS[0]), room, counts, recovery)
    report(f"maintenance.yml, {len(APP_HOSTS)} app hosts rebooted in turn: {result.seconds:.0f} s; "
           f"{counts.http_ok} requests answered, {len(counts.http_failed)} failed; "
           f"{len(counts.closes)} closes (1012), reconnects {reconnects}")


def test_data_hosts_rebooted_in_turn_with_their_primaries_moved_first(edge, secrets):
    if len(DATA_HOSTS) < 3:
        pytest.skip("SKIPPED: one data host; its window is the README's figure")
    result, counts, recovery, room = maintained_under_traffic(edge, DATA_HOSTS, "maintain-data")
    account("data hosts rebooted in turn", on(APP_HOSTS[0]), room, counts, recovery, expect_drops=0)
    # Each came back as a replica, in sync, before the next went down.
    assert healthy(RUNNER.get_hosts("db")), "PostgreSQL: not every member running or streaming"
    primary = primary_host(secrets)
    followers = {name: role for name, role in roles(secrets).items() if name != primary}
    assert all(role[:2] == ["slave", address(primary)] and role[3] == "connected"
               for role in followers.values()), followers
    report(f"maintenance.yml, {len(DATA_HOSTS)} data hosts rebooted in turn (Redis primary and "
           f"PostgreSQL leader moved off each first): {result.seconds:.0f} s; {counts.http_ok} requests "
           f"answered, {len(counts.http_failed)} failed; {len(counts.refused)} posts refused")


def test_a_host_alone_in_its_tier_is_refused_without_the_downtime_accepted():
    web = RUNNER.get_hosts("web")
    if len(web) != 1:
        pytest.skip("SKIPPED: several web hosts")
    before = pid1_started(web[0])
    result = run_playbook("playbooks/maintenance.yml", "-e", "chat_maintenance_reboot=always", "--limit", web[0])
    assert result.returncode != 0
    assert f"{web[0]} alone in its tier" in result.stdout, result.stdout[-3000:]
    assert "Nothing was changed" in result.stdout
    assert pid1_started(web[0]) == before
