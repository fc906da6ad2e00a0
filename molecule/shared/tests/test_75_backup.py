"""Backups of the SQLite database, and playbooks/restore.yml bringing one back.

A copy is taken online by a timer's service, checked and recorded with its
row counts; the weekly restore test verifies the newest; a damaged copy
fails it. Then the disaster: messages posted, a copy taken, more posted,
and the database files deleted. restore.yml puts the copy back while HTTP
clients poll the site: they see only the maintenance page (503) or answers,
every message stored before the copy is back (read from the database),
those posted after it are what the copy cannot hold, and the chat takes
posts again. A restore of a copy that does not exist is refused before
any change. Where the messages live in PostgreSQL there is no SQLite copy
to take, and these checks skip.
"""

import json
import shlex
import threading
import time
import uuid

import pytest

from clients import post_probe, report, run_playbook, stored_messages, why_failed

BACKUP_DIR = "/var/backups/chat"
DATABASE = "/srv/chat/shared/data/db.sqlite3"
COMMAND = "/usr/local/sbin/chat-sqlite-backup"


@pytest.fixture(scope="module", autouse=True)
def sqlite_host(host):
    variables = host.ansible.get_variables()
    if "app" not in variables["group_names"]:
        pytest.skip(f"SKIPPED: {host.backend.get_hostname()} is not an app host")
    if variables["groups"].get("db"):
        pytest.skip("SKIPPED: the messages are in PostgreSQL here, not in SQLite")


def kept(host):
    return json.loads(host.check_output(f"{COMMAND} list"))


def status(host):
    return json.loads(host.file(f"{BACKUP_DIR}/status.json").content_string)


def take_backup(host):
    """Starts the timer's service now and returns the manifest of the copy it made."""
    before = {manifest["file"] for manifest in kept(host)}
    host.run_expect([0], "systemctl start chat-backup.service")
    made = [manifest for manifest in kept(host) if manifest["file"] not in before]
    assert len(made) == 1, f"one new copy expected, found {made}"
    return made[0]


def database_counts(host):
    query = ("from chat.models import Message, Room; "
             "print(Room.objects.count(), Message.objects.count())")
    rooms, messages = host.check_output(f"chat-manage shell -c {shlex.quote(query)}").split()[-2:]
    return {"chat_room": int(rooms), "chat_message": int(messages)}


def test_backup_and_verify_timers_are_active(host):
    for timer in ("chat-backup.timer", "chat-backup-verify.timer"):
        assert host.service(timer).is_enabled, timer
        assert host.service(timer).is_running, timer


def test_a_copy_is_checked_and_recorded_with_the_database_row_counts(host, edge):
    post_probe(edge, f"backup-count-{uuid.uuid4().hex[:8]}")
    manifest = take_backup(host)
    assert manifest["counts"] == database_counts(host)
    assert manifest["counts"]["chat_message"] > 0
    assert status(host)["last_backup"] == manifest
    assert host.file(f"{BACKUP_DIR}/{manifest['file']}").mode == 0o640
    assert host.file(BACKUP_DIR).mode == 0o750
    line = host.check_output("journalctl -q -o cat -u chat-backup.service -n 20")
    assert f"backup {manifest['file']} ok" in line
    report(f"SQLite backup: {manifest['counts']['chat_message']} messages, {manifest['database_bytes']} bytes "
           f"packed into {manifest['bytes']} in {manifest['seconds']} s")


def test_the_restore_test_verifies_the_newest_copy(host):
    newest = kept(host)[-1]
    host.run_expect([0], "systemctl start chat-backup-verify.service")
    verified = status(host)["last_verified"]
    assert verified["file"] == newest["file"]
    assert verified["counts"] == newest["counts"]


def test_a_damaged_copy_fails_the_restore_test(host):
    newest = kept(host)[-1]
    path = f"{BACKUP_DIR}/{newest['file']}"
    saved = f"/tmp/{newest['file']}.saved"
    host.run_expect([0], f"cp -p {path} {saved}")
    # The hourly timer must not add a newer copy while this one is damaged:
    # the restore test would verify that one instead.
    host.run_expect([0], "systemctl stop chat-backup.timer")
    try:
        # One byte in the middle of the compressed copy changes: its bits are
        # inverted, as writing a fixed byte would change nothing where it is already there.
        flip = ("import os, sys; path = sys.argv[1]; middle = os.path.getsize(path) // 2\n"
                "with open(path, 'r+b') as copy:\n"
                "    copy.seek(middle); byte = copy.read(1)[0]; copy.seek(middle); copy.write(bytes([byte ^ 0xFF]))")
        host.run_expect([0], f"python3 -c {shlex.quote(flip)} {path}")
        assert host.check_output(f"sha256sum < {path}").split()[0] != newest["sha256"]
        result = host.run("systemctl start chat-backup-verify.service")
        log = host.check_output("journalctl -q -o cat -u chat-backup-verify.service -n 20")
        assert result.rc != 0, f"a damaged copy passed the restore test:\n{log}"
        assert "does not match its checksum" in log
    finally:
        host.run_expect([0], f"mv -f {saved} {path}")
        host.run("systemctl reset-failed chat-backup-verify.service")
        host.run_expect([0], "systemctl start chat-backup.timer")
    host.run_expect([0], "systemctl start chat-backup-verify.service")


