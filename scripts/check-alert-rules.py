#!/usr/bin/env python3
"""Every alert of the Prometheus rules has what an operator needs when it fires.

For each alert in roles/prometheus/files/*.rules.yml: the annotations
summary, description and runbook_url; a runbook_url that points at a
section of README.md that exists; and a unit test in tests/prometheus/
where it fires (promtool test rules runs them). Prints each fault and
exits 1 if there is one.
"""

import pathlib
import re
import sys

import yaml

REPO = pathlib.Path(__file__).resolve().parent.parent


def slug(heading):
    """The anchor GitHub gives a heading."""
    return re.sub(r"[^a-z0-9 _-]", "", heading.strip().lower()).replace(" ", "-")


def main():
    anchors = {slug(line.lstrip("#")) for line in (REPO / "README.md").read_text().splitlines()
               if line.startswith("#")}
    fired = set()
    for test in (REPO / "tests" / "prometheus").glob("*.test.yml"):
        for case in yaml.safe_load(test.read_text())["tests"]:
            for check in case.get("alert_rule_test", []):
                if check.get("exp_alerts"):
                    fired.add(check["alertname"])
    faults = []
    alerts = 0
    for path in sorted((REPO / "roles" / "prometheus" / "files").glob("*.rules.yml")):
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                if "alert" not in rule:
                    continue
                alerts += 1
                name, annotations = rule["alert"], rule.get("annotations", {})
                for key in ("summary", "description", "runbook_url"):
                    if not annotations.get(key):
                        faults.append(f"{path.name}: {name} has no {key}")
                runbook = annotations.get("runbook_url", "")
                if runbook and (not runbook.startswith("README.md#") or runbook.split("#", 1)[1] not in anchors):
                    faults.append(f"{path.name}: {name}'s runbook_url {runbook} is not a section of README.md")
                if name not in fired:
                    faults.append(f"{path.name}: {name} has no unit test in tests/prometheus/ where it fires")
    for fault in faults:
        print(fault)
    if not alerts:
        faults.append("no alert found")
        print("no alert found in roles/prometheus/files/*.rules.yml")
    return 1 if faults else 0


if __name__ == "__main__":
    sys.exit(main())
