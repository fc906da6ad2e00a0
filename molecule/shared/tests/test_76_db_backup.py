"""Backups of PostgreSQL with pgBackRest, and playbooks/restore.yml bringing them back.

Runs once for the inventory, where there is a db host and a backup host (the
cluster scenario). The repository is on the backup host, encrypted; the db
host archives its WAL into it. The disaster: messages posted under traffic
(clients that reconnect at once and resend), a backup taken meanwhile, a
time T noted, more posted, then PostgreSQL stopped and its data folder
wiped. restore.yml brings back the latest point: every message acknowledged
before the wipe is in the database again (read there, not through the
app). Then restore.yml to T: exactly the messages acknowledged before T.
Wrong input (a passphrase that does not open the repository, a time before
the oldest backup, a stanza the repository does not hold) is refused before
any change.
"""

import json
import time
import uuid

import pytest
import testinfra.utils.ansible_runner

from clients import INVENTORY, edge_of, inventory_host, report, run_playbook, why_failed
from patroni import leader
from test_75_backup import Poller
from traffic import Traffic

RUNNER = testinfra.utils.ansible_runner.AnsibleRunner(INVENTORY)
BACKUP_HOSTS = RUNNER.get_hosts("backup")
DB_HOSTS = RUNNER.get_hosts("db")

pytestmark = pytest.mark.skipif(
    not BACKUP_HOSTS or not DB_HOSTS, reason="SKIPPED: no db host and backup host (pgBackRest) in this layout")

STATUS = "/var/backups/chat/status.json"
COMMAND = "/usr/local/sbin/chat-db-backup"


@pytest.fixture(scope="module")
def repository():
    return inventory_host(BACKUP_HOSTS[0])


@pytest.fixture(scope="module")
def db():
    """The db host that takes writes: the only one, or Patroni's leader (the first member, which a
    restore makes the leader again)."""
    return inventory_host(leader(DB_HOSTS) if len(DB_HOSTS) > 1 else DB_HOSTS[0])


@pytest.fixture(scope="module")
def edge():
    return edge_of(inventory_host(RUNNER.get_hosts("web")[0]))


def status(repository):
    return json.loads(repository.file(STATUS).content_string)


def take_backup(repository, kind):
    """Starts the timer's service now and returns the record of the backup it took."""
    repository.run_expect([0], f"systemctl start chat-db-backup-{kind}.service")
    return status(repository)["last_backup"]


def psql(db, sql, database="chat"):
    return db.check_output(f"runuser -u postgres -- psql -XAt -d {database} -c {json.dumps(sql)}")


def stored_bodies(db, room):
    """The bodies of the room's messages, read from PostgreSQL on the db host."""
    out = psql(db, "SELECT m.body FROM chat_message m JOIN chat_room r ON r.id = m.room_id "
                   f"WHERE r.name = '{room}' ORDER BY m.seq")
    return out.splitlines() if out else []


def cluster(db):
    """(version, data folder) of the db host's cluster, as pg_lsclusters says."""
    row = db.check_output("pg_lsclusters --no-header").split()
    return row[0], row[5]


def unchanged(db, result, expected):
    """A refused restore: the message, no lock taken, nothing held, PostgreSQL serving."""
    assert result.returncode != 0, result.stdout[-3000:]
    assert expected in result.stdout, result.stdout[-3000:]
    assert "Nothing was changed" in result.stdout
    assert "PLAY [Take the deploy lock" not in result.stdout
    assert psql(db, "SELECT pg_is_in_recovery()") == "f"


