"""After a reboot every service comes back by itself."""

import time

import docker
import pytest

SERVICES = ["nginx", "redis-server", "chat-gunicorn.socket", "chat-gunicorn.service"]


@pytest.fixture(scope="module")
def rebooted(host, edge):
    container = docker.from_env().containers.get(host.backend.get_hostname())
    boot_before = host.check_output("cat /proc/sys/kernel/random/boot_id")
    pid1_start_before = host.check_output("ps -o lstart= -p 1")
    # The container stops systemd with SIGRTMIN+3, its clean shutdown.
    container.restart(timeout=60)
    _wait_until_reachable(host)
    host.run("systemctl is-system-running --wait")
    edge.wait_healthy(timeout=90)
    return boot_before, pid1_start_before


def _wait_until_reachable(host, timeout=90):
    """Over SSH the host answers only once sshd is back: retry until then."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            host.run("true")
            return
        except RuntimeError:  # unreachable: testinfra's Ansible backend raises
            if time.monotonic() > deadline:
                raise
            time.sleep(2)


def test_host_really_restarted(host, rebooted):
    _, pid1_start_before = rebooted
    assert host.check_output("ps -o lstart= -p 1") != pid1_start_before


def test_services_back_after_reboot(host, rebooted, daphne_instances):
    units = SERVICES + [f"chat-daphne@{n}.service" for n in daphne_instances]
    for unit in units:
        assert host.service(unit).is_running, f"{unit} did not come back after the reboot"
    assert host.run("systemctl is-system-running").stdout.strip() == "running"


def test_split_works_after_reboot(edge, rebooted):
    _, health = edge.get_json("/healthz")
    assert health["interface"] == "wsgi"
    with edge.websocket("/ws/health/") as ws:
        assert edge.receive(ws)["interface"] == "asgi"
