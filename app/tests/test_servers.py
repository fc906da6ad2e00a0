"""Gunicorn, Daphne and Gunicorn with uvicorn workers started for real (the three
layouts' servers), talked to with HTTP and a real WebSocket client."""

import asyncio
import json
import socket
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import websockets
from websockets.asyncio.client import connect as ws_connect

from .conftest import CLIENT_SERIES, free_port, picked, scrape, stop

APP_DIR = Path(__file__).resolve().parent.parent
RELEASE = "release-under-test"


def run_manage(env, *args):
    result = subprocess.run(
        [sys.executable, "manage.py", *args], cwd=APP_DIR, env=env,
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def http_get(url, timeout=5):
    """(status, body) for a GET; HTTP error statuses are returned, not raised."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def wait_until_serving(process, url, log, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"server exited with {process.returncode}:\n{log.read_text()}")
        try:
            http_get(url, timeout=1)
            return
        except OSError:
            time.sleep(0.1)
    pytest.fail(f"{url} did not answer within {timeout} s:\n{log.read_text()}")


def uvicorn_command(port):
    """Gunicorn with uvicorn workers, as the uvicorn layout runs it."""
    return [sys.executable, "-m", "gunicorn", "--bind", f"127.0.0.1:{port}", "--workers", "2",
            "--worker-class", "chatservice.uvicorn_worker.ChatUvicornWorker", "chatservice.asgi:application"]


@pytest.fixture(scope="module")
def server_env(redis_url, tmp_path_factory):
    """The servers' environment, on a migrated database with collected static files."""
    workdir = tmp_path_factory.mktemp("servers")
    env = {
        "PATH": os.environ.get("PATH", ""),
        "SECRET_KEY": "servers-test-secret",
        "REDIS_URL": redis_url,
        "DATABASE_URL": f"sqlite:///{workdir / 'db.sqlite3'}",
        "STATIC_ROOT": str(workdir / "static"),
        "RELEASE": RELEASE,
        "LOG_LEVEL": "WARNING",
    }
    run_manage(env, "migrate", "--noinput")
    run_manage(env, "collectstatic", "--noinput")
    return env


@pytest.fixture(scope="module")
def servers(server_env, tmp_path_factory):
    env = server_env
    workdir = tmp_path_factory.mktemp("server-logs")
    gunicorn_port, daphne_port, uvicorn_port = free_port(), free_port(), free_port()
    commands = {
        "gunicorn": [sys.executable, "-m", "gunicorn", "--bind", f"127.0.0.1:{gunicorn_port}",
                     "--workers", "2", "chatservice.wsgi:application"],
        "daphne": [sys.executable, "-m", "daphne", "-v", "0", "-b", "127.0.0.1",
                   "-p", str(daphne_port), "chatservice.asgi:application"],
        "uvicorn": uvicorn_command(uvicorn_port),
    }
    processes = {}
    try:
        for name, command in commands.items():
            log = workdir / f"{name}.log"
            processes[name] = (
                subprocess.Popen(command, cwd=APP_DIR, env=env, stdout=log.open("w"),
                                 stderr=subprocess.STDOUT),
                log,
            )
        urls = {
            "gunicorn": f"http://127.0.0.1:{gunicorn_port}",
            "daphne": f"http://127.0.0.1:{daphne_port}",
            "uvicorn": f"http://127.0.0.1:{uvicorn_port}",
        }
        for name, (process, log) in processes.items():
            wait_until_serving(process, urls[name] + "/healthz", log)
        yield urls
    finally:
        for process, _ in processes.values():
            stop(process)


def ws_url(servers, path, server="daphne"):
    return servers[server].replace("http://", "ws://") + path


def origin(servers, server="daphne"):
    return servers[server]


def test_gunicorn_health_says_wsgi(servers):
    status, body = http_get(servers["gunicorn"] + "/healthz")
    assert status == 200, body
    assert json.loads(body) == {
        "status": "ok",
        "release": RELEASE,
        "interface": "wsgi",
        "server": "gunicorn",
        "host": socket.gethostname(),
        "database": "sqlite",  # the servers here run on a SQLite file
        "checks": {"database": "ok", "disk": "ok", "redis": "ok"},
    }


@pytest.mark.parametrize("server", ["daphne", "uvicorn"])
def test_asgi_health_says_asgi_and_names_the_server(servers, server):
    status, body = http_get(servers[server] + "/healthz")
    assert status == 200, body
    answer = json.loads(body)
    assert (answer["status"], answer["interface"], answer["server"]) == ("ok", "asgi", server)


def test_gunicorn_serves_pages_with_hashed_static_urls(servers):
    status, body = http_get(servers["gunicorn"] + "/chat/general/")
    assert status == 200
    # ManifestStaticFilesStorage names files by content hash after collectstatic.
    assert "/static/chat/room." in body and "/static/chat/room.js" not in body
    status, _ = http_get(servers["gunicorn"] + "/chat/Not-Valid/")
    assert status == 404


@pytest.mark.parametrize("server", ["daphne", "uvicorn"])
def test_websocket_health_names_the_server(servers, server):
    async def scenario():
        async with ws_connect(ws_url(servers, "/ws/health/", server), origin=origin(servers, server)) as ws:
            frame = json.loads(await asyncio.wait_for(ws.recv(), 5))
            with pytest.raises(websockets.ConnectionClosedOK):
                await asyncio.wait_for(ws.recv(), 5)
            return frame, ws.close_code

    frame, close_code = asyncio.run(scenario())
    assert frame == {"status": "ok", "interface": "asgi", "server": server, "release": RELEASE,
                     "host": socket.gethostname()}
    assert close_code == 1000


def exchange(servers, room, server_a, server_b, sender, body):
    """alice joins room on server_a, bob on server_b; sender ("alice" or
    "bob") posts body. What each then receives, after their history."""
    async def scenario():
        path = f"/ws/chat/{room}/"
        async with ws_connect(ws_url(servers, path, server_a), origin=origin(servers, server_a)) as alice, \
                ws_connect(ws_url(servers, path, server_b), origin=origin(servers, server_b)) as bob:
            for ws in (alice, bob):
                assert json.loads(await asyncio.wait_for(ws.recv(), 5))["type"] == "history"
            await {"alice": alice, "bob": bob}[sender].send(
                json.dumps({"type": "message", "nickname": sender, "body": body}))
            return [json.loads(await asyncio.wait_for(ws.recv(), 5)) for ws in (alice, bob)]

    return asyncio.run(scenario())


def test_two_clients_chat_through_daphne(servers):
    to_alice, to_bob = exchange(servers, "servers-test", "daphne", "daphne", "alice", "hi bob")
    assert to_alice == to_bob
    assert (to_bob["type"], to_bob["nickname"], to_bob["body"], to_bob["seq"]) == (
        "message", "alice", "hi bob", 1,
    )
    # Gunicorn shares the database: the lobby now lists the room.
    status, body = http_get(servers["gunicorn"] + "/")
    assert status == 200 and 'href="/chat/servers-test/"' in body


def test_daphne_refuses_foreign_origin(servers):
    async def scenario():
        async with ws_connect(ws_url(servers, "/ws/chat/general/"), origin="http://evil.example"):
            pass

    with pytest.raises(websockets.InvalidStatus) as caught:
        asyncio.run(scenario())
    assert caught.value.response.status_code == 403


def test_daphne_closes_invalid_room_with_4004(servers):
    async def scenario():
        async with ws_connect(ws_url(servers, "/ws/chat/Bad.Room/"), origin=origin(servers)) as ws:
            with pytest.raises(websockets.ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 5)
            return ws.close_code

    assert asyncio.run(scenario()) == 4004


def test_a_room_spans_daphne_and_uvicorn(servers):
    """Both ASGI servers share the channel layer: a move between layouts keeps rooms whole."""
    to_alice, to_bob = exchange(servers, "across-servers", "daphne", "uvicorn", "bob", "from uvicorn")
    assert to_alice == to_bob
    assert (to_alice["nickname"], to_alice["body"]) == ("bob", "from uvicorn")


def test_uvicorn_workers_close_websockets_with_1012_on_reload(server_env, tmp_path):
    """A graceful reload (HUP, as a deploy does) says "service restart" to each socket.

    The page reconnects on 1012 and catches up; the deploy's checks count on it.
    """
    port = free_port()
    log = tmp_path / "uvicorn.log"
    process = subprocess.Popen(uvicorn_command(port), cwd=APP_DIR, env=server_env,
                               stdout=log.open("w"), stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_serving(process, url + "/healthz", log)

        async def scenario():
            async with ws_connect(url.replace("http://", "ws://") + "/ws/chat/reload-test/",
                                  origin=url) as ws:
                assert json.loads(await asyncio.wait_for(ws.recv(), 5))["type"] == "history"
                process.send_signal(signal.SIGHUP)
                with pytest.raises(websockets.ConnectionClosed):
                    while True:
                        await asyncio.wait_for(ws.recv(), 30)
                return ws.close_code

        assert asyncio.run(scenario()) == 1012, log.read_text()
    finally:
        stop(process)


def test_uvicorn_refuses_a_64_kib_message_before_it_is_parsed(servers):
    """The uvicorn layout takes the same message limit as Daphne (32 KiB)."""
    async def scenario():
        async with ws_connect(ws_url(servers, "/ws/chat/big-message/", "uvicorn"),
                              origin=origin(servers, "uvicorn")) as ws:
            assert json.loads(await asyncio.wait_for(ws.recv(), 5))["type"] == "history"
            await ws.send(json.dumps({"type": "message", "nickname": "big", "body": "x" * 65536}))
            with pytest.raises(websockets.ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 10)
            return ws.close_code

    assert asyncio.run(scenario()) == 1009


# The hooks as roles/gunicorn/templates/gunicorn.conf.py.j2 wires them.
HOOKS_CONFIG = """
def _chat_hooks():
    try:
        import chatservice.gunicorn_hooks as hooks
    except ModuleNotFoundError:
        return None
    return hooks


def when_ready(server):
    hooks = _chat_hooks()
    if hooks is None:
        server.log.warning("this release has no chatservice.gunicorn_hooks: no metrics are served")
    else:
        hooks.when_ready(server)


def child_exit(server, worker):
    hooks = _chat_hooks()
    if hooks is not None:
        hooks.child_exit(server, worker)
"""


@pytest.fixture
def gunicorn_with_metrics(server_env, tmp_path):
    """Starts Gunicorn with the metrics hooks, in multiprocess mode unless told otherwise."""
    processes = []

    def start(*args, multiproc=True, wait=True, **env):
        config = tmp_path / "gunicorn.conf.py"
        config.write_text(HOOKS_CONFIG)
        port, metrics_port = free_port(), free_port()
        multiproc_dir = tmp_path / f"metrics-{len(processes)}"
        multiproc_dir.mkdir()
        env = {**server_env, "CHAT_METRICS_LISTEN": f"127.0.0.1:{metrics_port}", **env}
        if multiproc:
            env["PROMETHEUS_MULTIPROC_DIR"] = str(multiproc_dir)
        log = tmp_path / f"gunicorn-{len(processes)}.log"
        process = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "--config", str(config), "--bind", f"127.0.0.1:{port}",
             "--workers", "2", *args],
            cwd=APP_DIR, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
        processes.append(process)
        url = f"http://127.0.0.1:{port}"
        if wait:
            wait_until_serving(process, url + "/healthz", log)
        return {"process": process, "url": url, "metrics": f"http://127.0.0.1:{metrics_port}/metrics",
                "dir": multiproc_dir, "log": log}

    yield start
    for process in processes:
        stop(process)


def _files_by_pid(directory, prefix):
    return {int(path.stem.rsplit("_", 1)[1]): path for path in directory.glob(f"{prefix}_*.db")}


def _value_in(path, name, **labels):
    """A metric's value in one worker's file alone."""
    import shutil
    import tempfile

    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    with tempfile.TemporaryDirectory() as alone:
        shutil.copy(path, alone)
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=alone)
        return registry.get_sample_value(name, labels) or 0