def test_the_repository_is_on_the_backup_host_and_encrypted(db, repository):
    for timer in ("chat-db-backup-full.timer", "chat-db-backup-diff.timer", "chat-db-backup-verify.timer"):
        assert repository.service(timer).is_enabled, timer
        assert repository.service(timer).is_running, timer
    info = json.loads(repository.check_output("runuser -u pgbackrest -- pgbackrest --stanza=chat info --output=json"))[0]
    assert info["status"]["code"] == 0, info["status"]
    assert info["cipher"] == "aes-256-cbc"
    assert info["backup"], "no backup: the first full backup is taken by the converge"
    # The repository's files are ciphertext; only the backup host holds the passphrase.
    head = repository.check_output("head -c 16 /var/lib/pgbackrest/backup/chat/backup.info | od -An -c")
    assert "[" not in head.split()[0], head
    assert "repo1-cipher-pass" not in db.file("/etc/pgbackrest.conf").content_string
    conf = repository.file("/etc/pgbackrest.conf")
    assert (conf.mode, conf.user, conf.group) == (0o640, "root", "pgbackrest")
    assert db.file(f"{cluster(db)[1]}").exists
    assert "pgbackrest" in psql(db, "SHOW archive_command", "postgres")


def test_wal_reaches_the_repository_from_the_db_host(db):
    db.run_expect([0], "runuser -u postgres -- pgbackrest --stanza=chat check")


def test_the_restore_test_restores_the_newest_backup_and_checks_its_counts(repository, edge):
    with Traffic(edge, f"db-backup-verify-{uuid.uuid4().hex[:8]}", sockets=4, senders=2, send_interval=0.2):
        backup = take_backup(repository, "diff")
    assert backup["counts_before"]["chat_message"] <= backup["counts_after"]["chat_message"]
    repository.run_expect([0], "systemctl start chat-db-backup-verify.service")
    verified = status(repository)["last_verified"]
    assert verified["label"] == backup["label"]
    for table, count in verified["counts"].items():
        assert backup["counts_before"][table] <= count <= backup["counts_after"][table], (table, verified, backup)
    log = repository.check_output("journalctl -q -o cat -u chat-db-backup-verify.service -n 20")
    assert f"verify {backup['label']} ok" in log
    assert not repository.file("/var/tmp/chat-db-verify").exists
    # Both jobs' success, for ChatBackupTooOld: within the last minutes, with their bounds.
    for kind, hours in (("backup", 49), ("verify", 337)):
        series = dict(line.rsplit(" ", 1) for line in repository.check_output(
            f"cat /var/lib/prometheus/node-exporter/chat-db-{kind}.prom").splitlines())
        assert time.time() - float(series[f'chat_backup_last_success_timestamp_seconds{{kind="{kind}"}}']) < 600
        assert float(series[f'chat_backup_max_age_seconds{{kind="{kind}"}}']) == hours * 3600
    report(f"pgBackRest: diff backup {backup['label']} under traffic in {backup['seconds']} s "
           f"({backup['database_bytes']} bytes of database, {backup['bytes']} written); restore test "
           f"{verified['seconds']} s, rows {verified['counts']}")


def test_a_restore_that_cannot_be_made_changes_nothing(db, repository):
    result = run_playbook("playbooks/restore.yml", "-e", "chat_backup_passphrase=" + "W" * 40)
    unchanged(db, result, "cannot be read with this passphrase")
    result = run_playbook("playbooks/restore.yml", "-e", "chat_restore_target_time=2000-01-01T00:00:00+00:00")
    unchanged(db, result, "is before the end of the oldest backup")
    result = run_playbook("playbooks/restore.yml", "-e", "pgbackrest_stanza=nothing-here")
    unchanged(db, result, "holds no stanza 'nothing-here'")


def wait_archived(db, timeout=150):
    """Seconds until the WAL segment holding everything committed so far is in the repository."""
    segment = psql(db, "SELECT pg_walfile_name(pg_current_wal_lsn())")
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        archived = psql(db, "SELECT coalesce(last_archived_wal, '') FROM pg_stat_archiver")
        # Same timeline: names order as the WAL does.
        if archived[:8] == segment[:8] and archived >= segment:
            return time.monotonic() - started
        time.sleep(1)
    pytest.fail(f"WAL segment {segment} not archived in {timeout} s")


