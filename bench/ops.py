"""The day-two runs' times (scripts/bench.sh ops): a table from the runs' logs.

    python3 bench/ops.py report RESULTS_DIR

reads RESULTS_DIR/ops-times.tsv (key, what, seconds, per line, as the runs
ended) and each run's log RESULTS_DIR/ops-KEY.log (Ansible's recap and the
profile_roles callback's ROLES RECAP), and prints results.md: per run its
wall time against the target, the tasks Ansible ran and skipped, what
changed, and the roles that took the most.
"""

import pathlib
import re
import sys

# Issue 25's targets on a 2-core machine (seconds); None: no target, measured.
TARGETS = {"demo-fresh": 75, "demo-rerun": 25, "demo-check": 25, "cluster-rerun": 30, "cluster-check": 30}
RECAP = re.compile(r"^(\S+)\s+: ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)\s+skipped=(\d+)",
                   re.MULTILINE)
ROLE = re.compile(r"^(\S+) -+ ([0-9.]+)s$", re.MULTILINE)


def strip(text):
    """The log without colours or the box drawing Molecule-style output adds."""
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def run(directory, key, what, seconds):
    log = strip((directory / f"ops-{key}.log").read_text(errors="replace"))
    hosts = RECAP.findall(log)
    ok = sum(int(row[1]) for row in hosts)
    changed = sum(int(row[2]) for row in hosts)
    skipped = sum(int(row[5]) for row in hosts)
    recap = log[log.rfind("ROLES RECAP"):] if "ROLES RECAP" in log else ""
    roles = [(name, float(took)) for name, took in ROLE.findall(recap) if name != "total"]
    top = ", ".join(f"{name} {took:.1f}" for name, took in sorted(roles, key=lambda r: -r[1])[:5])
    target = TARGETS.get(key)
    verdict = "" if target is None else (f"<= {target}: met" if seconds <= target else f"<= {target}: not met")
    return (f"| {what} | {seconds:.0f} | {verdict} | {len(hosts)} | {ok} | {changed} | {skipped} "
            f"| {top or '-'} |")


def report(directory):
    directory = pathlib.Path(directory)
    lines = ["# Day-two runs, timed (scripts/bench.sh ops)", "",
             "Wall time of each run on this machine; tasks summed over the hosts of the run's recap (the "
             "controller's localhost is one; ok counts the changed ones too); roles by the seconds the "
             "profile_roles callback gave them. "
             "The commands are in commands.txt, each run's whole output in ops-KEY.log.", "",
             "| run | seconds | target | hosts | tasks ok | changed | skipped | slowest roles (s) |",
             "| --- | ---: | --- | ---: | ---: | ---: | ---: | --- |"]
    for row in (directory / "ops-times.tsv").read_text().splitlines():
        key, what, seconds = row.split("\t")
        lines.append(run(directory, key, what, float(seconds)))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "report":
        sys.exit(__doc__)
    sys.stdout.write(report(sys.argv[2]))
