"""chatservice.serve_daphne started the way systemd starts it: an adopted socket."""

import asyncio
import json
import os
import shutil
import signal
import socket
import stat
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
BACKLOG = 1234


def listen_backlog(path):
    """The backlog of the listening unix socket at path, as `ss -lx` shows it."""
    out = subprocess.run(["ss", "-Hlx", "src", str(path)], capture_output=True, text=True,
                         check=True).stdout.split()
    # Netid State Recv-Q Send-Q Local ...: for a listener Send-Q is the backlog.
    return int(out[3])


@pytest.fixture()
def launched(redis_url, tmp_path, request):
    """serve_daphne on a unix socket passed as fd 3, like a systemd socket unit.

    Parametrized indirectly, the parameter adds to its environment;
    {"metrics": True} sets CHAT_METRICS_LISTEN to a free 127.0.0.1 port.
    """
    if shutil.which("ss") is None:
        pytest.skip("SKIPPED: `ss` (iproute2) is not installed")
    sock_path = tmp_path / "daphne.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(sock_path))
    os.chmod(sock_path, 0o660)
    listener.listen(4096)
    notify_path = tmp_path / "notify.sock"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    notify.settimeout(0.5)
    extra = dict(getattr(request, "param", {}))
    metrics_url = None
    if extra.pop("metrics", False):
        metrics_port = free_port()
        extra["CHAT_METRICS_LISTEN"] = f"127.0.0.1:{metrics_port}"
        metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    env = {
        "PATH": os.environ.get("PATH", ""),
        "SECRET_KEY": "serve-daphne-test-secret",
        "REDIS_URL": redis_url,
        "DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite3'}",
        "RELEASE": "launcher-test",
        "LOG_LEVEL": "WARNING",
        "LISTEN_FDS": "1",
        "LISTEN_FDNAMES": "daphne.socket",
        "NOTIFY_SOCKET": str(notify_path),
        "CHAT_LISTEN_BACKLOG": str(BACKLOG),
        **extra,
    }
    subprocess.run([sys.executable, "manage.py", "migrate", "--noinput"], cwd=APP_DIR, env=env,
                   check=True, capture_output=True, timeout=120)
    fd = listener.fileno()
    log = tmp_path / "daphne.log"
    processes = []

    def launch():
        """One more process on the same socket, as systemd starts the next instance."""
        # systemd passes the socket as fd 3 and names the receiving PID; the
        # shell moves the socket to fd 3, and its exec keeps its PID, so $$ is
        # the launcher's.
        process = subprocess.Popen(
            ["bash", "-c", f'exec 3<&{fd} {fd}<&-; LISTEN_PID=$$ exec "$0" -m chatservice.serve_daphne '
             f'-v 0 --websocket-max-message-size {MAX_MESSAGE} --endpoint systemd:domain=UNIX:index=0 '
             'chatservice.asgi:application',
             sys.executable],
            cwd=APP_DIR, env=env, pass_fds=(fd,), stdout=log.open("a"), stderr=subprocess.STDOUT,
        )
        processes.append(process)
        return process

    try:
        yield {"process": launch(), "launch": launch, "socket": sock_path, "notify": notify, "log": log,
               "metrics": metrics_url}
    finally:
        for process in processes:
            stop(process)
        listener.close()
        notify.close()


# Small, so that a history page exceeds it.
MAX_MESSAGE = 4096