def test_a_restore_of_a_copy_that_is_not_there_changes_nothing(host, edge):
    before = host.check_output(f"sha256sum {DATABASE}")
    result = run_playbook("playbooks/restore.yml", "-e", "chat_restore_file=chat-19700101T000000Z.sqlite3.gz")
    assert result.returncode != 0
    assert "no backup named chat-19700101T000000Z.sqlite3.gz" in result.stdout, result.stdout[-3000:]
    assert "Nothing was changed" in result.stdout
    assert "PLAY [Take the deploy lock" not in result.stdout
    assert not host.file("/etc/nginx/chat-maintenance").exists
    assert host.check_output(f"sha256sum {DATABASE}") == before
    edge.wait_healthy()


class Poller:
    """HTTP clients asking /healthz through Nginx the whole time, counting each answer."""

    def __init__(self, edge, clients=2, interval=0.25):
        self.edge, self.clients, self.interval = edge, clients, interval
        self.answers, self.first_healthy = [], None
        self._stop, self._lock, self._threads = threading.Event(), threading.Lock(), []

    def _poll(self):
        while not self._stop.is_set():
            try:
                code, body = self.edge.get("/healthz", timeout=5)
            except OSError as error:
                code, body = None, repr(error)
            with self._lock:
                self.answers.append((time.monotonic(), code, body))
                if code == 200 and self.first_healthy is None:
                    self.first_healthy = time.monotonic()
            time.sleep(self.interval)

    def __enter__(self):
        self._threads = [threading.Thread(target=self._poll, daemon=True) for _ in range(self.clients)]
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=15)


def test_restore_brings_back_every_message_of_the_copy_after_the_database_is_lost(host, edge):
    room = f"backup-restore-{uuid.uuid4().hex[:8]}"
    before_copy = [post_probe(edge, room) for _ in range(20)]
    manifest = take_backup(host)
    after_copy = [post_probe(edge, room) for _ in range(5)]
    assert sorted(stored_messages(host, room)) == before_copy + after_copy
    # The disaster: the database is gone (the servers stopped first, as a
    # dead disk would leave them failing).
    host.run_expect([0], "systemctl stop 'chat-gunicorn.*' 'chat-daphne@*'")
    host.run_expect([0], f"rm -f {DATABASE} {DATABASE}-wal {DATABASE}-shm")
    started = time.monotonic()
    with Poller(edge) as poller:
        result = run_playbook("playbooks/restore.yml")
        edge.wait_healthy(timeout=90)
    assert result.returncode == 0, why_failed(result)
    recovery = (poller.first_healthy or time.monotonic()) - started
    # Before restore.yml holds the site, the lost database answers errors;
    # from the first maintenance page on, only that page, then the site.
    answers = sorted(poller.answers)
    held = next((i for i, (_, code, _) in enumerate(answers) if code == 503), None)
    assert held is not None, f"no poll saw the maintenance page: {[code for _, code, _ in answers][:40]}"
    codes = [code for _, code, _ in answers[held:]]
    others = [(code, body[:120]) for _, code, body in answers[held:] if code not in (200, 503)]
    maintenance = [body for _, code, body in answers[held:] if code == 503]
    back = codes.index(200) if 200 in codes else len(codes)
    stored = stored_messages(host, room)
    lost_after_copy = [seq for seq in after_copy if seq not in stored]
    report(f"SQLite restore of {manifest['file']} ({manifest['counts']['chat_message']} messages): "
           f"restore.yml {result.seconds:.0f} s, first healthy /healthz {recovery:.0f} s after it started; "
           f"{held} polls before the site was held (the lost database), then {codes.count(503)} maintenance "
           f"pages, {codes.count(200)} healthy, {len(others)} other; room: {len(before_copy)} posted before the copy, all restored: "
           f"{sorted(stored) == before_copy}; {len(after_copy)} posted after it, not in the copy")
    assert sorted(stored) == before_copy, "the room does not hold exactly what was stored before the copy"
    assert lost_after_copy == after_copy
    assert database_counts(host) == manifest["counts"]
    assert others == [], f"answers other than the maintenance page or the site: {others[:5]}"
    assert maintenance, "no poll saw the maintenance page"
    assert set(codes[back:]) == {200}, f"the site went back to the maintenance page: {codes[back:][:20]}"
    assert all("restored from a backup" in body for body in maintenance), maintenance[0][:300]
    assert not host.file("/etc/nginx/chat-maintenance").exists
    # The chat takes posts again, after what the copy held; a fresh page's
    # history is the restored room.
    assert post_probe(edge, room) == before_copy[-1] + 1
    with edge.websocket(f"/ws/chat/{room}/") as ws:
        joined = edge.receive(ws)
    assert [m["seq"] for m in joined["messages"]][-3:] == [before_copy[-2], before_copy[-1], before_copy[-1] + 1]
