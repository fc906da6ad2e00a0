"""A cluster: web, app and data tiers on their own hosts (the cluster scenario).

Runs once for the inventory, not once per host: each check picks its hosts
by group. Skipped where the layout has one app host.
"""

import concurrent.futures
import contextlib
import json
import os
import re
import socket
import subprocess
import time
import uuid

import pytest
import testinfra
import testinfra.utils.ansible_runner
import yaml
from websockets.exceptions import InvalidStatus

from clients import (INVENTORY, WebSocket, changed_per_host, edge_of, inventory_host, report, run_playbook,
                     tcp_open, wait, why_failed)
from patroni import members as patroni_members
from test_19_database import pg_query
from test_70_faults import SENDERS, SOCKETS, _health_check_fails, account, new_room, recovery_after, room_traffic
from test_89_db_ha import healthy
from traffic import Traffic

RUNNER = testinfra.utils.ansible_runner.AnsibleRunner(INVENTORY)
APP_HOSTS = RUNNER.get_hosts("app")
WEB_HOSTS = RUNNER.get_hosts("web")

pytestmark = pytest.mark.skipif(
    len(APP_HOSTS) < 2 or set(WEB_HOSTS) & set(APP_HOSTS),
    reason="SKIPPED: the layout has no separate web host and two app hosts")


on = inventory_host


@pytest.fixture(scope="module")
def lb():
    return on(WEB_HOSTS[0])


@pytest.fixture(scope="module")
def edge(lb):
    return edge_of(lb)


def listen_address(app, unit):
    """ADDRESS:PORT a socket unit of an app host listens on, as systemd says."""
    listen = app.check_output("systemctl show -p Listen --value %s", unit)
    return listen.split()[0]


def private_address(app):
    """The address an app host (a testinfra host) serves on, as its Gunicorn socket says."""
    return listen_address(app, "chat-gunicorn.socket").rsplit(":", 1)[0]


# The test hosts are made afresh each run: their SSH host keys are not kept.
SSH_NO_HOST_KEYS = ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR"]


def host_names(edge, count):
    """Which app hosts answered count /healthz requests and count /ws/health/ handshakes."""
    http, ws = [], []
    for _ in range(count):
        status, health = edge.get_json("/healthz")
        assert status == 200, health
        http.append(health["host"])
        with edge.websocket("/ws/health/") as socket_:
            ws.append(edge.receive(socket_)["host"])
    return http, ws


