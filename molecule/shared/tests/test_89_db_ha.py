"""PostgreSQL replicated by Patroni: the leader moves, dies or is cut off, and the chat goes on.

Runs once for the inventory where group db has three hosts or more (the
cluster scenario): one leader, a synchronous replica and another replica
streaming from it, etcd on the same hosts agreeing on its members, each
port open to whom needs it only. Then, under a room's traffic (half the
clients reconnecting at once, senders posting, HTTP pollers on the lobby,
which reads the database): a planned switchover (playbooks/switchover.yml)
fails no request and refuses no post; the leader's host killed (`docker
kill`) is replaced by the synchronous replica, posts work again within 30 s
and nothing acknowledged is lost (read from the database); started again,
the old leader rejoins as a replica by itself (pg_rewind) and a rerun of
site.yml changes nothing; the leader cut off from the others by a firewall
stops taking writes, and nothing acknowledged is lost when it heals.
"""

import concurrent.futures
import json
import time

import docker
import pytest
import testinfra.utils.ansible_runner

from clients import (INVENTORY, changed_per_host, edge_of, inventory_host, report, run_playbook, tcp_reachable,
                     wait, why_failed)
from monitoring import MONITORING, monitoring_host, wait_firing, wait_scraped
from patroni import leader, leader_timeline, members, psql
from test_70_faults import account, new_room, recovery_after
from test_88_redis_ha import (address, booted, cut_off, killed_under_traffic, move_primary, playbook_under_traffic,
                              primary_host, room_traffic)

RUNNER = testinfra.utils.ansible_runner.AnsibleRunner(INVENTORY)
DB_HOSTS = RUNNER.get_hosts("db")

pytestmark = pytest.mark.skipif(len(DB_HOSTS) < 3, reason="SKIPPED: one PostgreSQL host or none, no Patroni")

POSTGRES_PORT, ETCD_PORT, ETCD_PEER_PORT, ETCD_METRICS_PORT, PATRONI_PORT = 5432, 2379, 2380, 2381, 8008
# The bound: posts work again within 30 s of the leader's death.
FAILOVER_WITHIN = 30.0

on = inventory_host


@pytest.fixture(scope="module")
def edge():
    return edge_of(on(RUNNER.get_hosts("web")[0]))


def role_of(rows, role):
    return next((name for name, row in rows.items() if row["Role"] == role), None)


def healthy(names):
    """`patronictl list` from NAMES when it shows every one of them running or streaming, with one leader."""
    rows = members(names)
    return rows if (set(rows) == set(names) and role_of(rows, "Leader")
                    and all(row["State"] in ("running", "streaming") for row in rows.values())) else None


def test_one_leader_a_synchronous_replica_and_etcd_agreeing():
    rows = healthy(DB_HOSTS)
    assert rows, members(DB_HOSTS)
    roles = sorted(row["Role"] for row in rows.values())
    assert roles == sorted(["Leader", "Sync Standby"] + ["Replica"] * (len(DB_HOSTS) - 2)), rows
    assert len({row["TL"] for row in rows.values()}) == 1, rows
    head = on(role_of(rows, "Leader"))
    # A commit waits for the synchronous replica (Patroni names it).
    streams = psql(head, "SELECT application_name, state, sync_state FROM pg_stat_replication", "postgres")
    streams = sorted(tuple(line.split("|")) for line in streams.splitlines())
    assert [s[1] for s in streams] == ["streaming"] * (len(DB_HOSTS) - 1), streams
    assert [s[0] for s in streams if s[2] == "sync"] == [role_of(rows, "Sync Standby")], streams
    assert psql(head, "SHOW synchronous_commit", "postgres") == "on"
    # etcd: the inventory's members, every one healthy, one Raft leader.
    for name in DB_HOSTS:
        status = json.loads(on(name).check_output(
            "ETCDCTL_API=3 etcdctl --endpoints=http://127.0.0.1:2379 endpoint status --cluster --write-out=json"))
        assert len(status) == len(DB_HOSTS), status
        assert len({member["Status"]["leader"] for member in status}) == 1, status
    listed = json.loads(on(DB_HOSTS[0]).check_output(
        "ETCDCTL_API=3 etcdctl --endpoints=http://127.0.0.1:2379 member list --write-out=json"))
    assert sorted(member["name"] for member in listed["members"]) == sorted(DB_HOSTS)
    report(f"PostgreSQL: leader {role_of(rows, 'Leader')}, synchronous replica {role_of(rows, 'Sync Standby')}, "
           f"{len(DB_HOSTS) - 2} other replica streaming; etcd: {len(DB_HOSTS)} members, one Raft leader")


