"""Shared fixtures for the Molecule scenarios' verify step.

Checks run in two places: on the host through testinfra (`host`), and from
the controller through Nginx's published port with real HTTP and WebSocket
clients (`edge`), the way a browser reaches the service.
"""

import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request

import docker
import pytest
import testinfra.utils.ansible_runner
from websockets.sync.client import connect

INVENTORY = os.environ["MOLECULE_INVENTORY_FILE"]
REPO = os.environ["MOLECULE_PROJECT_DIRECTORY"]
testinfra_hosts = testinfra.utils.ansible_runner.AnsibleRunner(INVENTORY).get_hosts("all")


class Edge:
    """The service as a client sees it: Nginx on 127.0.0.1:<published port>."""

    def __init__(self, port):
        self.base = f"http://127.0.0.1:{port}"
        self.ws_base = f"ws://127.0.0.1:{port}"
        # AllowedHostsOriginValidator answers a handshake without a matching
        # Origin with 403, so clients send the site's own origin.
        self.origin = self.base

    def get(self, path, timeout=10):
        """GET path; returns (status, body) without raising on 4xx/5xx."""
        try:
            with urllib.request.urlopen(self.base + path, timeout=timeout) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()

    def get_json(self, path):
        status, body = self.get(path)
        return status, json.loads(body)

    def websocket(self, path, origin=None, timeout=10):
        return connect(self.ws_base + path, origin=origin or self.origin, open_timeout=timeout)

    def receive(self, ws, timeout=10):
        return json.loads(ws.recv(timeout=timeout))

    def healthy_once(self):
        """One HTTP health check and one WebSocket health check, both through Nginx."""
        status, body = self.get("/healthz", timeout=5)
        assert status == 200, f"/healthz answered {status}: {body[:200]}"
        with self.websocket("/ws/health/", timeout=5) as ws:
            assert self.receive(ws, timeout=5)["interface"] == "asgi"

    def wait_healthy(self, timeout=60, in_a_row=10):
        """Wait until both halves answer `in_a_row` times running.

        Several in a row, because each Nginx worker and each upstream server
        answers on its own: one success proves only one path.
        """
        deadline = time.monotonic() + timeout
        streak, last = 0, None
        while streak < in_a_row:
            if time.monotonic() > deadline:
                pytest.fail(f"the service did not become healthy in {timeout} s: {last}")
            try:
                self.healthy_once()
                streak += 1
            except Exception as error:  # any failure means: not up yet
                streak, last = 0, repr(error)
                time.sleep(1)


def _published_port(container_name):
    container = docker.from_env().containers.get(container_name)
    return container.ports["80/tcp"][0]["HostPort"]


@pytest.fixture(scope="module")
def edge(host):
    return Edge(_published_port(host.backend.get_hostname()))


@pytest.fixture(scope="module")
def daphne_instances(host):
    """Instance numbers of the Daphne units enabled at boot."""
    out = host.check_output(
        "find /etc/systemd/system/multi-user.target.wants -name 'chat-daphne@*.service' -printf '%f\\n'")
    instances = sorted(int(name.split("@")[1].split(".")[0]) for name in out.split())
    assert instances, "no chat-daphne@N.service is enabled"
    return instances


_REPORTS = []


def report(line):
    """A measured figure, printed in the run's summary (pytest captures print())."""
    _REPORTS.append(line)


def pytest_terminal_summary(terminalreporter):
    if _REPORTS:
        terminalreporter.section("measured")
        for line in _REPORTS:
            terminalreporter.write_line(line)


def playbook_command(playbook, *args):
    return ["ansible-playbook", os.path.join(REPO, playbook), "-i", INVENTORY, *args]


def playbook_env(**extra):
    """Output the tests can search: no colours, results as JSON (not wrapped YAML)."""
    return {**os.environ, "ANSIBLE_NOCOLOR": "1", "ANSIBLE_FORCE_COLOR": "0",
            "ANSIBLE_CALLBACK_RESULT_FORMAT": "json", **extra}


def run_playbook(playbook, *args, timeout=900, env=None):
    """ansible-playbook against the scenario's hosts, as Molecule's converge runs it.

    playbook is relative to the repository (site.yml, playbooks/deploy.yml).
    Returns the CompletedProcess, with the run's duration as .seconds.
    """
    started = time.monotonic()
    # Ansible writes failures to stderr: one stream keeps them in order.
    result = subprocess.run(playbook_command(playbook, *args), cwd=REPO, env=playbook_env(**(env or {})),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            timeout=timeout)
    result.seconds = time.monotonic() - started
    return result


def app_copy(tmp_path, name, change=None):
    """A copy of app/ to ship as another release; change(path) edits it."""
    target = tmp_path / name
    shutil.copytree(os.path.join(REPO, "app"), target, ignore=shutil.ignore_patterns(
        ".venv*", "__pycache__", "*.pyc", ".pytest_cache", "staticfiles", "db.sqlite3*"))
    # Any new file makes a new release id; the lock file stays the same.
    (target / "DEPLOY_MARK").write_text(f"{name} {time.time()}\n")
    if change:
        change(target)
    return target
