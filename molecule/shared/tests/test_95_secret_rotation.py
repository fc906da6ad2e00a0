"""Rotating Django's SECRET_KEY, the app's and the admin's Redis passwords and the app's
PostgreSQL password under a room's traffic (playbooks/rotate.yml, README "Operating: secrets").

Runs where group app has two hosts or more (the cluster scenario), last: it
leaves the hosts on secrets the inventory does not hold. Step one runs
rotate.yml with new values and the old ones beside them
(chat_secret_key_fallbacks, chat_redis_password_previous): every Redis and
sentinel accepts both passwords, every app server restarts onto the new
values, and a value the old key signed still verifies on every app host.
Step two runs it with the new values alone: the old password is refused by
every Redis and sentinel (tried: the login fails, PING is refused), and that
value by every app host. Both
under traffic with half the clients reconnecting at once: 0 failed requests,
0 failed handshakes, only 1012 closes, 0 refused posts, 0 lost.

The Redis admin password seeds the monitor's, the replicas' and the
sentinels' own: after step one each of those logins takes either
password, and every replica and sentinel uses the new one; after step two
the old ones are refused everywhere, and the links that log in with them
(replica to primary, sentinel to Redis and to the other sentinels), cut,
log in again with the new ones: no sentinel calls anything down, every
replica streams, and the Redis exporter answers redis_up 1.

PostgreSQL's role has one password at a time: a new one without the old
one beside it (chat_db_password_previous) is refused before any host
changes; with it, the app's servers log in with either, and the role has
the new one alone once the first step is over (tried on every db host:
the old one is refused). Patroni's own passwords (replication, pg_rewind,
its REST API), derived from chat_db_admin_password, rotate in the first
run: each member's PostgreSQL and Patroni take the new ones and refuse the
old ones from then on, and the replicas, their streams ended after the
second run, stream again.

The site's self-signed key (-e chat_rotate_tls_key=true) is rotated on the
all-in-one host, on one Debian release: a client that trusts the new
certificate alone is answered by every Nginx worker, one that trusts the
old one is refused. A client pinning a self-signed certificate has to be
given the new one, so there is no traffic to count; test_80_acme rotates a
CA-issued key under load.
"""

import concurrent.futures
import hashlib
import json
import re
import secrets
import shlex
import ssl
import time
import urllib.error
import uuid

import pytest
import testinfra.utils.ansible_runner
from websockets.exceptions import ConnectionClosed
from clients import (INVENTORY, edge_of, inventory_host, inventory_value, on_one_release, public_key, report,
                     run_playbook, wait, why_failed)
from test_50_deploy import assert_gentle_reconnects, rehome_window, wait_for_retired_nginx_workers
from test_70_faults import account
from monitoring import MONITORING, monitoring_host
from patroni import leader, members, psql
from test_89_db_ha import healthy
from test_88_redis_ha import MASTER, REDIS_PORT, SENTINEL_PORT, address, cli, playbook_under_traffic

RUNNER = testinfra.utils.ansible_runner.AnsibleRunner(INVENTORY)
APP_HOSTS = RUNNER.get_hosts("app")
REDIS_HOSTS = RUNNER.get_hosts("redis")
DB_HOSTS = RUNNER.get_hosts("db")


on = inventory_host

SIGN = "from django.core import signing; print(signing.dumps('kept'))"


def shell(name, code):
    """Django's shell on NAME with the settings its servers use (chat-manage): rc, last line printed."""
    result = on(name).run(f"chat-manage shell --no-imports -c {shlex.quote(code)}")
    return result.rc, (result.stdout.strip().splitlines() or [""])[-1]


def verifies(name, token):
    """Whether the app on NAME accepts TOKEN's signature."""
    return shell(name, f"from django.core import signing; print(signing.loads({token!r}))") == (0, "kept")


