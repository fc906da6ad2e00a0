"""Prometheus and Alertmanager on the monitoring host, the exporters and the app's metrics.

Runs once for the inventory, where a host is in group monitoring. Every
target is up, named as the inventory names its host: a node exporter on
every host, Nginx's and the edge's (mtail) on web hosts, Redis's and
PostgreSQL's on theirs, Gunicorn and each Daphne instance on app hosts.
The chat's counters move by exactly what a test did; the exporters run
sandboxed, listen on loopback or the private address, and only the
monitoring host reaches them. Where the monitoring host watches other hosts
(the cluster scenario), every Daphne instance of an app host stopped fires
ChatNoDaphneServing in Alertmanager within the rule's `for:` and a few
scrapes, and the alert resolves once they run again. A deploy whose gate
failed within the hour (test_50_deploy, where it ran) fires
ChatDeployRolledBack.
"""

import calendar
import collections
import json
import time
import uuid

import pytest
import testinfra.utils.ansible_runner

from clients import INVENTORY, edge_of, inventory_host, inventory_value, report, tcp_reachable, wait
from monitoring import MONITORING, api, firing, monitoring_host, query, targets, value

RUNNER = testinfra.utils.ansible_runner.AnsibleRunner(INVENTORY)
ALL = RUNNER.get_hosts("all")

pytestmark = pytest.mark.skipif(not MONITORING, reason="SKIPPED: no host in group monitoring")

RULES = ["ChatTargetDown", "ChatNoDaphneServing", "ChatUnitFailed", "ChatDiskFilling", "ChatDiskAlmostFull",
         "ChatServerDown", "ChatEdgeErrors", "ChatFanoutSlow", "ChatHandshakesRefused", "ChatRedisMemoryHigh",
         "ChatBackupTooOld", "ChatDeployRolledBack", "ChatRedisReplicaLinkDown", "ChatRedisPrimaries",
         "ChatRedisFailedOver", "ChatPostgresLeaders", "ChatPostgresNotSynchronous", "ChatPostgresReplicaBehind",
         "ChatPostgresFailedOver"]
EXPORTERS = {"node": "prometheus-node-exporter", "nginx": "prometheus-nginx-exporter", "edge": "mtail",
             "redis": "prometheus-redis-exporter", "postgres": "prometheus-postgres-exporter"}


@pytest.fixture(scope="module")
def monitor():
    return monitoring_host()


def in_group(group):
    return RUNNER.get_hosts(group)


def test_every_target_is_up_and_named_after_its_host(monitor):
    def all_up():
        current = targets(monitor)
        return current if current and all(t["health"] == "up" for t in current) else None

    seconds, up = wait(all_up, 90, "every target up")
    by_job = {}
    for target in up:
        by_job.setdefault(target["labels"]["job"], set()).add(target["labels"]["instance"])
    assert by_job["node"] == set(ALL), by_job
    assert by_job["nginx"] == by_job["edge"] == by_job["site"] == set(in_group("web")), by_job
    assert by_job["redis"] == set(in_group("redis")), by_job
    assert by_job.get("postgres", set()) == set(in_group("db")), by_job
    # Patroni's and etcd's own metrics, on each member of a replicated PostgreSQL.
    replicated = set(in_group("db")) if len(in_group("db")) > 1 else set()
    assert by_job.get("patroni", set()) == by_job.get("etcd", set()) == replicated, by_job
    # The app's own: Gunicorn once per app host, Daphne once per instance.
    assert {name.split("/")[0] for name in by_job.get("daphne", set()) | by_job.get("gunicorn", set())} \
        == set(in_group("app")), by_job
    assert by_job["prometheus"] and by_job["alertmanager"]
    report(f"Prometheus: {len(up)} targets up within {seconds:.0f} s of the check: "
           + ", ".join(f"{job} {len(names)}" for job, names in sorted(by_job.items())))
    # What the monitoring costs on this layout (the README's figures).
    series = value(monitor, "prometheus_tsdb_head_series")
    samples = value(monitor, "sum(rate(prometheus_tsdb_head_samples_appended_total[2m]))")
    resident = {job: value(monitor, f'sum(process_resident_memory_bytes{{job="{job}"}})') / 2**20
                for job in ("prometheus", "alertmanager")}
    report(f"Prometheus's cost: {series:.0f} series, {samples:.0f} samples/s, "
           f"resident Prometheus {resident['prometheus']:.0f} MiB, Alertmanager {resident['alertmanager']:.0f} MiB")


