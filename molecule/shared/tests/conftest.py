"""Pytest's hooks and the fixtures of the Molecule scenarios' verify step.

Checks run on the host through testinfra (`host`) and from the controller
through Nginx's published port (`edge`); the clients and helpers they use
are in clients.py.
"""

import os

import pytest
import testinfra.utils.ansible_runner

from clients import INVENTORY, REPORTS, edge_of, groups_of, inventory_value

testinfra_hosts = testinfra.utils.ansible_runner.AnsibleRunner(INVENTORY).get_hosts("all")


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "needs(*groups): run only on hosts in every one of these inventory groups")


def pytest_runtest_setup(item):
    """Skips a test marked needs(...) on a host that lacks one of the groups.

    The checks of one host were written for the all-in-one layout; in a
    cluster each runs where its components are, decided by group membership
    (here, before any fixture of the test is set up).
    """
    wanted = {group for marker in item.iter_markers("needs") for group in marker.args}
    callspec = getattr(item, "callspec", None)
    host = callspec.params.get("_testinfra_host") if callspec else None
    if not wanted or host is None:
        return
    missing = wanted - groups_of(host)
    if missing:
        pytest.skip(f"SKIPPED: {host.backend.get_hostname()} is not in group(s) {', '.join(sorted(missing))}")


@pytest.fixture(scope="module")
def edge(host):
    """The host's own Nginx, as published on 127.0.0.1; only web hosts have one."""
    if "web" not in groups_of(host):
        pytest.skip(f"SKIPPED: {host.backend.get_hostname()} is not a web host: no edge here")
    return edge_of(host)


@pytest.fixture(scope="module")
def daphne_instances(host):
    """Instance numbers of the Daphne units enabled at boot."""
    out = host.check_output(
        "find /etc/systemd/system/multi-user.target.wants -name 'chat-daphne@*.service' -printf '%f\\n'")
    instances = sorted(int(name.split("@")[1].split(".")[0]) for name in out.split())
    assert instances, "no chat-daphne@N.service is enabled"
    return instances


@pytest.fixture(scope="module")
def secrets():
    """The Redis passwords of the inventory (its vault): the admin's and the app's."""
    name = testinfra.utils.ansible_runner.AnsibleRunner(INVENTORY).get_hosts("redis")[0]
    return {"admin": inventory_value(name, "chat_redis_admin_password"),
            "app": inventory_value(name, "chat_redis_password")}


def pytest_runtest_logreport(report):
    """Each failed check on one line in CHAT_TEST_FAILURES, for make test's digest
    (Molecule wraps pytest's own summary across lines)."""
    path = os.environ.get("CHAT_TEST_FAILURES")
    if not path or not report.failed:
        return
    crash = getattr(report.longrepr, "reprcrash", None)
    message = (crash.message if crash else str(report.longrepr)).strip().splitlines() or [""]
    where = f"{os.environ.get('MOLECULE_SCENARIO_NAME', '?')} on {os.environ.get('CHAT_HOST_SUITE', 'bookworm')}"
    with open(path, "a") as out:
        out.write(f"FAILED ({where}, {report.when}) {report.nodeid}: {message[0][:240]}\n")


def pytest_terminal_summary(terminalreporter):
    if REPORTS:
        terminalreporter.section("measured")
        for line in REPORTS:
            terminalreporter.write_line(line)