def redis_logins(password):
    """Where the app's user logs in with PASSWORD: {(host, port): answer to PING}."""
    ports = [REDIS_PORT] + ([SENTINEL_PORT] if len(REDIS_HOSTS) > 1 else [])
    return {(name, port): " ".join(cli(on(name), password, port, "PING", user="chat"))
            for name in REDIS_HOSTS for port in ports}


def derived(admin, purpose):
    """A password group_vars/all.yml derives from the admin's (monitor, replication, sentinel)."""
    return hashlib.sha256(f"{admin}:{purpose}".encode()).hexdigest()


# Who logs in with a password derived from the admin's, and where: (user, purpose, ports).
ADMIN_DERIVED = [("admin", None, (REDIS_PORT, SENTINEL_PORT)), ("monitor", "monitor", (REDIS_PORT,)),
                 ("replica", "replication", (REDIS_PORT,)), ("sentinel", "sentinel", (REDIS_PORT, SENTINEL_PORT))]


def admin_logins(admin):
    """Where each login that ADMIN's password gives (its own, and those derived from it) gets PONG:
    {(host, port, user): answer}."""
    return {(name, port, user): " ".join(cli(on(name), derived(admin, purpose) if purpose else admin, port,
                                             "PING", user=user))
            for name in REDIS_HOSTS for user, purpose, ports in ADMIN_DERIVED for port in ports}


def not_refused(logins):
    """Those of the logins' answers where the login worked: redis-cli's AUTH fails (WRONGPASS, on
    stderr), then PING is refused unauthenticated."""
    return {where: answer for where, answer in logins.items()
            if answer == "PONG" or not answer.startswith("NOAUTH")}


def logged_in_again(admin):
    """Cuts every link that logs in with a password derived from ADMIN: the replicas' to their
    primary (masterauth), the sentinels' to Redis (auth-pass) and to each other (sentinel-pass).
    Once a sentinel would have called a peer down (down-after-milliseconds), what is not as it
    should be: {where: what}."""
    def pairs(lines):
        return dict(zip(lines[::2], lines[1::2]))

    down_after = int(pairs(cli(on(REDIS_HOSTS[0]), admin, SENTINEL_PORT, "SENTINEL", "MASTER", MASTER))
                     ["down-after-milliseconds"])
    for user, port in (("replica", REDIS_PORT), ("sentinel", REDIS_PORT), ("sentinel", SENTINEL_PORT)):
        for name in REDIS_HOSTS:
            cli(on(name), admin, port, "CLIENT", "KILL", "USER", user)
    time.sleep(down_after / 1000 + 3)
    wrong = {}
    for name in REDIS_HOSTS:
        role = cli(on(name), admin, REDIS_PORT, "ROLE")
        if role[:1] == ["slave"] and role[3:4] != ["connected"]:
            wrong[(name, "replication")] = role
        flags = {"master": [pairs(cli(on(name), admin, SENTINEL_PORT, "SENTINEL", "MASTER", MASTER))["flags"]]}
        for kind in ("REPLICAS", "SENTINELS"):
            lines = cli(on(name), admin, SENTINEL_PORT, "SENTINEL", kind, MASTER)
            # One flat list of name/value pairs per peer, each starting with "name".
            starts = [index for index, word in enumerate(lines) if word == "name" and index % 2 == 0]
            flags[kind.lower()] = [pairs(lines[start:end])["flags"]
                                   for start, end in zip(starts, starts[1:] + [len(lines)])]
        if len(flags["sentinels"]) != len(REDIS_HOSTS) - 1 or any(
                "down" in flag or "disconnected" in flag for flag in sum(flags.values(), [])):
            wrong[(name, "sentinel")] = flags
    if MONITORING:
        monitor = monitoring_host()
        port = inventory_value(REDIS_HOSTS[0], "chat_metrics_ports")["redis"]
        for name in REDIS_HOSTS:
            # Where the monitoring host scrapes it: the host's private address.
            url = f"http://{address(name)}:{port}/metrics"
            up = [line for line in monitor.check_output(f"curl -fsS --max-time 10 {url}").splitlines()
                  if line.startswith("redis_up ")]
            if up != ["redis_up 1"]:
                wrong[(name, "exporter")] = up
    return wrong


