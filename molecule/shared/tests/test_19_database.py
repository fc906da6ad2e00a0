"""The database: PostgreSQL where the inventory has a host in group `db`
(the cluster scenario, as staging and production: three hosts, run by
Patroni), SQLite otherwise (the default scenario, as the local demo).
/healthz says which."""

import json
import re
import time
import urllib.parse
import uuid

import pytest

from clients import edge_of, groups_of, inventory_groups, inventory_host, inventory_value
from patroni import leader, psql


@pytest.fixture(scope="module")
def on_postgresql(host):
    return len(inventory_groups(host).get("db", [])) > 0


@pytest.fixture(scope="module")
def postgresql(host, on_postgresql):
    if not on_postgresql:
        pytest.skip("no host in group db: the app keeps SQLite")
    if "db" not in groups_of(host):
        pytest.skip(f"SKIPPED: {host.backend.get_hostname()} is not a db host")
    major = host.check_output("ls /etc/postgresql")
    members = inventory_groups(host)["db"]
    patroni = len(members) > 1
    return {"unit": f"patroni@{major}-main" if patroni else f"postgresql@{major}-main", "version": major,
            "patroni": patroni, "members": members,
            "leads": not patroni or leader(members) == host.backend.get_hostname()}


def test_healthz_names_the_database(edge, on_postgresql):
    status, body = edge.get_json("/healthz")
    assert status == 200
    assert body["database"] == ("postgresql" if on_postgresql else "sqlite")


def test_debian_postgresql_runs_and_starts_at_boot(host, postgresql):
    """Debian's cluster <version>/main, run by its own unit or by Patroni's."""
    release = host.system_info.release.split(".")[0]
    assert postgresql["version"] == {"12": "15", "13": "17"}[release]
    unit = host.service(postgresql["unit"])
    assert unit.is_running and unit.is_enabled
    cluster = host.check_output("pg_lsclusters --no-header").split()
    assert cluster[:3] == [postgresql["version"], "main", "5432"], cluster
    # Debian's tools know the cluster is Patroni's ("online,patroni", and
    # "recovery" on a replica).
    status = set(cluster[3].split(","))
    assert "online" in status and ("patroni" in status) == postgresql["patroni"], cluster


def test_postgresql_listens_on_loopback_only(host, postgresql):
    """Loopback, and the private address where app hosts are elsewhere."""
    listening = host.check_output("ss -Htln 'sport = :5432'")
    addresses = {line.split()[3].rsplit(":", 1)[0] for line in listening.splitlines()}
    assert "127.0.0.1" in addresses
    app_elsewhere = set(inventory_groups(host)["app"]) - {host.backend.get_hostname()}
    if app_elsewhere:
        own = set(host.check_output("hostname -I").split())
        assert addresses - {"127.0.0.1"} and addresses - {"127.0.0.1"} <= own, addresses
    else:
        assert addresses == {"127.0.0.1"}


def app_url(host):
    """The DATABASE_URL an app host was given."""
    env = host.check_output("cat /srv/chat/shared/chat.env")
    return re.search(r"^DATABASE_URL='([^']+)'", env, re.MULTILINE).group(1)


PG_QUERY = """
import sys, psycopg
try:
    print(psycopg.connect(sys.argv[1], connect_timeout=5).execute("select 'answered'").fetchone()[0])
except psycopg.OperationalError as error:
    print("refused:", str(error).strip().splitlines()[-1])
"""


def pg_query(app, url):
    """One query to url from an app host, with the app's own driver: 'answered' or 'refused: why'."""
    return app.check_output("/srv/chat/current/.venv/bin/python -c %s %s", PG_QUERY, url)


@pytest.fixture(scope="module")
def app_host(host):
    """The first app host (this one, all in one): its settings name the database it uses."""
    return inventory_host(inventory_groups(host)["app"][0])


# These run on the db host, asking an app host what it was given and
# connecting from there: the same on one host and in a cluster.
@pytest.mark.needs("db")
def test_only_the_app_role_logs_in_with_its_password(host, postgresql, app_host):
    url = app_url(app_host)
    assert pg_query(app_host, url) == "answered"
    wrong = pg_query(app_host, re.sub(r":[^:@/]+@", ":wrong-password@", url))
    assert "password authentication failed" in wrong, wrong
    # The superuser has no password and no TCP rule: peer on the socket only.
    superuser = host.run("PGPASSWORD=x psql -XAtq -h 127.0.0.1 -U postgres -d chat -c 'select 1'")
    assert superuser.rc != 0 and "no pg_hba.conf entry" in superuser.stderr
    assert psql(host, "select rolpassword like 'SCRAM-SHA-256$%' from pg_authid where rolname = 'chat'") == "t"


@pytest.mark.needs("db")
def test_the_password_is_the_inventorys(host, postgresql, app_host):
    password = inventory_value(app_host.backend.get_hostname(), "chat_db_password")
    url = urllib.parse.urlsplit(app_url(app_host))
    assert url.password == password
    assert url.path == "/chat"
    hosts = url.netloc.rsplit("@", 1)[1].split(",")
    if postgresql["patroni"]:
        # Every member, and libpq keeps the one that takes writes.
        members = {inventory_host(name).check_output("hostname -I").split()[0] + ":5432"
                   for name in postgresql["members"]}
        assert set(hosts) == members, hosts
        query = urllib.parse.parse_qs(url.query)
        assert query["target_session_attrs"] == ["read-write"], query
        assert int(query["connect_timeout"][0]) <= 5, query
    else:
        # This host, on loopback when the app is here too, else its private address.
        assert hosts[0] in {f"{address}:5432" for address in ["127.0.0.1", *host.check_output("hostname -I").split()]}


@pytest.mark.needs("db")
def test_messages_are_stored_in_postgresql_over_pooled_connections(host, postgresql):
    """Messages through Nginx and Daphne land in PostgreSQL, and the app's
    connections stay within its pools: a message is not a connection. On
    the leader with Patroni (the replicas hold no app connection)."""
    if not postgresql["leads"]:
        pytest.skip(f"SKIPPED: {host.backend.get_hostname()} is a replica")
    edge = edge_of(inventory_host(inventory_groups(host)["web"][0]))
    room = f"pg-{uuid.uuid4().hex[:8]}"
    sent = 30
    with edge.websocket(f"/ws/chat/{room}/") as ws:
        assert edge.receive(ws)["type"] == "history"
        seen = set()
        for n in range(sent):
            ws.send(json.dumps({"type": "message", "nickname": "pg", "body": f"stored {n}"}))
            # Under the per-socket rate limit (10 a second).
            time.sleep(0.12)
        while len(seen) < sent:
            frame = edge.receive(ws)
            assert frame["type"] in ("message", "batch"), frame
            seen.update(m["seq"] for m in frame.get("messages", [frame]))
    assert seen == set(range(1, sent + 1))
    stored = psql(host, "select count(*) from chat_message m join chat_room r on r.id = m.room_id "
                        f"where r.name = '{room}'")
    assert int(stored) == sent
    connections = int(psql(host, "select count(*) from pg_stat_activity where usename = 'chat'"))
    # Each app process (Gunicorn's workers, each Daphne) has a pool of at most 4.
    processes = sum(int(inventory_host(name).check_output("pgrep -c -u chat"))
                    for name in inventory_groups(host)["app"])
    assert 0 < connections <= 4 * processes, (connections, processes)