@contextlib.contextmanager
def tunnel(lb, target):
    """A local port forwarded over SSH through the web host to target (ADDRESS:PORT).

    The connection to target starts on the web host, the one host the app
    hosts' firewall lets in.
    """
    facts = lb.ansible.get_variables()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        local_port = probe.getsockname()[1]
    process = subprocess.Popen(
        ["ssh", "-N", "-i", facts["ansible_private_key_file"], "-p", str(facts.get("ansible_port", 22)),
         *SSH_NO_HOST_KEYS, "-o", "ExitOnForwardFailure=yes", "-o", "BatchMode=yes",
         "-L", f"127.0.0.1:{local_port}:{target}", f"{facts['ansible_user']}@{facts['ansible_host']}"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", local_port), timeout=2):
                break
            assert process.poll() is None, process.stderr.read().decode()
            assert time.monotonic() < deadline, f"the tunnel to {target} did not open"
            time.sleep(0.2)
        yield local_port
    finally:
        # The check is over: an ssh that has not ended 10 s after SIGTERM
        # (a CI run had one, its forwarded WebSockets closed) is killed, not
        # taken for a failure of the chat.
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def direct_websocket(port, path, edge):
    """A WebSocket to one Daphne instance through a tunnel, as the site's page would open it."""
    return WebSocket(f"ws://localhost:{port}{path}", edge.origin, None, 10)


def history(ws):
    frame = json.loads(ws.recv())
    assert frame["type"] == "history", frame
    return frame["messages"]


def message(ws):
    frame = json.loads(ws.recv())
    assert frame["type"] == "message", frame
    return frame


def test_websockets_on_two_app_hosts_share_a_room(lb, edge):
    """The channel layer crosses hosts: app1's Daphne and app2's, one room."""
    first, second = (listen_address(on(name), "chat-daphne@1.socket") for name in APP_HOSTS[:2])
    room = f"cluster-{uuid.uuid4().hex[:8]}"
    with tunnel(lb, first) as port1, tunnel(lb, second) as port2:
        with direct_websocket(port1, f"/ws/chat/{room}/", edge) as alice, \
                direct_websocket(port2, f"/ws/chat/{room}/", edge) as bob:
            assert history(alice) == history(bob) == []
            alice.send(json.dumps({"type": "message", "nickname": "alice", "body": "from app1"}))
            assert message(bob)["body"] == message(alice)["body"] == "from app1"
            bob.send(json.dumps({"type": "message", "nickname": "bob", "body": "from app2"}))
            assert message(alice)["body"] == message(bob)["body"] == "from app2"
        # Whoever joins later, on either host, gets the same history.
        with direct_websocket(port1, f"/ws/chat/{room}/", edge) as carol, \
                direct_websocket(port2, f"/ws/chat/{room}/", edge) as dave:
            seen_on_first, seen_on_second = history(carol), history(dave)
    assert seen_on_first == seen_on_second
    assert [m["body"] for m in seen_on_first] == ["from app1", "from app2"]
    assert [m["seq"] for m in seen_on_first] == [1, 2]


def test_pages_health_and_websockets_through_the_web_host_reach_every_app_host(edge):
    status, body = edge.get("/")
    assert status == 200 and "<html" in body.lower()
    status, body = edge.get("/chat/lobby/")
    assert status == 200
    http, ws = host_names(edge, 16)
    assert set(http) == set(APP_HOSTS), f"/healthz answered from {sorted(set(http))}"
    assert set(ws) == set(APP_HOSTS), f"/ws/health/ answered from {sorted(set(ws))}"


def test_static_files_of_the_release_come_from_the_web_host(lb, edge):
    manifest = json.loads(lb.file("/srv/chat/static/staticfiles.json").content_string)
    hashed = next(iter(manifest["paths"].values()))
    status, _ = edge.get(f"/static/{hashed}")
    assert status == 200
    assert not lb.file("/srv/chat/current").exists, "the web host got a release it does not run"


def test_data_tier_is_closed_to_the_web_host(lb):
    data = private_address_of_data()
    app = private_address(on(APP_HOSTS[0]))
    # The control: the web host reaches what it needs.
    assert tcp_open(lb, app, 8000)
    for port in (6379, 5432):
        assert not tcp_open(lb, data, port), f"the web host reaches {data}:{port}"


def private_address_of_data():
    """The Redis host's address, as the app's own settings name it."""
    env = on(APP_HOSTS[0]).check_output("cat /srv/chat/shared/chat.env")
    redis_url = next(line for line in env.splitlines() if line.startswith("REDIS_URL="))
    return redis_url.split("@", 1)[1].split(":", 1)[0]


REDIS_PING = """
import socket, sys
sock = socket.create_connection((sys.argv[1], 6379), timeout=5)
if len(sys.argv) > 2:
    sock.sendall(("AUTH %s %s\\r\\n" % (sys.argv[2], sys.argv[3])).encode())
    print(sock.recv(200).decode().strip())
sock.sendall(b"PING\\r\\n")
print(sock.recv(200).decode().strip())
"""

def test_app_hosts_reach_redis_and_postgresql_only_with_credentials():
    app = on(APP_HOSTS[0])
    env = dict(line.split("=", 1) for line in app.check_output("cat /srv/chat/shared/chat.env").splitlines()
               if "=" in line and not line.startswith("#"))
    redis_url, database_url = env["REDIS_URL"].strip("'"), env["DATABASE_URL"].strip("'")
    user, password = redis_url.split("//", 1)[1].split("@", 1)[0].split(":", 1)
    data = redis_url.split("@", 1)[1].split(":", 1)[0]
    anonymous = app.check_output("python3 -c %s %s", REDIS_PING, data)
    assert "NOAUTH" in anonymous, anonymous
    assert app.check_output("python3 -c %s %s %s %s", REDIS_PING, data, user, password).splitlines() \
        == ["+OK", "+PONG"]
    # user:password@host:port[,host:port...] (every member with Patroni).
    without_password = re.sub(r"^(\w+://[^:@/]+):[^@/]*@", r"\1@", database_url)
    assert without_password != database_url
    assert "refused:" in pg_query(app, without_password)
    assert pg_query(app, database_url) == "answered"


APP_UNITS = "chat-gunicorn.socket chat-gunicorn.service 'chat-daphne@*.socket' 'chat-daphne@*.service'"


def test_a_stopped_app_host_is_skipped_and_rejoins(edge):
    """Its servers stop: requests and new WebSockets go to the others, none fails."""
    stopped, others = APP_HOSTS[0], APP_HOSTS[1:]
    app = on(stopped)
    app.check_output(f"systemctl stop {APP_UNITS}")
    try:
        started = time.monotonic()
        slowest, last_slow, answers = 0.0, 0.0, []
        while time.monotonic() - started < 20:
            before = time.monotonic()
            status, health = edge.get_json("/healthz")
            took = time.monotonic() - before
            assert status == 200, health
            answers.append(health["host"])
            slowest = max(slowest, took)
            if took > 1:
                last_slow = time.monotonic() - started
            with edge.websocket("/ws/health/") as ws:
                answers.append(edge.receive(ws)["host"])
            # Within Nginx's per-address handshake rate (10/s).
            time.sleep(0.25)
        assert set(answers) <= set(others), f"{stopped} answered after its servers stopped"
        report(f"app host {stopped} stopped: {len(answers)} requests and handshakes through the web "
               f"host in 20 s, 0 failed; slowest {slowest:.2f} s; last one slower than 1 s at "
               f"{last_slow:.1f} s after the stop")
    finally:
        app.check_output("systemctl start chat-gunicorn.socket chat-gunicorn.service "
                         + " ".join(f"chat-daphne@{n}.socket chat-daphne@{n}.service"
                                    for n in enabled_daphne_instances(app)))
    deadline = time.monotonic() + 120
    while stopped not in host_names(edge, 4)[0] + host_names(edge, 4)[1]:
        assert time.monotonic() < deadline, f"{stopped} did not rejoin in 120 s"
        time.sleep(2)


def enabled_daphne_instances(app):
    out = app.check_output(
        "find /etc/systemd/system/multi-user.target.wants -name 'chat-daphne@*.service' -printf '%f\\n'")
    return sorted(int(name.split("@")[1].split(".")[0]) for name in out.split())


# After the restart, connections the pool held died with the server; the
# pool checks a connection before lending it (CONN_HEALTH_CHECKS), so history
# reads and stores go on over fresh ones.
def test_postgresql_stopped_is_reported_refused_and_resumes(edge):
    """The database stops for a while under a room's traffic: the db host's PostgreSQL, or with
    Patroni every member (a failover has nowhere to go; test_89 checks the failovers)."""
    names = RUNNER.get_hosts("db")
    members = [on(name) for name in names]
    version = members[0].check_output("ls /etc/postgresql")
    unit = f"{'patroni' if len(members) > 1 else 'postgresql'}@{version}-main"
    room = new_room("postgresql-stopped")
    outage = 8

    def on_every_member(action, check=True):
        # At once, as a power cut of the data tier would: stopped one after
        # the other, each stop would hand the lead to a member about to stop
        # too, a new timeline each time, which the others must then follow.
        with concurrent.futures.ThreadPoolExecutor(len(members)) as pool:
            results = list(pool.map(lambda data: data.run(f"systemctl {action} {unit}"), members))
        assert not check or all(result.rc == 0 for result in results), results

    traffic = room_traffic(edge, room)
    try:
        with traffic as counts:
            time.sleep(2)
            on_every_member("stop")
            stopped_at = time.monotonic()
            health = _health_check_fails(edge, "database", "", timeout=30)
            named_after = time.monotonic() - stopped_at
            time.sleep(max(0.0, outage - (time.monotonic() - stopped_at)))
            on_every_member("start")
            recovery = recovery_after(traffic, edge, room, time.monotonic())
            edge.wait_healthy(timeout=60)
            time.sleep(5)
    finally:
        on_every_member("start", check=False)
    if len(members) > 1:
        # Every member back and following, not the leader alone: the checks after this one need them.
        wait(lambda: healthy(names), 120, "every Patroni member running or streaming again",
             explain=lambda: f"{patroni_members(names)}; " + "; ".join(
                 f"{name}: " + on(name).run(f"journalctl -q -u {unit} -n 8 --no-pager").stdout.replace("\n", " | ")
                 for name in names))
    report(f"fault postgresql stopped {outage} s: /healthz answered 503 after {named_after:.1f} s "
           f"with database {health['checks']['database'][:80]!r}")
    if counts.ws_failed_handshakes:
        report(f"fault postgresql stopped: first failed handshake or catch-up: {counts.ws_failed_handshakes[0]}")
    # One server: the outage outlasts a post's wait for it (DATABASE_FAILOVER_WAIT), so posts are
    # refused. Patroni's members: posts made as they come back may ride through instead.
    single = len(members) == 1
    account("postgresql stopped", on(APP_HOSTS[0]), room, counts, recovery, refused=True if single else None,
            http_errors_allowed=True)
    assert counts.refused or not single, "no sender got an error frame while PostgreSQL was stopped"
    assert {code for _, code in counts.refused} <= {"store_failed"}, counts.refused
    edge.wait_healthy()


def test_a_run_limited_to_the_web_host_changes_nothing(lb):
    """site.yml --limit lb: Nginx's upstreams and the firewall still list every app host.

    They are built from the other hosts' facts, which preflight gathers for
    the hosts outside the limit.
    """
    before = lb.check_output("nginx -T 2>/dev/null; cat /etc/nftables.conf")
    result = run_playbook("site.yml", "--limit", WEB_HOSTS[0])
    assert result.returncode == 0, why_failed(result)
    recaps = changed_per_host(result.stdout)
    report(f"site.yml --limit {WEB_HOSTS[0]}: {result.seconds:.0f} s, changed per host {recaps}")
    assert recaps.get(WEB_HOSTS[0]) == 0, recaps
    assert set(recaps) <= {WEB_HOSTS[0], "localhost"}, f"the limit was not kept: {recaps}"
    assert lb.check_output("nginx -T 2>/dev/null; cat /etc/nftables.conf") == before


def test_a_deploy_that_cannot_lock_one_app_host_stops_on_all_and_frees_the_others(edge):
    """Another run holds app2's lock: nothing is built or switched, and app1's lock is given back."""
    free, held = on(APP_HOSTS[0]), on(APP_HOSTS[1])
    live = edge.get_json("/healthz")[1]["release"]
    holder = f"someone@elsewhere deploy {uuid.uuid4().hex[:8]}"
    held.check_output("printf '%%s\\n' %s > /srv/chat/deploy.lock", holder)
    try:
        result = run_playbook("playbooks/deploy.yml")
        still_held = held.file("/srv/chat/deploy.lock").content_string.strip()
    finally:
        held.run("rm -f /srv/chat/deploy.lock")
    assert result.returncode != 0
    assert f"Another deploy or rollback is running on {APP_HOSTS[1]}" in result.stdout, result.stdout[-3000:]
    assert holder in result.stdout
    assert "PLAY [Build the release" not in result.stdout, "a host went on past the lock"
    assert not free.file("/srv/chat/deploy.lock").exists, f"{APP_HOSTS[0]} kept the lock this run took"
    assert still_held == holder, "the run removed the lock of the one that holds it"
    assert edge.get_json("/healthz")[1]["release"] == live


# Nginx lists only app hosts that serve a release (chat_upstream_hosts):
# app3 joins lb's upstreams after its first release passed the gate, in the
# play after the app play, not while its first Gunicorn start is slow.
def spare_instance():
    """The spare app host create.yml made outside the inventory (skips without one)."""
    spare_file = os.path.join(os.environ["MOLECULE_EPHEMERAL_DIRECTORY"], "spare-instance.yml")
    if not os.path.exists(spare_file):
        pytest.skip("SKIPPED: the scenario made no spare app host")
    (spare,) = yaml.safe_load(open(spare_file))
    return spare


def test_a_third_app_host_joins_a_running_cluster_without_a_failed_request(lb, edge):
    """app3 is added to group app and site.yml runs again while clients use the site."""
    spare = spare_instance()
    like = RUNNER.get_variables(APP_HOSTS[0])
    # Beside Molecule's inventory, whose group_vars (and vault) it shares;
    # removed afterwards, as Molecule reads every file of that folder.
    joined = os.path.join(os.path.dirname(INVENTORY), "zz-joined.yml")
    with open(joined, "w") as out:
        # In group app, and in the environment's group, whose settings it takes.
        out.write(yaml.safe_dump({"app": {"hosts": {spare["instance"]: {
            "ansible_host": spare["address"], "ansible_port": spare["port"], "ansible_user": spare["user"],
            "ansible_private_key_file": spare["identity_file"],
            "ansible_ssh_common_args": like["ansible_ssh_common_args"]}}},
            "staging": {"hosts": {spare["instance"]: {}}}}))
    room = new_room("join")
    try:
        with Traffic(edge, room, http_clients=4, sockets=20, senders=2, max_seconds=900) as counts:
            result = run_playbook("site.yml", "-i", joined)
    finally:
        os.remove(joined)
    assert result.returncode == 0, why_failed(result)
    requests = counts.http_ok + len(counts.http_failed)
    report(f"app host {spare['instance']} joined in {result.seconds:.0f} s (site.yml) under load: "
           f"{requests} HTTP requests, {len(counts.http_failed)} failed; "
           f"{len(counts.ws_failed_handshakes)} WebSocket handshakes failed, "
           f"{len(counts.reconnects)} sockets dropped; messages acknowledged {len(counts.acknowledged)}")
    assert counts.http_failed == [], counts.http_failed[:5]
    assert counts.ws_failed_handshakes == [], counts.ws_failed_handshakes[:5]
    assert counts.silent == [], counts.silent[:5]
    deadline = time.monotonic() + 60
    while spare["instance"] not in set(sum(host_names(edge, 6), [])):
        assert time.monotonic() < deadline, f"{spare['instance']} never answered through the web host"
        time.sleep(1)


def test_an_app_host_taken_out_of_the_inventory_leaves_rotation_and_is_stopped_losing_nothing(lb, edge):
    """After the join above: site.yml with the scenario's own inventory (app3 no longer in it),
    then the operator stops app3's servers, all under a room's traffic.

    Nginx lists app3 no more after the rerun; the WebSockets it still holds
    (an old Nginx worker keeps upgraded connections) close when its servers
    stop, and their clients come back through lb to app1 and app2.
    """
    spare = spare_instance()
    app3 = testinfra.get_host(
        f"ssh://{spare['user']}@{spare['address']}:{spare['port']}", sudo=True,
        ssh_identity_file=spare["identity_file"],
        ssh_extra_args=" ".join(SSH_NO_HOST_KEYS))
    if not app3.file("/srv/chat/current").exists:
        pytest.skip("SKIPPED: the spare app host never joined (see the join test)")
    address = private_address(app3)
    assert f"server {address}:" in lb.check_output("nginx -T 2>/dev/null"), "app3 was not in lb's upstreams"
    room = new_room("leave")
    traffic = Traffic(edge, room, http_clients=4, sockets=SOCKETS, senders=SENDERS, path="/",
                      max_seconds=900)
    with traffic as counts:
        result = run_playbook("site.yml")
        assert result.returncode == 0, why_failed(result)
        http, ws = host_names(edge, 12)
        app3.check_output(f"systemctl stop {APP_UNITS}")
        stopped_at = time.monotonic()
        recovery = recovery_after(traffic, edge, room, stopped_at)
    requests = counts.http_ok + len(counts.http_failed)
    report(f"app host {spare['instance']} taken out in {result.seconds:.0f} s (site.yml) under load, "
           f"then its servers stopped: {requests} HTTP requests, {len(counts.http_failed)} failed; "
           f"{len(counts.ws_failed_handshakes)} WebSocket handshakes failed, "
           f"{len(counts.reconnects)} sockets dropped and back")
    assert spare["instance"] not in set(http + ws), (http, ws)
    assert set(http) == set(ws) == set(APP_HOSTS), (http, ws)
    assert f"server {address}:" not in lb.check_output("nginx -T 2>/dev/null")
    assert counts.http_failed == [], counts.http_failed[:5]
    assert counts.ws_failed_handshakes == [], counts.ws_failed_handshakes[:5]
    account("app host removed", on(APP_HOSTS[0]), room, counts, recovery)


def test_a_new_handshake_to_a_foreign_origin_is_still_refused_on_every_host(edge):
    """The control for the checks above: the edge still judges every handshake."""
    with pytest.raises(InvalidStatus):
        edge.websocket("/ws/health/", origin="https://evil.example")