def db_logins(password):
    """Where the app's PostgreSQL role logs in with PASSWORD (its own row of pg_hba, the local socket):
    {host: whether it did}."""
    command = ("psql -X -w -h /run/postgresql -U chat -d chat -A -t -c 'SELECT 1'")
    return {name: on(name).run(f"PGPASSWORD={shlex.quote(password)} {command}").stdout.strip() == "1"
            for name in DB_HOSTS}


# Patroni's own logins, derived from chat_db_admin_password: (user, purpose, libpq options, a
# statement the login may run).
PATRONI_LOGINS = [("replicator", "replication", "dbname=postgres replication=true", "IDENTIFY_SYSTEM"),
                  ("rewind", "rewind", "dbname=postgres", "SELECT 1")]


def patroni_logins(admin):
    """Where the logins derived from ADMIN are taken, on each db host: replication and pg_rewind by
    its PostgreSQL (on its private address, as the members log in to each other), the REST API's
    by Patroni on a request that needs it (POST /reload: Patroni reads its file again).
    {(host, user): whether}."""
    port = inventory_value(DB_HOSTS[0], "chat_metrics_ports")["patroni"]
    logins = {}
    for name in DB_HOSTS:
        host, where = on(name), address(name)
        for user, purpose, options, statement in PATRONI_LOGINS:
            logins[(name, user)] = host.run(
                f"PGPASSWORD={derived(admin, purpose)} psql -X -w -A -t "
                f"{shlex.quote(f'host={where} user={user} {options}')} -c {shlex.quote(statement)}").rc == 0
        answer = host.check_output(f"curl -s -o /dev/null -w '%{{http_code}}' --max-time 10 -X POST "
                                   f"-u patroni:{derived(admin, 'patroni-api')} http://{where}:{port}/reload")
        logins[(name, "patroni")] = answer.startswith("2")
    return logins


def replicas_log_in_again():
    """Ends every replica's stream on the leader: each logs in again with the password Patroni has
    now. Seconds until every member runs or streams again, with a replica streaming per member."""
    head = on(leader(DB_HOSTS))
    psql(head, "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_replication", "postgres")

    def streaming():
        count = int(psql(head, "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'", "postgres"))
        return healthy(DB_HOSTS) if count == len(DB_HOSTS) - 1 else None
    return wait(streaming, 60, "every replica streaming again", interval=1,
                explain=lambda: f"patronictl list: {members(DB_HOSTS)}")[0]


def rotated_under_traffic(edge, name, slug, values):
    result, counts, recovery, room = playbook_under_traffic(edge, slug, "playbooks/rotate.yml",
                                                            "-e", json.dumps(values))
    reconnects = assert_gentle_reconnects(counts)
    account(name, on(APP_HOSTS[0]), room, counts, recovery)
    report(f"{name}: rotate.yml {result.seconds:.0f} s; {counts.http_ok} requests answered, "
           f"{len(counts.http_failed)} failed; {len(counts.closes)} closes (1012), reconnects {reconnects}")