def test_each_port_answers_whom_it_serves_only():
    """PostgreSQL to the app hosts and the members; etcd and Patroni to the members; metrics to monitoring."""
    targets = {name: address(name) for name in DB_HOSTS}
    asked = {"web": on(RUNNER.get_hosts("web")[0]), "app": on(RUNNER.get_hosts("app")[0])}
    if MONITORING:
        asked["monitoring"] = on(RUNNER.get_hosts("monitoring")[0])
    ports = (POSTGRES_PORT, ETCD_PORT, ETCD_PEER_PORT, ETCD_METRICS_PORT, PATRONI_PORT)
    seen = {kind: tcp_reachable(host, [(a, port) for a in targets.values() for port in ports])
            for kind, host in asked.items()}
    expected = {"web": set(), "app": {POSTGRES_PORT}, "monitoring": {PATRONI_PORT, ETCD_METRICS_PORT}}
    for kind, reached in seen.items():
        for name, target in targets.items():
            opened = {port for port in ports if reached[(target, port)]}
            assert opened == expected[kind], f"the {kind} host reaches {name} on {sorted(opened)}"
    for name, target in targets.items():
        peer = on(next(other for other in DB_HOSTS if other != name))
        reached = tcp_reachable(peer, [(target, port) for port in ports])
        assert all(reached[(target, port)] for port in (POSTGRES_PORT, ETCD_PORT, ETCD_PEER_PORT, PATRONI_PORT)), \
            f"the other members cannot reach {name}: {reached}"
    # Patroni's orders want its user: a switchover asked without it is refused.
    peer = on(DB_HOSTS[1])
    refused = peer.run("curl -s -o /dev/null -w '%%{http_code}' -X POST -d '{}' http://%s:%s/switchover",
                       address(DB_HOSTS[0]), str(PATRONI_PORT))
    assert refused.stdout == "401", refused.stdout


def test_a_planned_switchover_fails_no_request_and_refuses_no_post(edge):
    rows = healthy(DB_HOSTS)
    before, target = role_of(rows, "Leader"), role_of(rows, "Replica")
    result, counts, recovery, room = playbook_under_traffic(
        edge, "db-switchover", "playbooks/switchover.yml", "-e", f"chat_switchover_db={target}")
    assert leader(DB_HOSTS) == target
    report(f"PostgreSQL switchover {before} -> {target} (a replica that was not the synchronous one): "
           f"playbook {result.seconds:.0f} s")
    account("db switchover", on(RUNNER.get_hosts("app")[0]), room, counts, recovery, expect_drops=0, refused=False)
    assert counts.ws_failed_handshakes == [], counts.ws_failed_handshakes[:5]


def keep_redis_off(victim, secrets):
    """Moves the Redis primary off VICTIM (every db host is a Redis host too), so that what the
    check does to it tests PostgreSQL's failover alone."""
    if primary_host(secrets) == victim:
        move_primary(next(name for name in RUNNER.get_hosts("redis") if name != victim))


def rejoined(victim, timeline):
    """Seconds until VICTIM streams from the leader again, on the leader's timeline."""
    def streaming():
        rows = healthy(DB_HOSTS)
        return rows and rows[victim]["Role"] != "Leader" and rows[victim].get("TL") == timeline and rows
    return wait(streaming, 180, f"{victim} streaming from the new leader again", interval=1,
                explain=lambda: f"patronictl list: {members(DB_HOSTS)}; {victim}'s Patroni and PostgreSQL: "
                                + on(victim).run("journalctl -u 'patroni*' -n 25 --no-pager -o cat; "
                                                 "tail -n 15 /var/log/postgresql/*.log").stdout)


