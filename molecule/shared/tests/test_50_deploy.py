"""Zero-downtime releases: deploys under live traffic, the health gate, rollback, the lock.

The tests run in order and build on each other: the host starts on the
release of the converge, with no previous release to roll back to. They take
minutes, so they run on one Debian release (CHAT_RELEASE_SUITE, default
bookworm); on the other, the layout moves (test_55_layouts.py) deploy and roll
back under load with the same playbooks.
"""

import shlex
import subprocess
import time
import uuid

import pytest

from clients import REPO, app_copy, on_one_release, playbook_command, playbook_env, report, run_playbook, why_failed
from traffic import Traffic

CLOSE_SERVICE_RESTART = 1012
ROOT = "/srv/chat"
# Seconds a dropped WebSocket may take to be back. Reconnects take 0.4-0.7 s
# on an idle machine, but make test runs two Molecule lanes on two cores:
# there a restarted Daphne's queued clients waited 5.0 s (median) and 6.1 s
# (slowest) for the new process to import the app (dependency change), 2.5 s
# without one. The bound is the slowest of those plus 60 %: it catches a
# client that hung or needed retries, not the shared machine.
RECONNECT_WITHIN = 10
# The share of the clients that reconnect at once after a close (the rest
# wait the page's jittered pause).
AT_ONCE = 0.5
# Seconds an HTTP client waits for an answer before it counts the request as
# failed. While Gunicorn reloads, requests wait in its socket until a new
# worker has imported the app: with two Molecule lanes on two cores one
# /healthz waited more than 10 s there once (answered late, not refused).
# A browser waits longer than that; a refused or dropped request still fails.
HTTP_PATIENCE = 30

pytestmark = on_one_release("CHAT_RELEASE_SUITE", "bookworm", "the release checks")


def live_release(edge):
    status, health = edge.get_json("/healthz")
    assert status == 200, health
    return health["release"]


def venv_of(host, release):
    return host.check_output(f"readlink -f {ROOT}/releases/{release}/.venv")


def assert_no_failed_request(counts):
    assert counts.http_failed == [], f"{len(counts.http_failed)} failed requests: {counts.http_failed[:5]}"
    assert counts.http_ok > 20, "the load did not run"
    # Each poller, not only their sum: one that died early cannot pass.
    assert all(n >= 5 for n in counts.polls), f"an HTTP poller stopped early: {counts.polls}"


def assert_gentle_reconnects(counts):
    """Every close was a 1012 to a client in the room, and each came back in time.

    The clients run in both modes (AT_ONCE): half reconnect after the page's
    jittered pause, half at once, which is what caught a stopping Daphne
    accepting handshakes it then cut without a close frame.
    """
    assert counts.ws_failed_handshakes == [], counts.ws_failed_handshakes[:5]
    assert counts.closed_on_join == [], f"handshakes accepted, then closed: {counts.closed_on_join[:10]}"
    codes = {code for code, _ in counts.closes} | {code for code, _ in counts.reconnects}
    assert codes <= {CLOSE_SERVICE_RESTART}, f"close codes seen: {sorted(codes, key=str)} in {counts.closes[:20]}"
    times = sorted(seconds for _, seconds in counts.reconnects)
    slowest = times[-1] if times else 0
    assert slowest < RECONNECT_WITHIN, f"a WebSocket took {slowest:.2f} s to reconnect"
    return f"median {times[len(times) // 2]:.2f} s, slowest {slowest:.2f} s" if times else "none"


def rehome_window(host):
    """daphne_rehome_window, as the instances have it."""
    env = host.check_output("systemctl show --property=Environment --value chat-daphne@1.service")
    return float(dict(item.split("=", 1) for item in env.split())["CHAT_REHOME_WINDOW"])


def wait_for_retired_nginx_workers(host, within):
    """Seconds until no Nginx worker retired by a reload is left.

    A retired worker exits once its last connection is gone; one that holds
    WebSockets would otherwise stay until nginx_worker_shutdown_timeout (10
    min) and then cut them without a close frame.
    """
    started = time.monotonic()
    while True:
        # ps, not pgrep -f: the shell running pgrep would match its own pattern.
        processes = host.check_output("ps -C nginx -o args=").splitlines()
        left = sum("shutting down" in args for args in processes)
        waited = time.monotonic() - started
        if left == 0:
            return waited
        assert waited < within, (
            f"{left} Nginx worker(s) retired by the deploy's reloads still hold connections {waited:.0f} s "
            "after it: their WebSockets would be cut without a close frame at worker_shutdown_timeout")
        time.sleep(1)


def _changed_lock(app):
    """The same dependencies under another lock-file hash (a new virtualenv)."""
    with open(app / "requirements.lock", "a") as lock:
        lock.write("# deploy test: a changed lock file\n")


@pytest.fixture(scope="module")
def releases():
    """Release ids seen by the tests, by name."""
    return {}


def test_rollback_without_a_previous_release_refuses(host, edge, releases):
    releases["converged"] = live_release(edge)
    result = run_playbook("playbooks/rollback.yml")
    assert result.returncode != 0
    assert "Nothing to roll back to" in result.stdout, result.stdout[-3000:]
    assert live_release(edge) == releases["converged"]
    assert not host.file(f"{ROOT}/deploy.lock").exists, "the refused rollback kept the lock"


