import contextlib
import os
import shutil
import socket
import subprocess
import time
import uuid

import pytest
import redis
from channels.layers import channel_layers
from channels.testing import WebsocketCommunicator
from django.test import override_settings

from chatservice.layers import build_channel_layers

ORIGIN = (b"origin", b"http://localhost")
HOST = (b"host", b"localhost")


def stop(process):
    """Stop a child process by its PID: politely, then for sure."""
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_redis(url, timeout=10):
    client = redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1)
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                client.ping()
                return
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
    finally:
        client.close()


@contextlib.contextmanager
def redis_server(workdir, *extra_args):
    """A throwaway redis-server on a free 127.0.0.1 port; yields its URL."""
    server = shutil.which("redis-server")
    if server is None:
        pytest.exit("redis-server is not on PATH; install it or set TEST_REDIS_URL", returncode=3)
    port = free_port()
    process = subprocess.Popen(
        [server, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no",
         "--dir", str(workdir), *extra_args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    password = extra_args[extra_args.index("--requirepass") + 1] if "--requirepass" in extra_args else ""
    url = f"redis://:{password}@127.0.0.1:{port}/0" if password else f"redis://127.0.0.1:{port}/0"
    try:
        wait_for_redis(url)
        yield url
    finally:
        stop(process)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    """TEST_REDIS_URL if given, else a private redis-server for the session."""
    given = os.environ.get("TEST_REDIS_URL")
    if given:
        yield given
        return
    with redis_server(tmp_path_factory.mktemp("redis")) as url:
        yield url


def layers_for(redis_url, kind):
    """CHANNEL_LAYERS exactly as settings would build them from this environment."""
    saved = {name: os.environ.get(name) for name in ("REDIS_URL", "CHANNEL_LAYER")}
    os.environ.update(REDIS_URL=redis_url, CHANNEL_LAYER=kind)
    try:
        return build_channel_layers()
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture(scope="session", autouse=True)
def use_test_redis(redis_url):
    # override_settings announces the change, which makes channels drop any
    # channel layer it had built from the old configuration.
    with override_settings(REDIS_URL=redis_url, CHANNEL_LAYERS=layers_for(redis_url, "core")):
        yield


@pytest.fixture(params=["core", "pubsub"])
def layer_kind(request, redis_url):
    """Runs a test once per CHANNEL_LAYER value."""
    with override_settings(CHANNEL_LAYERS=layers_for(redis_url, request.param)):
        yield request.param


@pytest.fixture
async def close_layers():
    """Closes the channel layer's Redis pools while this test's event loop still runs."""
    yield
    for layer in list(channel_layers.backends.values()):
        if hasattr(layer, "flush"):
            await layer.flush()
    channel_layers.backends = {}


@pytest.fixture
def room():
    """A fresh room name, so tests never see each other's groups or messages."""
    return f"room-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def asgi_app():
    from chatservice.asgi import application

    return application


@pytest.fixture
async def connect(asgi_app, close_layers):
    """Opens WebSocket communicators; disconnects them all at the end."""
    opened = []

    async def _connect(path, headers=(ORIGIN, HOST)):
        communicator = WebsocketCommunicator(asgi_app, path, headers=list(headers))
        connected, _ = await communicator.connect(timeout=5)
        assert connected, f"handshake to {path} refused"
        opened.append(communicator)
        return communicator

    yield _connect
    # Before close_layers: consumers leave their groups while Redis is reachable.
    for communicator in opened:
        await communicator.disconnect(timeout=5)


@pytest.fixture
def join(connect):
    """Connects to a chat room and consumes the history frame sent on joining."""

    async def _join(room_name):
        communicator = await connect(f"/ws/chat/{room_name}/")
        frame = await communicator.receive_json_from(timeout=5)
        assert frame["type"] == "history"
        return communicator, frame["messages"]

    return _join


async def receive_messages(communicator, count, timeout=5):
    """Reads frames until `count` messages came, flattening batches; returns (messages, frames)."""
    messages, frames = [], []
    while len(messages) < count:
        frame = await communicator.receive_json_from(timeout=timeout)
        frames.append(frame)
        if frame["type"] == "batch":
            messages.extend(frame["messages"])
        elif frame["type"] == "message":
            messages.append(frame)
        else:
            raise AssertionError(f"unexpected frame {frame}")
    return messages, frames


def sample(name, **labels):
    """A metric's value in this process's registry (chat/metrics.py); 0 for a series not there yet."""
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value(name, labels) or 0.0


def scrape(url, timeout=5):
    """The samples a /metrics endpoint serves: {(name, ((label, value), ...)): value}."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=timeout) as response:
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


# The series one client's socket and post move, as scrape() keys them.
CLIENT_SERIES = [
    ("chat_websockets_open", ()),
    ("chat_websocket_handshakes_total", (("outcome", "accepted"),)),
    ("chat_messages_posted_total", ()),
    ("chat_messages_stored_total", ()),
]


def picked(samples, series):
    """{name: value} of the given (name, labels) series of a scrape()."""
    return {name: samples[(name, labels)] for name, labels in series}
