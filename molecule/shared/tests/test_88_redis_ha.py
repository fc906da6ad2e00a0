"""Redis replicated and watched by Sentinel: the primary moves, or dies, and the chat goes on.

Runs once for the inventory where group redis has three hosts or more (the
cluster scenario): one primary, the others its replicas, a sentinel on each
that agrees with the others; each login may do what it needs only; the
sentinels are closed to the web host. Then, under a room's traffic (half the
clients reconnecting at once): a planned switchover (playbooks/switchover.yml)
fails no request and refuses no post; the primary's host killed (`docker
kill`, no clean stop) is replaced by a replica within 10 s with no socket
dropped and nothing acknowledged lost; started again, it comes back as a
replica by itself, and a rerun of site.yml changes nothing; the primary cut
off from the network (nftables) stops taking writes, a replica takes over
with no socket dropped and nothing lost, and healed it is a replica again.
"""

import contextlib
import time

import docker
import pytest
import testinfra.utils.ansible_runner

from clients import (INVENTORY, changed_per_host, edge_of, inventory_host, report, run_playbook, tcp_open, wait,
                     why_failed)
from monitoring import MONITORING, monitoring_host, wait_firing, wait_scraped
from patroni import members
from test_70_faults import SENDERS, SOCKETS, account, new_room, recovery_after
from traffic import Traffic

RUNNER = testinfra.utils.ansible_runner.AnsibleRunner(INVENTORY)
REDIS_HOSTS = RUNNER.get_hosts("redis")

pytestmark = pytest.mark.skipif(len(REDIS_HOSTS) < 3, reason="SKIPPED: one Redis host, no Sentinel")

MASTER = "chat"
SENTINEL_PORT, REDIS_PORT = 26379, 6379
# The bound: new messages flow again within 10 s of the primary's death.
FAILOVER_WITHIN = 10.0
# A cut-off primary is bound by what the issue asks of a partition (no split
# brain, nothing acknowledged lost), not by the kill's 10 s: its figure is
# reported (7.8-9.3 s measured), and this looser bound keeps a slower machine
# from failing a check on a figure that is not its point.
PARTITION_WITHIN = 20.0

on = inventory_host


@pytest.fixture(scope="module")
def edge():
    return edge_of(on(RUNNER.get_hosts("web")[0]))


def address(name):
    """A host's private address: its only interface's (the scenario's network)."""
    return on(name).check_output("hostname -I").split()[0]


def cli(host, password, port, *command, user="admin"):
    """redis-cli on HOST as USER (the password through REDISCLI_AUTH), its answer's lines."""
    arguments = " ".join(["%s"] * len(command))
    result = host.run(f"REDISCLI_AUTH=%s redis-cli --user %s --no-auth-warning -p %s {arguments}",
                      password, user, str(port), *command)
    return result.stdout.splitlines()


def roles(secrets):
    return {name: cli(on(name), secrets["admin"], REDIS_PORT, "ROLE") for name in REDIS_HOSTS}


def primaries(secrets, names=REDIS_HOSTS):
    """What each sentinel says the primary is."""
    return {name: cli(on(name), secrets["admin"], SENTINEL_PORT, "SENTINEL", "GET-MASTER-ADDR-BY-NAME",
                      MASTER)[:1] for name in names}


def agreed_primary(secrets, names=REDIS_HOSTS):
    """The primary's address if every sentinel of NAMES names the same one, else None."""
    said = {tuple(answer) for answer in primaries(secrets, names).values()}
    return said.pop()[0] if len(said) == 1 and () not in said else None


def primary_host(secrets):
    addresses = {address(name): name for name in REDIS_HOSTS}
    primary = agreed_primary(secrets)
    assert primary in addresses, primaries(secrets)
    return addresses[primary]


def commits_wait_for(name):
    """Whether PostgreSQL's commits need NAME: the only db host, Patroni's leader or its synchronous
    replica. Killing it would test PostgreSQL's failover too, not Redis's alone."""
    databases = RUNNER.get_hosts("db")
    if name not in databases:
        return False
    return len(databases) == 1 or members(databases).get(name, {}).get("Role") in ("Leader", "Sync Standby")


def move_primary(target):
    """The Redis primary moved to TARGET by playbooks/switchover.yml, outside a check's traffic."""
    moved = run_playbook("playbooks/switchover.yml", "-e", f"chat_switchover_redis={target}")
    assert moved.returncode == 0, why_failed(moved)


def primary_off_the_database(secrets):
    """Moves the Redis primary to a host PostgreSQL's commits do not wait for, if it is on one
    that they do: what a check does to it then tests Redis's failover alone."""
    if commits_wait_for(primary_host(secrets)):
        move_primary(next(name for name in REDIS_HOSTS if not commits_wait_for(name)))
    return primary_host(secrets)