def test_the_leader_host_killed_fails_over_and_comes_back_as_a_replica(edge, secrets):
    rows = healthy(DB_HOSTS)
    victim, synchronous = role_of(rows, "Leader"), role_of(rows, "Sync Standby")
    keep_redis_off(victim, secrets)
    others = [name for name in DB_HOSTS if name != victim]
    if MONITORING:
        # As in test_88's kill check: the member promoted now was a replica in Prometheus's samples.
        wait_scraped(monitoring_host(), "patroni_replica == 1", others)
    room = new_room("db-leader-killed")
    # Recovery: a message posted then is stored and has reached every socket.
    counts, promoted, new_leader, recovery = killed_under_traffic(
        edge, victim, room, lambda: leader(others) in others and leader(others), 60,
        "a new leader among the others")
    report(f"PostgreSQL leader {victim} killed: {new_leader} (the synchronous replica was {synchronous}) led "
           f"{promoted:.1f} s after, posts stored and seen by every socket again {recovery:.1f} s after the kill")
    # Posts made meanwhile were refused (store_failed) and resent by the
    # clients' outboxes; the lobby may fail while there is no leader.
    account("db leader killed", on(RUNNER.get_hosts("app")[0]), room, counts, recovery, expect_drops=0,
            refused=None, http_errors_allowed=True)
    assert new_leader == synchronous, "a replica that was not synchronous was promoted"
    assert recovery <= FAILOVER_WITHIN, f"posts worked again only after {recovery:.1f} s"

    # Back: a replica of the new leader by itself, rewound if it had to be.
    started = time.monotonic()
    wait(lambda: booted(victim), 120, f"{victim} booted", interval=0.5)
    timeline = leader_timeline(on(new_leader))
    back, _ = rejoined(victim, timeline)
    log = on(victim).run("journalctl -q -o cat -u 'patroni@*' --since '-10min'").stdout
    rewound = "pg_rewind" in log
    report(f"PostgreSQL: {victim} started again, streaming from {new_leader} on timeline {timeline} "
           f"{time.monotonic() - started:.0f} s after its start ({back:.0f} s after it booted)"
           f"{', rewound with pg_rewind' if rewound else ''}")
    # Also the rerun after test_88's Redis failover (the same hosts), while
    # the alert's rule waits out its minute.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        running = pool.submit(run_playbook, "site.yml")
        if MONITORING:
            monitor = monitoring_host()
            seconds = wait_firing(monitor, "ChatPostgresFailedOver", 180, "patroni_primary")
            report(f"Alerting: ChatPostgresFailedOver firing in Alertmanager {seconds:.0f} s after the check asked")
        rerun = running.result()
    assert rerun.returncode == 0, why_failed(rerun)
    assert set(changed_per_host(rerun.stdout).values()) == {0}, changed_per_host(rerun.stdout)


def in_recovery(container):
    """pg_is_in_recovery() on the host, asked through docker exec (its network is cut)."""
    result = container.exec_run(["runuser", "-u", "postgres", "--", "psql", "-XAtc", "SELECT pg_is_in_recovery()"])
    return result.output.decode().strip()


def test_the_leader_cut_off_stops_taking_writes_and_loses_nothing(edge, secrets):
    rows = healthy(DB_HOSTS)
    victim = role_of(rows, "Leader")
    keep_redis_off(victim, secrets)
    container = docker.from_env().containers.get(victim)
    others = [name for name in DB_HOSTS if name != victim]
    room = new_room("db-leader-partitioned")
    traffic = room_traffic(edge, room)
    with traffic as counts:
        time.sleep(3)
        with cut_off(container) as cut:
            # The cut-off leader cannot renew its key: it steps down (within
            # retry_timeout) before the others may promote anyone (once the
            # key expires, ttl): never two leaders taking writes.
            demoted, _ = wait(lambda: in_recovery(container) != "f", 60, f"{victim} no longer taking writes",
                              interval=0.5)
            assert leader(others) in (None, victim), "another member led before the cut-off one stepped down"
            promoted, new_leader = wait(lambda: leader(others) in others and leader(others), 60,
                                        "a new leader on the majority's side", interval=0.5)
            promoted += demoted
            recovery = recovery_after(traffic, edge, room, cut)
            time.sleep(3)
        healed = time.monotonic()
        timeline = leader_timeline(on(new_leader))
        back, _ = rejoined(victim, timeline)
    report(f"PostgreSQL leader {victim} cut off: it stopped taking writes {demoted:.1f} s after the cut, "
           f"{new_leader} led {promoted:.1f} s after, posts worked again {recovery:.1f} s after; healed, {victim} "
           f"streaming again (rewound) {time.monotonic() - healed:.0f} s later")
    account("db leader cut off", on(RUNNER.get_hosts("app")[0]), room, counts, recovery, expect_drops=0,
            refused=None, http_errors_allowed=True)
    assert recovery <= FAILOVER_WITHIN, f"posts worked again only after {recovery:.1f} s"
