"""Maintenance of the all-in-one host (playbooks/maintenance.yml) under a room's traffic.

The host is alone in every tier, so nothing can take its share: the run
is refused until the downtime is accepted, and then the site is down for
as long as the host's servers are stopped and it reboots. This measures
that window with the harsh clients (half reconnect at once after a
close, pollers ask for the lobby, senders post and the database is
counted): how long requests failed, how the sockets were closed and how
soon they were back, and that no post was lost.

The same run proves `chat_maintenance_upgrade=security`: two packages
made here are installed at 1.0, each with a 1.1 in a local repository,
one of them labelled as Debian's security suite is. Only that one is
upgraded. Whatever Debian's own security suite has due is upgraded too,
as it would be on a real host.

Takes a reboot (about a minute), so it runs on one Debian release only.
"""

import shlex
import time

import pytest

from clients import on_one_release, report, run_playbook, why_failed
from test_70_faults import account, new_room, recovery_after, room_traffic
from test_92_maintenance import pid1_started, rebootable

pytestmark = on_one_release("CHAT_MAINTENANCE_SUITE", "trixie", "the all-in-one maintenance window")

REPO = "/srv/chat-test-apt"
SOURCES = "/etc/apt/sources.list.d/chat-test-apt.list"
# Suite folder: the Release file's fields, as Debian's archives set them.
SUITES = {
    "security": "Origin: Debian\nLabel: Debian-Security\nSuite: stable-security\n",
    "other": "Origin: Debian\nLabel: Debian\nSuite: stable-updates\n",
}
PACKAGES = {"security": "chat-test-security-fix", "other": "chat-test-other-fix"}

# Builds PACKAGE at VERSION into DIR (dpkg-deb, which every Debian host has).
BUILD = """
set -eu
work=$(mktemp -d)
mkdir -p "$work/DEBIAN" "$work/usr/share/doc/$1"
printf 'Package: %s\\nVersion: %s\\nArchitecture: all\\nMaintainer: chat tests <root@localhost>\\nDescription: a test of chat_maintenance_upgrade\\n' "$1" "$2" > "$work/DEBIAN/control"
echo "$2" > "$work/usr/share/doc/$1/version"
dpkg-deb --build --root-owner-group "$work" "$3/$1_$2_all.deb" >/dev/null
rm -rf "$work"
"""
# A flat repository in DIR: its Packages, and a Release that names it
# (FIELDS) and gives its hash, as apt wants even from a trusted source.
INDEX = """
set -eu
cd "$1"
deb=$(ls *.deb)
{
  dpkg-deb --field "$deb"
  printf 'Filename: ./%s\\nSize: %s\\nSHA256: %s\\n\\n' "$deb" "$(stat -c %s "$deb")" "$(sha256sum "$deb" | cut -d' ' -f1)"
} > Packages
{
  printf '%s' "$2"
  printf 'Date: %s\\nSHA256:\\n %s %s Packages\\n' "$(date -Ru)" "$(sha256sum Packages | cut -d' ' -f1)" "$(stat -c %s Packages)"
} > Release
"""


def installed_version(host, package):
    return host.check_output(f"dpkg-query -W -f '${{Version}}' {package}")


@pytest.fixture
def upgrades_due(host):
    """Each of PACKAGES installed at 1.0 with a 1.1 waiting in its suite's repository."""
    try:
        for suite, package in PACKAGES.items():
            folder = f"{REPO}/{suite}"
            host.run_expect([0], f"rm -rf {folder} && mkdir -p {folder} /tmp/chat-test-apt")
            host.run_expect([0], f"bash -c {shlex.quote(BUILD)} build {package} 1.0 /tmp/chat-test-apt")
            host.run_expect([0], f"dpkg -i /tmp/chat-test-apt/{package}_1.0_all.deb")
            host.run_expect([0], f"bash -c {shlex.quote(BUILD)} build {package} 1.1 {folder}")
            host.run_expect([0], f"bash -c {shlex.quote(INDEX)} index {folder} {shlex.quote(SUITES[suite])}")
        host.run_expect([0], "printf 'deb [trusted=yes] file:%s ./\\n' "
                             + " ".join(f"{REPO}/{suite}" for suite in SUITES) + f" > {SOURCES}")
        yield
    finally:
        host.run(f"dpkg --purge {' '.join(PACKAGES.values())}")
        host.run(f"rm -rf {SOURCES} {REPO} /tmp/chat-test-apt /var/lib/apt/lists/*chat-test-apt*")


def test_alone_it_is_refused_without_the_downtime_accepted(host):
    name = host.backend.get_hostname()
    before = pid1_started(name)
    result = run_playbook("playbooks/maintenance.yml", "-e", "chat_maintenance_reboot=always")
    assert result.returncode != 0
    assert "alone in its tier" in result.stdout and "Nothing was changed" in result.stdout, \
        result.stdout[-3000:]
    assert pid1_started(name) == before


def test_the_window_of_the_all_in_one_host_security_upgrades_only(host, edge, upgrades_due):
    name = host.backend.get_hostname()
    before = pid1_started(name)
    room = new_room("maintain-alone")
    traffic = room_traffic(edge, room)
    with rebootable([name]), traffic as counts:
        time.sleep(3)
        started = time.monotonic()
        result = run_playbook("playbooks/maintenance.yml", "-e", "chat_maintenance_upgrade=security",
                              "-e", "chat_maintenance_reboot=always", "-e", "chat_maintenance_accept_downtime=true")
        assert result.returncode == 0, why_failed(result)
        ended = time.monotonic()
        recovery = recovery_after(traffic, edge, room, ended)
        time.sleep(3)
    assert pid1_started(name) != before, "the host was not rebooted"
    assert installed_version(host, PACKAGES["security"]) == "1.1", "the security suite's upgrade was not installed"
    assert installed_version(host, PACKAGES["other"]) == "1.0", "an upgrade from outside a security suite was installed"
    dropped, http_errors = account("all-in-one host maintained", host, room, counts, recovery,
                                   refused=None, http_errors_allowed=True)
    # Daphne tells each socket 1012 as it stops; nothing is cut without a close.
    codes = sorted({code for code, _ in counts.closes})
    assert codes == [1012], f"closes other than 1012: {counts.closes}"
    failed = counts.http_failed_at
    window = (max(failed) - min(failed)) if failed else 0.0
    away = max((seconds for _, seconds in counts.reconnects), default=0.0)
    report(f"maintenance.yml on the all-in-one host (security upgrades, reboot): {ended - started:.0f} s; "
           f"requests failed for {window:.1f} s ({http_errors} of {counts.http_ok + http_errors}, "
           f"the first {(min(failed) - started) if failed else 0:.0f} s into the run); "
           f"{len(counts.closes)} closes, all 1012, sockets back after {away:.1f} s at most "
           f"({len(counts.ws_failed_handshakes)} handshakes failed meanwhile); posts: "
           f"{len(counts.acknowledged)} acknowledged, {len(counts.refused)} refused, "
           f"{len(counts.resent)} resent after a close, 0 lost")