def booted(name):
    """Whether the host answers over SSH and systemd has started what it starts at boot."""
    try:
        return on(name).run("systemctl is-system-running --wait").rc in (0, 1)
    except Exception:  # noqa: BLE001 - sshd not up yet: Ansible reports the host unreachable
        return False


def test_one_primary_its_replicas_and_sentinels_that_agree(secrets):
    current = roles(secrets)
    masters = [name for name, role in current.items() if role[:1] == ["master"]]
    assert len(masters) == 1, current
    primary = address(masters[0])
    for name, role in current.items():
        if name != masters[0]:
            assert role[:2] == ["slave", primary] and role[3] == "connected", (name, role)
    assert set(map(tuple, primaries(secrets).values())) == {(primary,)}
    for name in REDIS_HOSTS:
        host = on(name)
        quorum = cli(host, secrets["admin"], SENTINEL_PORT, "SENTINEL", "CKQUORUM", MASTER)
        assert quorum[0].startswith(f"OK {len(REDIS_HOSTS)} usable Sentinels"), (name, quorum)
        lines = cli(host, secrets["admin"], SENTINEL_PORT, "SENTINEL", "MASTER", MASTER)
        settings = dict(zip(lines[::2], lines[1::2]))
        assert settings["num-slaves"] == str(len(REDIS_HOSTS) - 1), (name, settings)
        assert settings["num-other-sentinels"] == str(len(REDIS_HOSTS) - 1), (name, settings)
        assert settings["quorum"] == str(len(REDIS_HOSTS) // 2 + 1), (name, settings)
    report(f"Redis: primary {masters[0]}, {len(REDIS_HOSTS) - 1} replicas connected, "
           f"{len(REDIS_HOSTS)} sentinels agreeing (quorum {len(REDIS_HOSTS) // 2 + 1})")


# A client on a host without redis-cli (the app hosts): python3 and a
# socket. argv: address port user password command...; an empty user sends
# no AUTH. Prints each answer on a line (RESP, its line ends as spaces).
RESP = """
import socket, sys
address, port, user, password, *command = sys.argv[1:]
sock = socket.create_connection((address, int(port)), timeout=5)
def ask(*words):
    sock.sendall(("*%d\\r\\n" % len(words) + "".join("$%d\\r\\n%s\\r\\n" % (len(w), w) for w in words)).encode())
    print(sock.recv(4096).decode().replace("\\r\\n", " ").strip())
if user:
    ask("AUTH", user, password)
ask(*command)
"""


def ask_from(host, target, port, user, password, *command):
    return host.check_output("python3 -c %s %s %s %s %s " + " ".join(["%s"] * len(command)),
                             RESP, target, str(port), user, password, *command).splitlines()


def test_each_login_does_what_it_needs_only(secrets):
    """From an app host, as the app logs in: it finds the primary, and can do nothing else on a sentinel."""
    app = on(RUNNER.get_hosts("app")[0])
    sentinel = address(REDIS_HOSTS[0])
    found = ask_from(app, sentinel, SENTINEL_PORT, "chat", secrets["app"], "SENTINEL", "GET-MASTER-ADDR-BY-NAME",
                     MASTER)
    assert found == ["+OK", f"*2 ${len(address(primary_host(secrets)))} {address(primary_host(secrets))} $4 6379"], found
    refused = ask_from(app, sentinel, SENTINEL_PORT, "chat", secrets["app"], "SENTINEL", "FAILOVER", MASTER)
    assert refused[0] == "+OK" and refused[1].startswith("-NOPERM"), refused
    anonymous = ask_from(app, sentinel, SENTINEL_PORT, "", "", "PING")
    assert anonymous[0].startswith("-NOAUTH"), anonymous
    # The replication user reads no key.
    replica = cli(on(REDIS_HOSTS[0]), secrets["admin"], REDIS_PORT, "ACL", "DRYRUN", "replica", "GET", "asgi:x")
    assert "no permissions" in replica[0], replica


def test_the_sentinels_are_closed_to_the_web_host():
    """The app hosts and the other Redis hosts reach every sentinel; the web host reaches no Redis port."""
    lb = on(RUNNER.get_hosts("web")[0])
    app = on(RUNNER.get_hosts("app")[0])
    for name in REDIS_HOSTS:
        target = address(name)
        peer = on(next(other for other in REDIS_HOSTS if other != name))
        assert tcp_open(app, target, SENTINEL_PORT), f"the app host cannot reach the sentinel on {name}"
        assert tcp_open(peer, target, SENTINEL_PORT), f"the other Redis hosts cannot reach the sentinel on {name}"
        assert tcp_open(peer, target, REDIS_PORT), f"the other Redis hosts cannot reach Redis on {name}"
        for port in (SENTINEL_PORT, REDIS_PORT):
            assert not tcp_open(lb, target, port), f"the web host reaches {name}:{port}"


def room_traffic(edge, room):
    # Half the clients reconnect at once after a close, as harsh clients do;
    # the pollers ask for the lobby, which reads the database.
    return Traffic(edge, room, http_clients=2, sockets=SOCKETS, senders=SENDERS, path="/",
                   max_seconds=300, at_once=0.5)


def playbook_under_traffic(edge, slug, playbook, *args):
    """PLAYBOOK (with ARGS) run under a room's traffic (room_traffic). Returns the run, the traffic's
    counts, the seconds from the run's end until a message posted then reached every socket, and
    the room."""
    room = new_room(slug)
    traffic = room_traffic(edge, room)
    with traffic as counts:
        time.sleep(3)
        result = run_playbook(playbook, *args)
        assert result.returncode == 0, why_failed(result)
        recovery = recovery_after(traffic, edge, room, time.monotonic())
        time.sleep(3)
    return result, counts, recovery, room


def killed_under_traffic(edge, victim, room, promoted, timeout, what):
    """VICTIM's host killed (`docker kill`, no clean stop) under a room's traffic, and started
    again afterwards. Returns the traffic's counts, the seconds until PROMOTED() answered (WHAT,
    within TIMEOUT) and its answer, and the seconds from the kill until a message posted then had
    reached every socket."""
    container = docker.from_env().containers.get(victim)
    traffic = room_traffic(edge, room)
    try:
        with traffic as counts:
            time.sleep(3)
            container.kill()
            killed = time.monotonic()
            seconds, answer = wait(promoted, timeout, what, interval=0.5)
            recovery = recovery_after(traffic, edge, room, killed)
            time.sleep(3)
    finally:
        container.reload()
        if container.status != "running":
            container.start()
    return counts, seconds, answer, recovery


# Drops everything to and from the scenario's network on the host, both
# ways, loopback and the engine's own exec aside (a check reaches the host
# through `docker exec` meanwhile, not SSH).
PARTITION = ("nft add table inet chat-partition && "
             "nft add chain inet chat-partition in '{ type filter hook input priority -10; policy drop; }' && "
             "nft add rule inet chat-partition in iif lo accept && "
             "nft add chain inet chat-partition out '{ type filter hook output priority -10; policy drop; }' && "
             "nft add rule inet chat-partition out oif lo accept")
HEAL = "nft delete table inet chat-partition"


@contextlib.contextmanager
def cut_off(container):
    """The host of CONTAINER cut off from the others (nftables) until the block ends."""
    assert container.exec_run(["sh", "-c", PARTITION]).exit_code == 0
    try:
        yield time.monotonic()
    finally:
        container.exec_run(["sh", "-c", HEAL])


def test_a_planned_switchover_fails_no_request_and_refuses_no_post(secrets, edge):
    before = primary_host(secrets)
    # Where the kill check below wants the primary, when it can be elsewhere.
    target = sorted((name for name in REDIS_HOSTS if name != before), key=commits_wait_for)[0]
    result, counts, recovery, room = playbook_under_traffic(
        edge, "redis-switchover", "playbooks/switchover.yml", "-e", f"chat_switchover_redis={target}")
    assert primary_host(secrets) == target
    report(f"Redis switchover {before} -> {target}: playbook {result.seconds:.0f} s")
    account("redis switchover", on(RUNNER.get_hosts("app")[0]), room, counts, recovery, expect_drops=0,
            refused=False)
    assert counts.ws_failed_handshakes == [], counts.ws_failed_handshakes[:5]


def test_the_primary_host_killed_fails_over_and_comes_back_as_a_replica(secrets, edge):
    victim = primary_off_the_database(secrets)
    victim_address = address(victim)
    others = [name for name in REDIS_HOSTS if name != victim]
    if MONITORING:
        # The alert names a primary that was a replica in Prometheus's samples:
        # the one promoted now must have been scraped as one since it was last
        # a primary (primary_off_the_database may have moved it a moment ago).
        wait_scraped(monitoring_host(), 'redis_instance_info{role="slave"}', others)
    room = new_room("redis-primary-killed")
    # Recovery: the channel layer has a primary again.
    counts, promoted, _, recovery = killed_under_traffic(
        edge, victim, room, lambda: agreed_primary(secrets, others) not in (None, victim_address), 30,
        "the other sentinels agreeing on a new primary")
    report(f"Redis primary {victim} killed: the other sentinels named a new primary {promoted:.1f} s after, "
           f"messages reached every socket again {recovery:.1f} s after the kill")
    account("redis primary killed", on(RUNNER.get_hosts("app")[0]), room, counts, recovery, expect_drops=0,
            refused=None)
    assert recovery <= FAILOVER_WITHIN, f"messages flowed again only after {recovery:.1f} s"

    # Back: the same address, and a replica of the new primary by itself.
    wait(lambda: booted(victim), 120, f"{victim} booted", interval=0.5)
    assert address(victim) == victim_address, "the restarted host got another address on the scenario's network"
    back = replica_again(secrets, victim)
    report(f"Redis: {victim} started again, a replica of the new primary {back:.0f} s later")
    if MONITORING:
        # The operator is told: the primary moved (the alert lasts 10 minutes).
        monitor = monitoring_host()
        # for: 1m, a scrape, an evaluation and group_wait after the promotion.
        seconds = wait_firing(monitor, "ChatRedisFailedOver", 180, "redis_instance_info")
        report(f"Alerting: ChatRedisFailedOver firing in Alertmanager {seconds:.0f} s after the check asked")
    # With Patroni on the same hosts, test_89's kill check ends with the
    # same rerun, after both failovers: one rerun (a minute) for the two.
    if len(RUNNER.get_hosts("db")) < 3:
        rerun = run_playbook("site.yml")
        assert rerun.returncode == 0, why_failed(rerun)
        assert set(changed_per_host(rerun.stdout).values()) == {0}, changed_per_host(rerun.stdout)


def replica_again(secrets, name):
    """Seconds until every sentinel names one primary, not NAME, and NAME is its replica.

    Right after a cut is healed, NAME's own sentinel may still name NAME: it
    learns the new primary from the others' hello messages (every 2 s), as
    CI saw once ({data1: .6, data2: .6, data3: .7}, data3 just healed).
    """
    own = address(name)

    def rejoined():
        primary = agreed_primary(secrets)
        return primary not in (None, own) \
            and cli(on(name), secrets["admin"], REDIS_PORT, "ROLE")[:2] == ["slave", primary]
    back, _ = wait(rejoined, 120, f"{name} a replica of the primary every sentinel names", interval=0.5,
                   explain=lambda: {"sentinels": primaries(secrets), "roles": roles(secrets)})
    return back


def write_on(container, secrets):
    """A write on the host's own Redis, asked through docker exec (its network may be cut): its
    answer, "OK" or the error."""
    result = container.exec_run(
        ["redis-cli", "--user", "admin", "--no-auth-warning", "-p", str(REDIS_PORT),
         "SET", "chat:partition-probe", "1", "EX", "60"], environment={"REDISCLI_AUTH": secrets["admin"]})
    return result.output.decode().strip()


def test_the_primary_cut_off_stops_taking_writes_and_a_replica_takes_over(secrets, edge):
    victim = primary_off_the_database(secrets)
    victim_address = address(victim)
    container = docker.from_env().containers.get(victim)
    others = [name for name in REDIS_HOSTS if name != victim]
    # How long a primary waits for a silent replica before it refuses writes.
    lag = int(cli(on(victim), secrets["admin"], REDIS_PORT, "CONFIG", "GET", "min-replicas-max-lag")[1])
    # Right after a switchover, its replicas may still be syncing.
    wait(lambda: write_on(container, secrets) == "OK", 60, f"{victim} taking writes before the cut", interval=0.5)
    room = new_room("redis-primary-partitioned")
    traffic = room_traffic(edge, room)
    with traffic as counts:
        time.sleep(3)
        with cut_off(container) as cut:
            # The others promote a replica; the cut-off one, hearing from no
            # replica, refuses writes that its demotion would throw away.
            promoted, _ = wait(lambda: agreed_primary(secrets, others) not in (None, victim_address), 30,
                               "the other sentinels agreeing on a new primary", interval=0.5)
            recovery = recovery_after(traffic, edge, room, cut)
            asked = time.monotonic() - cut
            _, answer = wait(lambda: (said := write_on(container, secrets)) != "OK" and said,
                             lag + 15, f"{victim} refusing writes", interval=0.5)
            refused = time.monotonic() - cut
        back = replica_again(secrets, victim)
        time.sleep(3)
    report(f"Redis primary {victim} cut off: the others named a new primary {promoted:.1f} s after the cut, "
           f"messages reached every socket again {recovery:.1f} s after; {victim} refused writes "
           f"({answer.split()[0]}) by {refused:.1f} s after the cut (asked from {asked:.1f} s, "
           f"min-replicas-max-lag {lag} s); healed, a replica again {back:.0f} s later")
    assert answer.startswith("NOREPLICAS"), answer
    account("redis primary cut off", on(RUNNER.get_hosts("app")[0]), room, counts, recovery, expect_drops=0,
            refused=None)
    assert recovery <= PARTITION_WITHIN, f"messages flowed again only after {recovery:.1f} s"
