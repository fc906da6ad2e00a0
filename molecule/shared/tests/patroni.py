"""Patroni's view of the PostgreSQL cluster, for the checks (test_19, test_76, test_89).

Asked with `patronictl list` on a db host (it reads etcd): every member,
its role (Leader, Sync Standby, Replica), state, timeline and lag.
"""

import json

from clients import inventory_host


def config(host):
    """The member's Patroni file: /etc/patroni/<version>-main.yml."""
    return f"/etc/patroni/{host.check_output('ls /etc/postgresql')}-main.yml"


def members(names):
    """`patronictl list` as the first of NAMES that answers: {member: row}, or {} when none does."""
    for name in names:
        host = inventory_host(name)
        try:
            result = host.run("patronictl -c %s list --format json", config(host))
        except Exception:  # noqa: BLE001 - a host down: Ansible reports it unreachable
            continue
        if result.rc == 0:
            return {row["Member"]: row for row in json.loads(result.stdout)}
    return {}


def leader(names):
    """The member that leads, or None."""
    return next((name for name, row in members(names).items() if row["Role"] == "Leader"), None)


def psql(host, sql, database="chat"):
    """One query as the postgres system user on HOST (peer authentication); its rows."""
    return host.check_output("runuser -u postgres -- psql -XAtq -d %s -c %s", database, sql)


def leader_timeline(host):
    """The timeline HOST's primary writes, read from PostgreSQL (its current WAL file's name): the
    leader's row in `patronictl list` can still show the one before a promotion for a while."""
    return int(psql(host, "SELECT substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8)", "postgres"), 16)