def restore(edge, *args):
    """restore.yml under HTTP pollers and reconnecting sockets: (result, seconds to the first healthy poll)."""
    room = f"db-restore-watch-{uuid.uuid4().hex[:8]}"
    started = time.monotonic()
    with Poller(edge) as poller, Traffic(edge, room, http_clients=0, sockets=10, at_once=0.5,
                                         wait_open=False) as counts:
        result = run_playbook("playbooks/restore.yml", *args)
        edge.wait_healthy(timeout=120)
    assert result.returncode == 0, why_failed(result)
    answers = sorted(poller.answers)
    codes = [code for _, code, _ in answers]
    # From the first maintenance page on (before it, the site as it was).
    held = codes.index(503) if 503 in codes else 0
    others = [code for code in codes[held:] if code not in (200, 503)]
    healthy = next((when for when, code, _ in answers[held:] if code == 200), time.monotonic())
    return result, healthy - started, codes[held:], others, counts


def test_restore_to_the_latest_point_and_to_a_time_loses_nothing_acknowledged(db, repository, edge):
    room = f"db-restore-{uuid.uuid4().hex[:8]}"
    # Before T: posts under traffic, a backup taken meanwhile.
    with Traffic(edge, room, sockets=8, senders=4, send_interval=0.2, at_once=0.5) as before:
        time.sleep(3)
        backup = take_backup(repository, "diff")
        time.sleep(3)
    time.sleep(1.5)
    target = db.check_output("date -u '+%Y-%m-%d %H:%M:%S.%N+00'")
    time.sleep(1.5)
    with Traffic(edge, room, sockets=8, senders=4, send_interval=0.2, at_once=0.5) as after:
        time.sleep(5)
    for counts in (before, after):
        assert counts.silent == [], f"posts without an answer: {counts.silent[:5]}"
    acknowledged_before, acknowledged_after = set(before.acknowledged), set(after.acknowledged)
    assert acknowledged_before and acknowledged_after
    assert set(stored_bodies(db, room)) >= acknowledged_before | acknowledged_after
    archived_in = wait_archived(db)

    # The disaster: PostgreSQL's data folder is gone (with Patroni, on
    # every member: a replica copies whatever the leader does).
    version, data = cluster(db)
    for name in DB_HOSTS:
        member = inventory_host(name)
        member.run_expect([0], f"systemctl stop {'patroni' if len(DB_HOSTS) > 1 else 'postgresql'}@{version}-main")
        member.run_expect([0], f"find {data} -mindepth 1 -delete")
    result, recovery, codes, others, watch = restore(edge)
    db = inventory_host(DB_HOSTS[0])
    stored = set(stored_bodies(db, room))
    lost = (acknowledged_before | acknowledged_after) - stored
    report(f"pgBackRest restore to the latest point after the data folder was wiped: {len(acknowledged_before)} + "
           f"{len(acknowledged_after)} messages acknowledged, {len(stored)} in the database, {len(lost)} lost; "
           f"WAL archived {archived_in:.0f} s after the last post; restore.yml {result.seconds:.0f} s, first "
           f"healthy /healthz {recovery:.0f} s after it started; polls: {codes.count(503)} maintenance, "
           f"{codes.count(200)} healthy, {len(others)} other; sockets: {len(watch.closes)} closes "
           f"{sorted(set(code for code, _ in watch.closes))}, {len(watch.ws_failed_handshakes)} failed handshakes")
    assert not lost, f"acknowledged and not restored: {sorted(lost)[:5]}"
    assert "backup " + backup["label"] in result.stdout or "rows" in result.stdout

    # To T: the messages acknowledged before it, none of those after.
    result, recovery, codes, _, _ = restore(edge, "-e", json.dumps({"chat_restore_target_time": target}))
    stored = set(stored_bodies(db, room))
    report(f"pgBackRest restore to a time T: {len(acknowledged_before)} acknowledged before T, "
           f"{len(acknowledged_before & stored)} of them restored; {len(acknowledged_after)} after T, "
           f"{len(acknowledged_after & stored)} of them restored; restore.yml {result.seconds:.0f} s, first healthy "
           f"/healthz {recovery:.0f} s after it started")
    assert acknowledged_before <= stored
    assert not acknowledged_after & stored
    assert stored - acknowledged_before == set(), f"more than what was acknowledged before T: {stored - acknowledged_before}"
    db.run_expect([0], "runuser -u postgres -- pgbackrest --stanza=chat check")