@pytest.mark.skipif(len(APP_HOSTS) < 2, reason="SKIPPED: one app host (the cluster scenario checks it)")
def test_rotated_secrets_are_accepted_beside_the_old_ones_then_alone():
    edge = edge_of(on(RUNNER.get_hosts("web")[0]))
    old_key = inventory_value(APP_HOSTS[0], "chat_secret_key")
    old_password = inventory_value(APP_HOSTS[0], "chat_redis_password")
    old_db = inventory_value(APP_HOSTS[0], "chat_db_password")
    old_admin = inventory_value(APP_HOSTS[0], "chat_redis_admin_password")
    old_db_admin = inventory_value(APP_HOSTS[0], "chat_db_admin_password")
    new_key, new_password, new_db = secrets.token_urlsafe(50), secrets.token_urlsafe(32), secrets.token_urlsafe(32)
    new_admin, new_db_admin = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
    rc, token = shell(APP_HOSTS[0], SIGN)
    assert rc == 0 and token, "the control: the app signs a value"
    assert all(verifies(name, token) for name in APP_HOSTS), "the control: the key now verifies its own"
    assert set(redis_logins(old_password).values()) == {"PONG"}, "the control: the password now logs in"
    assert set(db_logins(old_db).values()) == {True}, "the control: the database password now logs in"
    assert set(admin_logins(old_admin).values()) == {"PONG"}, admin_logins(old_admin)
    assert set(patroni_logins(old_db_admin).values()) == {True}, patroni_logins(old_db_admin)

    # A new database password alone would lock out every server still on the old one.
    env_before = {name: on(name).check_output("cat /srv/chat/shared/chat.env") for name in APP_HOSTS}
    result = run_playbook("playbooks/rotate.yml", "-e", json.dumps({"chat_db_password": new_db}))
    assert result.returncode != 0 and "refuses the app's password (chat_db_password)" in result.stdout, \
        why_failed(result)
    assert {name: on(name).check_output("cat /srv/chat/shared/chat.env") for name in APP_HOSTS} == env_before
    assert set(db_logins(old_db).values()) == {True}, "the role's password changed although the run stopped"

    rotated_under_traffic(edge, "secrets rotated, the old ones beside them", "rotate-both",
                          {"chat_secret_key": new_key, "chat_secret_key_fallbacks": [old_key],
                           "chat_redis_password": new_password, "chat_redis_password_previous": old_password,
                           "chat_redis_admin_password": new_admin, "chat_redis_admin_password_previous": old_admin,
                           "chat_db_password": new_db, "chat_db_password_previous": old_db,
                           "chat_db_admin_password": new_db_admin})
    for name in APP_HOSTS:
        env = on(name).check_output("cat /srv/chat/shared/chat.env")
        assert f"SECRET_KEY='{new_key}'" in env and f"SECRET_KEY_FALLBACKS='{old_key}'" in env, name
        assert f":{new_password}@" in env and old_password not in env, name
        assert f":{new_db}@" in env and f"DATABASE_PASSWORD_PREVIOUS='{old_db}'" in env, name
        assert verifies(name, token), f"{name}: a value the old key signed was refused with it a fallback"
    assert set(redis_logins(new_password).values()) == {"PONG"}, redis_logins(new_password)
    assert set(redis_logins(old_password).values()) == {"PONG"}, "the old password was refused too early"
    assert set(admin_logins(new_admin).values()) == {"PONG"}, admin_logins(new_admin)
    assert set(admin_logins(old_admin).values()) == {"PONG"}, "an old admin login was refused too early"
    # Every server had both when the role got the new one, its only one.
    assert set(db_logins(new_db).values()) == {True}, db_logins(new_db)
    assert set(db_logins(old_db).values()) == {False}, "the role still takes the old database password"
    # Patroni's own: one password each, the new one from this run on.
    assert set(patroni_logins(new_db_admin).values()) == {True}, patroni_logins(new_db_admin)
    assert set(patroni_logins(old_db_admin).values()) == {False}, patroni_logins(old_db_admin)

    rotated_under_traffic(edge, "the old secrets dropped", "rotate-drop",
                          {"chat_secret_key": new_key, "chat_redis_password": new_password,
                           "chat_redis_admin_password": new_admin, "chat_db_password": new_db,
                           "chat_db_admin_password": new_db_admin})
    for name in APP_HOSTS:
        assert "DATABASE_PASSWORD_PREVIOUS" not in on(name).check_output("cat /srv/chat/shared/chat.env"), name
    assert set(db_logins(new_db).values()) == {True} and set(db_logins(old_db).values()) == {False}
    assert [name for name in APP_HOSTS if verifies(name, token)] == [], "the old key's signature still verifies"
    assert set(redis_logins(new_password).values()) == {"PONG"}, redis_logins(new_password)
    # redis-cli's AUTH fails (WRONGPASS, on stderr), then PING is refused unauthenticated.
    assert not_refused(redis_logins(old_password)) == {}, "the old password still logs in"
    assert set(admin_logins(new_admin).values()) == {"PONG"}, admin_logins(new_admin)
    assert not_refused(admin_logins(old_admin)) == {}, "an old admin login still works"
    assert logged_in_again(new_admin) == {}, "a link did not log in again with the new passwords"
    report(f"Patroni's replicas, their streams ended, streaming again within {replicas_log_in_again():.1f} s")