def wait_ready(launched, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and launched["process"].poll() is None:
        try:
            return launched["notify"].recv(256).decode()
        except TimeoutError:
            continue
    pytest.fail(f"no READY=1 within {timeout} s:\n{launched['log'].read_text()}")


def test_tells_systemd_it_is_ready_and_keeps_the_socket_as_the_unit_made_it(launched):
    assert wait_ready(launched) == "READY=1"
    # Twisted's own defaults would be a backlog of 50 and mode 0666.
    assert listen_backlog(launched["socket"]) == BACKLOG
    assert stat.S_IMODE(launched["socket"].stat().st_mode) == 0o660


def test_the_socket_outlives_the_process(launched):
    wait_ready(launched)
    stop(launched["process"])
    # Still there and still listening: the next instance adopts it, and
    # clients queue in it meanwhile.
    assert launched["socket"].is_socket()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(2)
        client.connect(str(launched["socket"]))


def test_open_websockets_are_closed_with_1012_on_sigterm(launched):
    wait_ready(launched)

    async def scenario():
        async with ws_connect("ws://localhost/ws/chat/launcher/", origin="http://localhost",
                              unix=True, path=str(launched["socket"])) as ws:
            assert json.loads(await asyncio.wait_for(ws.recv(), 5))["type"] == "history"
            launched["process"].send_signal(signal.SIGTERM)
            started = time.monotonic()
            with pytest.raises(websockets.ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 10)
            return ws.close_code, ws.close_reason, time.monotonic() - started

    code, reason, seconds = asyncio.run(scenario())
    assert (code, reason) == (1012, "service restart")
    assert seconds < 5
    assert launched["process"].wait(timeout=10) == 0


REHOME_WINDOW = 2


@pytest.mark.parametrize("launched", [{"CHAT_REHOME_WINDOW": str(REHOME_WINDOW)}], indirect=True)
def test_sigusr1_tells_the_open_websockets_1012_within_the_window_and_keeps_serving(launched):
    """After an Nginx reload (chat-daphne-rehome): the sockets open then are
    told to reconnect, spread over the window; one opened after is kept."""
    wait_ready(launched)

    async def join(room):
        ws = await ws_connect(f"ws://localhost/ws/chat/{room}/", origin="http://localhost",
                              unix=True, path=str(launched["socket"]))
        assert json.loads(await asyncio.wait_for(ws.recv(), 5))["type"] == "history"
        return ws

    async def closed(ws):
        with pytest.raises(websockets.ConnectionClosed):
            await asyncio.wait_for(ws.recv(), REHOME_WINDOW + 5)
        return ws.close_code, ws.close_reason, time.monotonic() - signalled

    async def scenario():
        nonlocal signalled
        before = [await join(f"rehome-{n}") for n in range(8)]
        launched["process"].send_signal(signal.SIGUSR1)
        signalled = time.monotonic()
        after = await join("rehome-after")
        results = await asyncio.gather(*(closed(ws) for ws in before))
        # Past the window, the socket opened after the signal is still served.
        await asyncio.sleep(max(0, signalled + REHOME_WINDOW + 0.5 - time.monotonic()))
        await after.send(json.dumps({"type": "message", "nickname": "alice", "body": "still here"}))
        while json.loads(await asyncio.wait_for(after.recv(), 5)).get("type") != "message":
            pass
        await after.close()
        return results

    signalled = None
    results = asyncio.run(scenario())
    assert {(code, reason) for code, reason, _ in results} == {(1012, "service restart")}
    moments = sorted(seconds for _, _, seconds in results)
    assert moments[-1] < REHOME_WINDOW + 1, moments
    # Spread, not one burst: 8 draws within 2 s all inside 0.1 s of each other is a 1e-9 chance.
    assert moments[-1] - moments[0] > 0.1, moments
    assert launched["process"].poll() is None, "SIGUSR1 ended the process"
    assert "SIGUSR1: 8 WebSockets told 1012 within 2 s" in launched["log"].read_text()


def test_a_stopping_process_leaves_new_connections_to_the_next_one(launched):
    """A client that reconnects at once, while the old process waits for the
    others to answer its 1012, is served by the next process, not accepted
    and then cut without a close frame when the old one exits."""
    wait_ready(launched)

    async def scenario():
        # A client that never answers the close frame: the old process waits
        # its whole grace time (CHAT_CLOSE_GRACE, 2 s) before it exits.
        reader, writer = await asyncio.open_unix_connection(str(launched["socket"]))
        writer.write(b"GET /ws/chat/stopping/ HTTP/1.1\r\nHost: localhost\r\nOrigin: http://localhost\r\n"
                     b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                     b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
        assert b" 101 " in await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        await asyncio.wait_for(reader.read(1), 5)  # the history frame has begun
        launched["process"].send_signal(signal.SIGTERM)
        # The 1012 frame (opcode 0x88, then the code) says the grace time began.
        data = b""
        while b"\x88" not in data:
            data += await asyncio.wait_for(reader.read(65536), 5)
        # A new client now: with nobody accepting, it waits in the queue.
        joining = asyncio.ensure_future(ws_connect(
            "ws://localhost/ws/chat/stopping/", origin="http://localhost", unix=True,
            path=str(launched["socket"]), open_timeout=30))
        await asyncio.sleep(0.5)
        assert not joining.done(), "the stopping process answered a new handshake"
        assert await asyncio.get_running_loop().run_in_executor(None, launched["process"].wait, 10) == 0
        writer.close()
        launched["launch"]()
        ws = await joining
        assert json.loads(await asyncio.wait_for(ws.recv(), 5))["type"] == "history"
        # Served by the new process: still open after the old one exited.
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(ws.recv(), 1)
        await ws.close()

    asyncio.run(scenario())


def test_the_message_size_limit_holds_for_received_messages_only(launched):
    wait_ready(launched)
    body = "x" * 1000

    async def scenario():
        async with ws_connect("ws://localhost/ws/chat/big-history/", origin="http://localhost",
                              unix=True, path=str(launched["socket"])) as ws:
            await asyncio.wait_for(ws.recv(), 5)
            for _ in range(6):
                await ws.send(json.dumps({"type": "message", "nickname": "n", "body": body}))
                await asyncio.wait_for(ws.recv(), 5)
            # The answer is larger than the limit: it still arrives.
            await ws.send(json.dumps({"type": "history", "since": 0}))
            page = await asyncio.wait_for(ws.recv(), 5)
            assert len(page) > MAX_MESSAGE
            assert [m["seq"] for m in json.loads(page)["messages"]] == [1, 2, 3, 4, 5, 6]
            # A message from the client beyond it still ends the connection.
            await ws.send("y" * (MAX_MESSAGE + 1))
            with pytest.raises(websockets.ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 5)

    asyncio.run(scenario())


@pytest.mark.parametrize("launched", [{"metrics": True}], indirect=True)
def test_serves_its_metrics_on_chat_metrics_listen(launched):
    wait_ready(launched)
    url = launched["metrics"]
    samples = scrape(url)
    assert samples[("chat_release_info", (("interface", "asgi"), ("release", "launcher-test")))] == 1
    assert samples[("chat_websockets_open", ())] == 0
    # prometheus_client's own, of this process.
    assert samples[("process_resident_memory_bytes", ())] > 0

    async def scenario():
        async with ws_connect("ws://localhost/ws/chat/metrics/", origin="http://localhost",
                              unix=True, path=str(launched["socket"])) as ws:
            await asyncio.wait_for(ws.recv(), 5)  # history
            await ws.send(json.dumps({"type": "message", "nickname": "m", "body": "counted"}))
            await asyncio.wait_for(ws.recv(), 5)
            await ws.send("not json")
            await asyncio.wait_for(ws.recv(), 5)
            return await asyncio.get_running_loop().run_in_executor(None, scrape, url)

    during = asyncio.run(scenario())
    assert picked(during, CLIENT_SERIES + [
        ("chat_messages_refused_total", (("reason", "invalid_json"),)),
        ("chat_fanout_delivery_seconds_count", ()),
        ("chat_db_call_seconds_count", (("kind", "write"),)),
    ]) == {
        "chat_websockets_open": 1, "chat_websocket_handshakes_total": 1, "chat_messages_posted_total": 1,
        "chat_messages_stored_total": 1, "chat_messages_refused_total": 1,
        "chat_fanout_delivery_seconds_count": 1, "chat_db_call_seconds_count": 1,
    }
    deadline = time.monotonic() + 5
    while scrape(url)[("chat_websockets_open", ())] != 0:
        assert time.monotonic() < deadline, "the closed socket is still counted"
        time.sleep(0.05)
    # Only /metrics is served there.
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(url.removesuffix("metrics"), timeout=5)
    assert caught.value.code == 404


@pytest.mark.parametrize("launched", [{"CHAT_METRICS_LISTEN": "localhost:9201"}], indirect=True)
def test_a_bad_metrics_address_stops_the_start_with_one_line(launched):
    assert launched["process"].wait(timeout=30) == 1
    log = launched["log"].read_text()
    assert ("chatservice.serve_daphne: CHAT_METRICS_LISTEN='localhost:9201' is not ADDRESS:PORT "
            "with an IP address") in log
    assert "Traceback" not in log


FRAME_CHECK = r"""
import json, sys
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from twisted.internet.testing import StringTransport
from chatservice.serve_daphne import _frames_as_autobahn_would, text_frame

def opened(**options):
    factory = WebSocketServerFactory()
    factory.protocol = WebSocketServerProtocol
    factory.setProtocolOptions(**options)
    protocol = factory.buildProtocol(None)
    protocol.makeConnection(StringTransport())
    protocol.state = protocol.STATE_OPEN
    protocol.transport.clear()
    return protocol

result = {"differ": [], "direct": {}}
for length in (0, 1, 125, 126, 127, 1000, 65535, 65536, 70000):
    for char in ("x", "\u00e9"):
        payload = (char * length).encode("utf8")[:length]
        protocol = opened()
        protocol.sendMessage(payload)
        if protocol.transport.value() != text_frame(payload):
            result["differ"].append([length, char])
plain = opened()
result["direct"]["plain"] = _frames_as_autobahn_would(plain)
result["direct"]["fragmenting"] = _frames_as_autobahn_would(opened(autoFragmentSize=100))
logging = opened()
logging.logFrames = True
result["direct"]["logging frames"] = _frames_as_autobahn_would(logging)
compressing = opened()
compressing._perMessageCompress = object()
result["direct"]["compressing"] = _frames_as_autobahn_would(compressing)
closing = opened()
closing.state = closing.STATE_CLOSING
result["direct"]["closing"] = _frames_as_autobahn_would(closing)
queued = opened()
queued.send_queue.append((b"x", True))
result["direct"]["chopped writes queued"] = _frames_as_autobahn_would(queued)
json.dump(result, sys.stdout)
"""


def checked(script):
    """The JSON that script prints, run in a process of its own: importing
    serve_daphne installs Twisted's asyncio reactor."""
    out = subprocess.run([sys.executable, "-c", script], cwd=APP_DIR, capture_output=True, text=True,
                         timeout=60, env={**os.environ, "SECRET_KEY": "launcher-check"})
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_text_frames_written_directly_are_the_bytes_autobahn_writes():
    result = checked(FRAME_CHECK)
    # Every length class: 7 bits, 16 bits (126), 64 bits (127), and multi-byte characters.
    assert result["differ"] == []
    assert result["direct"] == {"plain": True, "fragmenting": False, "logging frames": False,
                                "compressing": False, "closing": False, "chopped writes queued": False}


SEND_CHECK = r"""
import json, socket, sys
from twisted.internet import tcp
from chatservice.serve_daphne import send_at_once

class Reactor:
    # What Twisted's write asks of the reactor: the loop to watch for writing.
    def __init__(self):
        self.writers = set()
    def addWriter(self, fd):
        self.writers.add(fd)
    def removeWriter(self, fd):
        self.writers.discard(fd)

def pair(sndbuf=None):
    ours, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    if sndbuf:
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    transport = tcp.Connection(ours, None, reactor=Reactor())
    transport.connected = 1
    peer.setblocking(False)
    return transport, peer

def received(peer):
    data = b""
    while True:
        try:
            chunk = peer.recv(1 << 20)
        except BlockingIOError:
            return data
        if not chunk:
            return data
        data += chunk

def flush(transport, peer):
    data = b""
    for _ in range(10000):
        data += received(peer)
        if not transport.reactor.writers:
            return data + received(peer)
        transport.doWrite()
    raise AssertionError("Twisted's buffer never emptied")

result = {}
transport, peer = pair()
send_at_once(transport, b"frame")
result["idle: sent at once"] = received(peer) == b"frame" and not transport.reactor.writers

transport, peer = pair()
transport.write(b"held")
send_at_once(transport, b"frame")
result["held: nothing sent before the held data"] = received(peer) == b""
result["held: in order after a turn"] = flush(transport, peer) == b"heldframe"

transport, peer = pair(sndbuf=4096)
big = bytes(range(256)) * 4096
send_at_once(transport, big)
result["partial: the rest buffered"] = bool(transport.reactor.writers)
send_at_once(transport, b"next")
result["partial: whole and in order"] = flush(transport, peer) == big + b"next"

transport, peer = pair()
transport.disconnecting = True
send_at_once(transport, b"frame")
result["closing: left to Twisted"] = received(peer) == b"" and bool(transport.reactor.writers)

transport, peer = pair()
peer.close()
send_at_once(transport, b"frame")
result["peer gone: no exception, left to Twisted"] = bool(transport.reactor.writers)
json.dump(result, sys.stdout)
"""


def test_frames_go_out_at_once_only_when_nothing_is_held_and_always_in_order():
    result = checked(SEND_CHECK)
    assert result == {name: True for name in result} and len(result) == 7, result