def test_deploy_with_new_dependencies_under_load(host, edge, releases, tmp_path):
    # A changed lock file: a new virtualenv, so Gunicorn is restarted, not reloaded.
    source = app_copy(tmp_path, "new-deps", _changed_lock)
    room = f"deploy-{uuid.uuid4().hex[:8]}"
    with Traffic(edge, room, sockets=50, at_once=AT_ONCE, http_timeout=HTTP_PATIENCE) as counts:
        result = run_playbook("playbooks/deploy.yml", "-e", f"chat_app_source_dir={source}")
        assert result.returncode == 0, why_failed(result)
        # The rolling restart reloaded Nginx; the sockets it holds move to
        # the new workers, told 1012 (counted below) within the window.
        retired_after = wait_for_retired_nginx_workers(host, rehome_window(host) + 30)
    releases["new_deps"] = live_release(edge)
    assert releases["new_deps"] != releases["converged"]
    assert venv_of(host, releases["new_deps"]) != venv_of(host, releases["converged"])
    assert counts.releases_seen[-1] == releases["new_deps"]
    assert_no_failed_request(counts)
    reconnect_times = assert_gentle_reconnects(counts)
    # Every socket was on an instance that restarted.
    assert len(counts.reconnects) >= 50
    report(f"deploy with a dependency change: {result.seconds:.0f} s, {counts.http_ok} requests, "
           f"{len(counts.http_failed)} failed, {len(counts.reconnects)} reconnects "
           f"(code 1012), {reconnect_times}; the last retired Nginx worker exited {retired_after:.0f} s after")


def test_code_only_deploy_reuses_the_virtualenv_and_reloads_gunicorn(host, edge, releases, tmp_path):
    # The lock file of the previous test: its virtualenv serves this release too.
    source = app_copy(tmp_path, "code-only", _changed_lock)
    master = host.check_output("systemctl show --property=MainPID --value chat-gunicorn.service")
    room = f"deploy-{uuid.uuid4().hex[:8]}"
    with Traffic(edge, room, sockets=50, at_once=AT_ONCE, http_timeout=HTTP_PATIENCE) as counts:
        # The same deploy, reached through site.yml's tag.
        result = run_playbook("site.yml", "--tags", "app", "-e", f"chat_app_source_dir={source}")
    assert result.returncode == 0, why_failed(result)
    releases["code_only"] = live_release(edge)
    assert releases["code_only"] != releases["new_deps"]
    assert venv_of(host, releases["code_only"]) == venv_of(host, releases["new_deps"])
    assert "Install the locked dependencies" not in _changed_tasks(result.stdout)
    # A graceful reload (HUP) keeps the master; a restart would not.
    assert host.check_output("systemctl show --property=MainPID --value chat-gunicorn.service") == master
    assert_no_failed_request(counts)
    reconnect_times = assert_gentle_reconnects(counts)
    report(f"deploy without a dependency change: {result.seconds:.0f} s, {counts.http_ok} requests, "
           f"{len(counts.http_failed)} failed, {len(counts.reconnects)} reconnects "
           f"(code 1012), {reconnect_times}")


def _changed_tasks(output):
    """Names of the tasks that reported `changed` in an ansible-playbook output."""
    changed, task = [], None
    for line in output.splitlines():
        if "TASK [" in line:
            task = line.split("TASK [", 1)[1].rsplit("]", 1)[0]
        elif line.lstrip().startswith("changed:") and task:
            changed.append(task)
    return "\n".join(changed)


def test_rollback_restores_the_release_live_before(host, edge, releases):
    with Traffic(edge, f"rollback-{uuid.uuid4().hex[:8]}", sockets=10, at_once=AT_ONCE,
                 http_timeout=HTTP_PATIENCE) as counts:
        result = run_playbook("playbooks/rollback.yml")
    assert result.returncode == 0, why_failed(result)
    assert live_release(edge) == releases["new_deps"]
    assert_no_failed_request(counts)
    assert_gentle_reconnects(counts)
    log = host.file(f"{ROOT}/deploy.log").content_string.splitlines()
    assert f"from={releases['code_only']} to={releases['new_deps']}" in log[-1]
    assert " rollback " in log[-1]
    # The release rolled back from is now the previous one: kept, not pruned.
    assert host.file(f"{ROOT}/previous").linked_to == f"{ROOT}/releases/{releases['code_only']}"


def test_a_release_that_cannot_start_never_goes_live(host, edge, releases, tmp_path):
    def break_servers(app):
        # manage.py (migrate, collectstatic) still works; the servers cannot start.
        for module in ("wsgi.py", "asgi.py"):
            with open(app / "chatservice" / module, "a") as code:
                code.write("\nraise RuntimeError('fixture: this release cannot start')\n")

    source = app_copy(tmp_path, "broken", break_servers)
    with Traffic(edge, f"broken-{uuid.uuid4().hex[:8]}", sockets=10, at_once=AT_ONCE,
                 http_timeout=HTTP_PATIENCE) as counts:
        result = run_playbook("playbooks/deploy.yml", "-e", f"chat_app_source_dir={source}")
    assert result.returncode != 0
    assert "canary gunicorn" in result.stdout, result.stdout[-5000:]
    assert "fixture: this release cannot start" in result.stdout
    assert live_release(edge) == releases["new_deps"]
    assert_no_failed_request(counts)
    assert counts.reconnects == [], "a live server was restarted for a release that cannot start"
    assert not host.file(f"{ROOT}/deploy.lock").exists