def test_the_app_metrics_count_exactly_what_a_client_did(monitor):
    edge = edge_of(inventory_host(in_group("web")[0]))
    room = f"metrics-{uuid.uuid4().hex[:8]}"

    def settled(expr, expected):
        return lambda: value(monitor, expr) == expected or None

    # The baselines from scrapes after this moment: Prometheus lags the servers by up to a
    # scrape, and earlier checks' posts must be in them (one host's clock: the containers').
    asked = time.time()
    wait(lambda: (value(monitor, "min(timestamp(chat_messages_posted_total))") or 0) > asked, 60, "a fresh scrape")
    posted = value(monitor, "sum(chat_messages_posted_total)") or 0
    stored = value(monitor, "sum(chat_messages_stored_total)") or 0
    sockets = value(monitor, "sum(chat_websockets_open)") or 0
    count, members = 12, 3
    opened = [edge.websocket(f"/ws/chat/{room}/") for _ in range(members)]
    try:
        for ws in opened:
            edge.receive(ws)  # the join history
        wait(settled("sum(chat_websockets_open)", sockets + members), 60, f"the socket gauge at +{members}")
        sender = opened[0]
        for n in range(count):
            sender.send(json.dumps({"type": "message", "nickname": "metrics", "body": f"m{n}",
                                    "client_id": uuid.uuid4().hex}))
            time.sleep(0.15)  # under the page's rate limit
        got = 0
        while got < count:
            frame = edge.receive(opened[-1])
            got += len(frame.get("messages", [frame])) if frame["type"] in ("message", "batch") else 0
    finally:
        for ws in opened:
            ws.close()
    seconds, _ = wait(settled("sum(chat_messages_posted_total)", posted + count), 60, f"posted +{count}")
    assert value(monitor, "sum(chat_messages_stored_total)") == stored + count
    wait(settled("sum(chat_websockets_open)", sockets), 60, "the socket gauge back")
    assert value(monitor, "count(chat_release_info)") >= 1
    assert value(monitor, "sum(chat_fanout_delivery_seconds_count)") > 0
    report(f"Metrics: {count} posts and {members} sockets seen exactly by Prometheus within {seconds:.0f} s")


def test_the_chat_rules_are_loaded(monitor):
    groups = api(monitor, f"{monitor.prometheus}/api/v1/rules")["data"]["groups"]
    loaded = {rule["name"] for group in groups for rule in group["rules"]}
    assert set(RULES) <= loaded, loaded
    assert all(rule["health"] == "ok" for group in groups for rule in group["rules"])


def test_the_site_is_probed_as_a_browser_would(monitor):
    """Through each web host's https: /healthz answers, and the certificate's expiry is the one it serves."""
    name = inventory_value(in_group("web")[0], "chat_server_name")
    for web in in_group("web"):
        wait(lambda: value(monitor, f'probe_success{{job="site", instance="{web}"}}') == 1, 60, f"{web} probed")
        expiry = value(monitor, f'probe_ssl_earliest_cert_expiry{{job="site", instance="{web}"}}')
        served = inventory_host(web).check_output(
            f"echo | openssl s_client -connect 127.0.0.1:443 -servername {name} 2>/dev/null "
            "| openssl x509 -noout -enddate -dateopt iso_8601 | cut -d= -f2")
        assert expiry == calendar.timegm(time.strptime(served.strip(), "%Y-%m-%d %H:%M:%SZ")), (web, expiry, served)
        report(f"Site probe: {web} answers; its certificate expires {served.strip()}")


def test_the_chat_console_renders_with_the_live_release(monitor):
    page = monitor.check_output(f"curl -fsS --max-time 10 {monitor.prometheus}/consoles/chat.html")
    assert "Open WebSockets" in page and "PromConsole.Graph" in page
    releases = {r["metric"]["release"] for r in query(monitor, "count by (release) (chat_release_info)")}
    assert releases and all(f"<code>{release}</code>" in page for release in releases), releases
    # The scripts it draws with are served (Debian's Rickshaw).
    monitor.check_output(f"curl -fsS --max-time 10 -o /dev/null {monitor.prometheus}/classic/static/rickshaw/rickshaw.min.js")


def listening(host, port):
    return {line.split()[3].rsplit(":", 1)[0] for line in host.check_output(f"ss -Hltn 'sport = :{port}'").splitlines()}