def _wait_for(condition, what, timeout=10):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} within {timeout} s")
        time.sleep(0.05)


def test_gunicorn_master_serves_the_sum_of_its_sync_workers(gunicorn_with_metrics):
    server = gunicorn_with_metrics("chatservice.wsgi:application")
    ok = ("chat_http_responses_total", (("status", "2xx"),))
    before = scrape(server["metrics"])
    assert before[("chat_release_info", (("interface", "wsgi"), ("release", RELEASE)))] == 1

    # A request left half-sent holds one sync worker: the next ones go to the other.
    host, port = server["url"].removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as held:
        held.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n")
        time.sleep(0.5)  # accepted and being read by one worker
        for _ in range(5):
            assert http_get(server["url"] + "/healthz")[0] == 200
        held.sendall(b"Connection: close\r\n\r\n")
        assert held.makefile("rb").readline().split()[1] == b"200"

    after = scrape(server["metrics"])
    assert after[ok] == before[ok] + 6
    # Both workers counted some, and the master served their sum.
    per_worker = [_value_in(path, "chat_http_responses_total", status="2xx")
                  for path in _files_by_pid(server["dir"], "counter").values()]
    assert len([value for value in per_worker if value > 0]) == 2
    assert sum(per_worker) == after[ok]

    # A worker gone: its live gauges go with it (child_exit), its counts stay.
    workers = _files_by_pid(server["dir"], "gauge_livemax")
    assert len(workers) == 2
    gone = min(workers)
    os.kill(gone, signal.SIGTERM)
    _wait_for(lambda: not workers[gone].exists(), "the exited worker's live gauges were not removed")
    _wait_for(lambda: len(_files_by_pid(server["dir"], "gauge_livemax")) == 2, "no new worker")
    final = scrape(server["metrics"])
    assert final[ok] >= after[ok]
    assert final[("chat_release_info", (("interface", "wsgi"), ("release", RELEASE)))] == 1