def test_a_release_that_fails_only_when_live_is_switched_back(host, edge, releases, tmp_path):
    def break_daphne_under_systemd(app):
        # It passes the canary (not a systemd unit), then cannot start as one:
        # what this exercises is the gate's way back.
        with open(app / "chatservice" / "asgi.py", "a") as code:
            code.write("\nimport os\nif os.environ.get('INVOCATION_ID'):\n"
                       "    raise RuntimeError('fixture: fails under systemd only')\n")

    source = app_copy(tmp_path, "fails-when-live", break_daphne_under_systemd)
    sockets_before = _socket_start_times(host)
    with Traffic(edge, f"switch-back-{uuid.uuid4().hex[:8]}", sockets=0,
                 http_timeout=HTTP_PATIENCE) as counts:
        result = run_playbook("playbooks/deploy.yml", "-e", f"chat_app_source_dir={source}")
    assert result.returncode != 0
    name = host.backend.get_hostname()
    assert f"Health gate failed on {name}" in result.stdout, result.stdout[-5000:]
    assert "Restart instance 1" in result.stdout
    assert "fixture: fails under systemd only" in result.stdout, "the journal is not quoted"
    assert f"Release {releases['new_deps']} is live again." in result.stdout
    assert live_release(edge) == releases["new_deps"]
    edge.wait_healthy()
    for _ in range(6):
        with edge.websocket("/ws/health/") as ws:
            assert edge.receive(ws)["release"] == releases["new_deps"]
    # Pages were served by Gunicorn throughout, on whichever release.
    assert_no_failed_request(counts)
    assert not host.file(f"{ROOT}/deploy.lock").exists
    # systemd kept every socket open through all the restarts.
    assert _socket_start_times(host) == sockets_before


def _socket_start_times(host):
    out = host.check_output(
        "systemctl show --property=Id,ActiveEnterTimestampMonotonic 'chat-*.socket'")
    return out


def test_the_sockets_listen_with_the_backlog_their_units_ask_for(host):
    wanted = {}
    for unit in host.check_output("systemctl show --property=Backlog,Listen 'chat-*.socket'").split("\n\n"):
        props = dict(line.split("=", 1) for line in unit.splitlines() if "=" in line)
        wanted[props["Listen"].split()[0]] = props["Backlog"]
    assert len(wanted) >= 3, wanted
    listening = {}
    for line in host.check_output("ss -Hlx").splitlines():
        # Netid State Recv-Q Send-Q Local ...: Send-Q is a listener's backlog.
        fields = line.split()
        if fields[4] in wanted:
            listening[fields[4]] = fields[3]
    assert listening == wanted


def test_a_second_deploy_is_refused_and_a_run_whose_lock_was_taken_stops(host, edge, releases, tmp_path):
    """While a deploy runs, a second one is refused with the holder's name;
    and a run whose lock another run took over (as one does a stale lock)
    stops at its next switch instead of going on beside it."""
    live_before = live_release(edge)
    source = app_copy(tmp_path, "locked")
    first = subprocess.Popen(
        playbook_command("playbooks/deploy.yml", "-e", f"chat_app_source_dir={source}"),
        cwd=REPO, env=playbook_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lock = f"{ROOT}/deploy.lock"
    other = "someone@elsewhere deploy 2026-01-01T00:00:00Z run takenover"
    try:
        deadline = time.monotonic() + 120
        while not host.file(lock).exists:
            assert first.poll() is None, first.stdout.read()[-3000:]
            assert time.monotonic() < deadline, "the first deploy never took the lock"
            time.sleep(0.2)
        # Another run takes the lock over while the first one builds.
        host.check_output(f"printf '%s\\n' {shlex.quote(other)} > {lock}")
        second = run_playbook("playbooks/deploy.yml")
        output, _ = first.communicate(timeout=600)
    finally:
        if first.poll() is None:
            first.kill()
        host.run(f"rm -f {lock}")
    assert second.returncode != 0
    assert "Another deploy or rollback is running" in second.stdout, second.stdout[-3000:]
    assert f"held by: {other}" in second.stdout
    assert first.returncode != 0, "the run whose lock was taken went on"
    assert f"held by: {other}" in output, output[-5000:]
    assert "Point current at the release" not in _task_names(output), "the run switched a host after losing its lock"
    assert live_release(edge) == live_before
    edge.wait_healthy()


def _task_names(output):
    """Names of the tasks an ansible-playbook output shows as run."""
    return "\n".join(line.split("TASK [", 1)[1].rsplit("]", 1)[0] for line in output.splitlines()
                     if "TASK [" in line)