def test_the_servers_and_the_exporters_listen_where_they_are_scraped_only(monitor):
    """Each on one address: loopback, or the private one (the demo's Prometheus, every exporter
    of another host), never all; the firewall lets only the monitoring host reach an exporter."""
    assert "9094" not in monitor.check_output("ss -Hltn")  # Alertmanager's cluster port stays closed
    remote = collections.defaultdict(set)  # {another host of the inventory: exporters it must not reach}
    for target in targets(monitor):
        address, port = target["scrapeUrl"].split("/")[2].rsplit(":", 1)
        # Prometheus, Alertmanager and the blackbox exporter run on the monitoring host.
        own = target["labels"]["job"] in ("prometheus", "alertmanager", "site")
        name = MONITORING[0] if own else target["labels"]["instance"].split("/")[0]
        # Exactly the address Prometheus scrapes: loopback, or the private one.
        assert listening(inventory_host(name), port) == {address}, (target["labels"], address)
        if address != "127.0.0.1" and not own:
            remote[MONITORING[0]].add((address, port))
            remote[next(host for host in ALL if host not in MONITORING and host != name)].add((address, port))
    # Probed all at once from each host: a dropped probe takes its whole timeout.
    for name, probes in remote.items():
        reached = tcp_reachable(inventory_host(name), probes)
        if name in MONITORING:
            assert all(reached.values()), {target: ok for target, ok in reached.items() if not ok}
        else:
            # Any other host of the inventory is dropped by the firewall.
            assert not any(reached.values()), (name, [target for target, ok in reached.items() if ok])


def test_every_exporter_runs_sandboxed():
    for name in ALL:
        host = inventory_host(name)
        units = host.check_output("systemctl list-units --type=service --state=running --plain --no-legend "
                                  "'prometheus-*-exporter.service' mtail.service | awk '{print $1}'").split()
        assert "prometheus-node-exporter.service" in units, (name, units)
        for unit in units:
            shown = dict(line.split("=", 1) for line in host.check_output(
                f"systemctl show -p User,NoNewPrivileges,ProtectSystem,CapabilityBoundingSet,PrivateDevices {unit}")
                .splitlines())
            assert shown["User"] in ("prometheus", "mtail"), (name, unit, shown)
            assert shown["NoNewPrivileges"] == "yes" and shown["ProtectSystem"] == "strict", (name, unit, shown)
            assert shown["CapabilityBoundingSet"] == "" and shown["PrivateDevices"] == "yes", (name, unit, shown)


@pytest.mark.skipif(len(ALL) < 2, reason="SKIPPED: the monitoring host watches only itself here")
def test_every_daphne_instance_stopped_fires_an_alert_that_resolves(monitor):
    name = RUNNER.get_hosts("app")[0]
    app = inventory_host(name)
    # The sockets too: a connection to a socket would start its service again.
    units = app.check_output("systemctl list-units --plain --no-legend 'chat-daphne@*' | awk '{print $1}'").split()
    app.run_expect([0], f"systemctl stop {' '.join(units)}")
    try:
        # for: 1m, plus a scrape (15 s), an evaluation (15 s) and Alertmanager's group_wait (10 s).
        fired, _ = wait(lambda: [a for a in firing(monitor, "ChatNoDaphneServing") if a["labels"]["instance"] == name],
                        180, f"ChatNoDaphneServing for {name} in Alertmanager")
    finally:
        app.run_expect([0], f"systemctl start {' '.join(units)}")
    resolved, _ = wait(lambda: not firing(monitor, "ChatNoDaphneServing"), 180, "ChatNoDaphneServing resolved")
    # The log receiver got both notifications (the resolved one within Alertmanager's group_interval).
    journal = (f"journalctl -u chat-alert-log --no-pager -o cat | grep -F ' ChatNoDaphneServing ' "
               f"| grep -F ' instance={name} '")
    wait(lambda: "RESOLVED" in monitor.run(journal).stdout, 120, "the resolved notification in chat-alert-log")
    assert "FIRING" in monitor.run(journal).stdout
    report(f"Alerting: every Daphne instance of {name} stopped, ChatNoDaphneServing firing in Alertmanager "
           f"{fired:.0f} s after (the rule's for: 1m), resolved {resolved:.0f} s after they started again")


def test_a_failed_gate_fires_the_rollback_alert(monitor):
    """Where test_50_deploy ran, its release that failed the gate was counted and alerts for an hour."""
    app = inventory_host(RUNNER.get_hosts("app")[0])
    log = app.check_output("cat /srv/chat/deploy.log")
    if " gate_failed " not in log:
        pytest.skip("SKIPPED: no deploy failed its gate here (test_50_deploy runs on one Debian release)")
    assert 'chat_deploys_total{action="gate_failed"} 1' in app.check_output(
        "cat /var/lib/prometheus/node-exporter/chat-deploys.prom")
    seconds, _ = wait(lambda: firing(monitor, "ChatDeployRolledBack"), 90, "ChatDeployRolledBack in Alertmanager")
    report(f"Alerting: the deploy that failed its gate is counted; ChatDeployRolledBack firing ({seconds:.0f} s)")
