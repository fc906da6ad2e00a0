"""Prometheus and Alertmanager on the monitoring host, asked as an operator would (curl on that host).

test_85_monitoring checks the monitoring itself; other checks use these to
see that the fault they cause fires its alert.
"""

import json
import re
import shlex

import testinfra.utils.ansible_runner

from clients import INVENTORY, inventory_host, wait

MONITORING = testinfra.utils.ansible_runner.AnsibleRunner(INVENTORY).get_hosts("monitoring")


def monitoring_host():
    """The monitoring host, with where its Prometheus and Alertmanager answer (loopback, or the demo's address)."""
    host = inventory_host(MONITORING[0])
    for server, unit in (("prometheus", "prometheus"), ("alertmanager", "prometheus-alertmanager")):
        address = re.search(r"--web[.]listen-address=([^ \"]+)", host.file(f"/etc/default/{unit}").content_string)
        setattr(host, server, f"http://{address.group(1)}")
    return host


def api(monitor, url):
    return json.loads(monitor.check_output(f"curl -fsS --max-time 10 {shlex.quote(url)}"))


def targets(monitor):
    return api(monitor, f"{monitor.prometheus}/api/v1/targets?state=active")["data"]["activeTargets"]


def query(monitor, expr):
    """The results of a PromQL expression, as Prometheus's API gives them."""
    out = monitor.check_output(f"curl -fsS --max-time 10 {monitor.prometheus}/api/v1/query "
                               f"--data-urlencode {shlex.quote('query=' + expr)}")
    return json.loads(out)["data"]["result"]


def value(monitor, expr):
    """The value of a PromQL expression with one result (None: no result)."""
    result = query(monitor, expr)
    assert len(result) <= 1, result
    return float(result[0]["value"][1]) if result else None


def firing(monitor, alertname, **labels):
    """The alerts named ALERTNAME (with LABELS) that Alertmanager has active, neither silenced nor inhibited."""
    alerts = api(monitor, f"{monitor.alertmanager}/api/v2/alerts?active=true&silenced=false&inhibited=false")
    return [alert for alert in alerts if alert["labels"]["alertname"] == alertname
            and all(alert["labels"].get(name) == wanted for name, wanted in labels.items())]


def wait_firing(monitor, alertname, timeout, *context):
    """Seconds until ALERTNAME is active in Alertmanager. After TIMEOUT the check fails with what
    Prometheus holds of the alert (ALERTS) and of the CONTEXT expressions, so that a failure in
    CI names its cause (a rule that never held, or an alert Alertmanager never got)."""
    def explain():
        rules = [{key: rule.get(key) for key in ("query", "state", "health", "lastError", "lastEvaluation")}
                 for group in api(monitor, f"{monitor.prometheus}/api/v1/rules?type=alert")["data"]["groups"]
                 for rule in group["rules"] if rule["name"] == alertname]
        seen = {expr: [(row["metric"], row["value"][1]) for row in query(monitor, expr)]
                for expr in (f'ALERTS{{alertname="{alertname}"}}', *context)}
        return f"its rule {rules}; Prometheus has {seen}"
    return wait(lambda: firing(monitor, alertname), timeout, f"{alertname} in Alertmanager", explain=explain)[0]


def wait_scraped(monitor, expr, instances, timeout=60):
    """Seconds until Prometheus's latest samples of EXPR come from exactly INSTANCES. A fault
    caused after this is judged against a state Prometheus has seen: it scrapes every 15 s, so
    a primary that moved a moment before may still be a primary in its samples."""
    def seen():
        return {row["metric"]["instance"] for row in query(monitor, expr)}
    return wait(lambda: seen() == set(instances), timeout, f"Prometheus seeing {expr} from {sorted(instances)}",
                interval=1, explain=lambda: f"it sees it from {sorted(seen())}")[0]
