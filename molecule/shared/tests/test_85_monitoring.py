"""Prometheus and Alertmanager on the monitoring host, a node exporter on every host.

Runs once for the inventory, where a host is in group monitoring. Every
target is up, named as the inventory names its host; the chat's rules are
loaded; the servers listen on loopback and the exporters on loopback or the
private address only. Where the monitoring host watches other hosts (the
cluster scenario), an exporter stopped on one of them fires ChatTargetDown
in Alertmanager within the rule's `for:` and a few scrapes, and the alert
resolves once it runs again.
"""

import json
import time

import pytest
import testinfra.utils.ansible_runner

from clients import INVENTORY, inventory_host, report

RUNNER = testinfra.utils.ansible_runner.AnsibleRunner(INVENTORY)
MONITORING = RUNNER.get_hosts("monitoring")
ALL = RUNNER.get_hosts("all")

pytestmark = pytest.mark.skipif(not MONITORING, reason="SKIPPED: no host in group monitoring")

RULES = ["ChatTargetDown", "ChatNoDaphneServing", "ChatUnitFailed", "ChatDiskFilling", "ChatDiskAlmostFull"]


@pytest.fixture(scope="module")
def monitor():
    return inventory_host(MONITORING[0])


def api(monitor, url):
    return json.loads(monitor.check_output(f"curl -fsS --max-time 10 '{url}'"))


def targets(monitor):
    return api(monitor, "http://127.0.0.1:9090/api/v1/targets?state=active")["data"]["activeTargets"]


def firing(monitor, alertname):
    alerts = api(monitor, "http://127.0.0.1:9093/api/v2/alerts?active=true&silenced=false&inhibited=false")
    return [alert for alert in alerts if alert["labels"]["alertname"] == alertname]


def wait(condition, timeout, what):
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        value = condition()
        if value:
            return time.monotonic() - started, value
        time.sleep(3)
    pytest.fail(f"{what}: not within {timeout} s")


def test_every_target_is_up_and_named_after_its_host(monitor):
    def all_up():
        current = targets(monitor)
        return current if current and all(t["health"] == "up" for t in current) else None

    seconds, up = wait(all_up, 90, "every target up")
    nodes = {t["labels"]["instance"] for t in up if t["labels"]["job"] == "node"}
    assert nodes == set(ALL), nodes
    assert {t["labels"]["job"] for t in up} == {"prometheus", "alertmanager", "node"}
    report(f"Prometheus: {len(up)} targets up ({len(nodes)} node exporters) within {seconds:.0f} s of the check")


def test_the_chat_rules_are_loaded(monitor):
    groups = api(monitor, "http://127.0.0.1:9090/api/v1/rules")["data"]["groups"]
    loaded = {rule["name"] for group in groups for rule in group["rules"]}
    assert set(RULES) <= loaded, loaded
    assert all(rule["health"] == "ok" for group in groups for rule in group["rules"])


def listening(host, port):
    return {line.split()[3].rsplit(":", 1)[0] for line in host.check_output(f"ss -Hltn 'sport = :{port}'").splitlines()}


def test_the_servers_listen_on_loopback_and_the_exporters_privately(monitor):
    assert listening(monitor, 9090) == {"127.0.0.1"}
    assert listening(monitor, 9093) == {"127.0.0.1"}
    assert "9094" not in monitor.check_output("ss -Hltn")  # Alertmanager's cluster port stays closed
    for name in ALL:
        host = inventory_host(name)
        addresses = listening(host, 9100)
        assert len(addresses) == 1 and "0.0.0.0" not in addresses and "*" not in addresses, (name, addresses)


@pytest.mark.skipif(len(ALL) < 2, reason="SKIPPED: the monitoring host watches only itself here")
def test_an_exporter_that_stops_fires_an_alert_that_resolves(monitor):
    watched = inventory_host(next(name for name in ALL if name not in MONITORING))
    name = watched.backend.get_hostname()
    watched.run_expect([0], "systemctl stop prometheus-node-exporter")
    try:
        # for: 2m, plus a scrape (15 s), an evaluation (15 s) and Alertmanager's group_wait (10 s).
        fired, _ = wait(lambda: [a for a in firing(monitor, "ChatTargetDown") if a["labels"]["instance"] == name],
                        240, f"ChatTargetDown for {name} in Alertmanager")
    finally:
        watched.run_expect([0], "systemctl start prometheus-node-exporter")
    resolved, _ = wait(lambda: not [a for a in firing(monitor, "ChatTargetDown") if a["labels"]["instance"] == name],
                       180, f"ChatTargetDown for {name} resolved")
    report(f"Alerting: {name}'s exporter stopped, ChatTargetDown firing in Alertmanager {fired:.0f} s after "
           f"(the rule's for: 2m), resolved {resolved:.0f} s after the exporter started again")