def test_gunicorn_master_sums_the_sockets_of_its_uvicorn_workers(gunicorn_with_metrics):
    server = gunicorn_with_metrics("--worker-class", "chatservice.uvicorn_worker.ChatUvicornWorker",
                                   "chatservice.asgi:application")
    url = server["url"].replace("http://", "ws://") + "/ws/chat/multiprocess-metrics/"

    async def scenario():
        async with ws_connect(url, origin=server["url"]) as alice, ws_connect(url, origin=server["url"]) as bob:
            for ws in (alice, bob):
                await asyncio.wait_for(ws.recv(), 5)
            await alice.send(json.dumps({"type": "message", "nickname": "alice", "body": "counted"}))
            for ws in (alice, bob):
                await asyncio.wait_for(ws.recv(), 5)
            return await asyncio.get_running_loop().run_in_executor(None, scrape, server["metrics"])

    during = asyncio.run(scenario())
    assert picked(during, CLIENT_SERIES + [
        ("chat_release_info", (("interface", "asgi"), ("release", RELEASE))),
    ]) == {
        "chat_websockets_open": 2, "chat_websocket_handshakes_total": 2, "chat_messages_posted_total": 1,
        "chat_messages_stored_total": 1, "chat_release_info": 1,
    }
    _wait_for(lambda: scrape(server["metrics"])[("chat_websockets_open", ())] == 0,
              "the closed sockets are still counted")


@pytest.mark.parametrize("listen, error", [
    ("10.0.0.5", "Error: CHAT_METRICS_LISTEN='10.0.0.5' is not ADDRESS:PORT with an IP address"),
    ("taken", "Error: cannot serve metrics on CHAT_METRICS_LISTEN=127.0.0.1:"),
])
def test_gunicorn_with_a_bad_metrics_address_stops_with_one_line(gunicorn_with_metrics, listen, error):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        if listen == "taken":
            listen = "127.0.0.1:%d" % taken.getsockname()[1]
        server = gunicorn_with_metrics("chatservice.wsgi:application", wait=False, CHAT_METRICS_LISTEN=listen)
        assert server["process"].wait(timeout=30) == 1
    log = server["log"].read_text()
    assert error in log
    assert "Traceback" not in log


def test_gunicorn_without_a_multiprocess_dir_serves_pages_and_says_why_no_metrics(gunicorn_with_metrics):
    server = gunicorn_with_metrics("chatservice.wsgi:application", multiproc=False)
    assert http_get(server["url"] + "/healthz")[0] == 200
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(server["metrics"], timeout=2)
    assert "CHAT_METRICS_LISTEN is set but PROMETHEUS_MULTIPROC_DIR is not" in server["log"].read_text()