@on_one_release("CHAT_ROTATION_SUITE", "trixie", "the self-signed key rotation")
def test_a_rotated_self_signed_key_is_served_and_the_old_one_no_more():
    web = on(RUNNER.get_hosts("web")[0])
    if inventory_value(web.backend.get_hostname(), "chat_tls_certificate_source") != "self_signed":
        pytest.skip("SKIPPED: the certificate is not self-signed here")
    old = edge_of(web)
    old.wait_healthy(timeout=30, in_a_row=3)  # the control: the client that trusts the old one
    window = rehome_window(web)
    # A page open through the reload: the retired worker holds its
    # WebSocket, which must be told 1012 within the window, not cut at
    # nginx_worker_shutdown_timeout (10 min). Read throughout, so that
    # Daphne's pings are answered while the playbook runs.
    since = web.check_output("date '+%Y-%m-%d %H:%M:%S'")
    with old.websocket(f"/ws/chat/tls-{uuid.uuid4().hex[:8]}/") as ws, \
            concurrent.futures.ThreadPoolExecutor(1) as pool:
        old.receive(ws)  # the join history
        started = time.monotonic()
        rotation = pool.submit(run_playbook, "playbooks/rotate.yml", "-e", "chat_rotate_tls_key=true")
        finished = None
        # Told during the playbook (web.yml's reload is followed by
        # playbooks/rehome.yml) or within the window after it.
        with pytest.raises(ConnectionClosed) as closed:
            while finished is None or time.monotonic() - finished < window + 15:
                if finished is None and rotation.done():
                    finished = time.monotonic()
                try:
                    ws.recv(timeout=1)
                except TimeoutError:
                    pass
        told_after = time.monotonic() - started
        result = rotation.result()
        assert result.returncode == 0, why_failed(result)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1012, (
        f"the WebSocket open through the reload ended without a 1012 close frame: {closed.value!r}")
    told = web.check_output(
        f"journalctl --since '{since}' -u 'chat-daphne@*' --no-pager -o cat | grep -F SIGUSR1 || true")
    assert re.search(r"SIGUSR1: [1-9]\d* WebSockets told 1012", told), f"no instance told its WebSockets: {told!r}"
    retired_after = wait_for_retired_nginx_workers(web, window + 30)
    new = edge_of(web)
    assert (public_key(ssl.PEM_cert_to_DER_cert(new.certificate_pem))
            != public_key(ssl.PEM_cert_to_DER_cert(old.certificate_pem))), "the certificate kept its key"
    # Ten in a row: each Nginx worker serves the new one.
    new.wait_healthy(timeout=30)
    with pytest.raises(urllib.error.URLError) as refused:
        old.get("/healthz")
    assert isinstance(refused.value.reason, ssl.SSLCertVerificationError), refused.value
    report(f"TLS key rotated (self-signed): rotate.yml {result.seconds:.0f} s; the new certificate served by "
           f"every worker, the old one refused by its client ({refused.value.reason.verify_message}); "
           f"the WebSocket open through the reload told 1012 {told_after:.1f} s after the playbook started "
           f"({result.seconds:.0f} s), the retired Nginx workers gone {retired_after:.0f} s after that")
