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


class SentinelCluster:
    """Two redis-servers (a master and its replica) and three sentinels (quorum 2) on 127.0.0.1.

    As a deployment would have them: the data nodes ask for a password, the
    sentinels too, and the app reaches the sentinels as an ACL user allowed
    nothing but SENTINEL MASTERS (what redis-py asks to find the master).
    The sentinels call a master down after 1 s without an answer.
    """

    MASTER_NAME = "chat"
    DATA_PASSWORD = "data-s3cret"
    ADMIN_PASSWORD = "sentinel-admin"
    APP_USER, APP_PASSWORD = "chat-app", "sentinel-s3cret"

    def __init__(self, workdir):
        self.workdir = workdir
        self.server = shutil.which("redis-server")
        if self.server is None:
            pytest.skip("redis-server is not on PATH (with TEST_REDIS_URL): the Sentinel tests need their own")
        self.processes = {}  # (host, port) -> Popen
        self.data_nodes = [("127.0.0.1", free_port()) for _ in range(2)]
        self.sentinels = [("127.0.0.1", free_port()) for _ in range(3)]

    def _spawn(self, address, args):
        log = open(self.workdir / f"{address[1]}.log", "w")
        with log:
            self.processes[address] = subprocess.Popen([self.server, *args], stdout=log, stderr=subprocess.STDOUT)

    def start(self):
        master = self.data_nodes[0]
        for address in self.data_nodes:
            replica_of = [] if address == master else ["--replicaof", *map(str, master)]
            self._spawn(address, [
                "--bind", "127.0.0.1", "--port", str(address[1]), "--save", "", "--appendonly", "no",
                "--dir", str(self.workdir), "--requirepass", self.DATA_PASSWORD,
                # A demoted master becomes a replica of the new one and must log in to it.
                "--masterauth", self.DATA_PASSWORD,
                # Redis 7 waits 5 s for more replicas before a first sync by default.
                "--repl-diskless-sync-delay", "0", *replica_of])
            self._wait(lambda address=address: self._ask(address, "PING"), 10, f"{address} did not answer")
        # In sync before the sentinels start: a failover promotes only a replica in sync.
        self._wait(lambda: self._ask(self.data_nodes[1], "INFO", "replication")["master_link_status"] == "up",
                   10, "the replica did not sync")
        ids = {address: uuid.uuid4().hex + uuid.uuid4().hex[:8] for address in self.sentinels}
        for address in self.sentinels:
            config = self.workdir / f"sentinel-{address[1]}.conf"
            config.write_text("\n".join([
                "bind 127.0.0.1", f"port {address[1]}", f"dir {self.workdir}",
                f"sentinel myid {ids[address]}",
                f"sentinel monitor {self.MASTER_NAME} {master[0]} {master[1]} 2",
                # Known from the start, rather than found in 2 to 10 s (hello
                # messages, the master's INFO): a failover needs both.
                f"sentinel known-replica {self.MASTER_NAME} {self.data_nodes[1][0]} {self.data_nodes[1][1]}",
                *[f"sentinel known-sentinel {self.MASTER_NAME} {other[0]} {other[1]} {ids[other]}"
                  for other in self.sentinels if other != address],
                f"sentinel auth-pass {self.MASTER_NAME} {self.DATA_PASSWORD}",
                f"sentinel down-after-milliseconds {self.MASTER_NAME} 1000",
                f"sentinel failover-timeout {self.MASTER_NAME} 3000",
                # The sentinels' default user has a password, which they give each other.
                f"requirepass {self.ADMIN_PASSWORD}", f"sentinel sentinel-pass {self.ADMIN_PASSWORD}",
                f"user {self.APP_USER} on >{self.APP_PASSWORD} -@all +sentinel|masters",
                "",
            ]))
            self._spawn(address, [str(config), "--sentinel"])
        self.wait_until_ready()
        return self

    def stop(self):
        # SIGKILL, not SIGTERM: nothing here is worth a clean shutdown, and a
        # Redis 7 master waits up to shutdown-timeout for its replicas.
        for process in self.processes.values():
            if process.poll() is None:
                process.kill()
            process.wait()

    def client(self, address, **options):
        password = self.ADMIN_PASSWORD if address in self.sentinels else self.DATA_PASSWORD
        return redis.Redis(*address, password=password, socket_timeout=2, socket_connect_timeout=2,
                           decode_responses=True, **options)

    def env(self):
        """The app's environment for this cluster (REDIS_URL's host and port are not used)."""
        return {
            "REDIS_URL": f"redis://:{self.DATA_PASSWORD}@unused.invalid:1/0",
            "REDIS_SENTINELS": ",".join(f"{host}:{port}" for host, port in self.sentinels),
            "REDIS_SENTINEL_MASTER": self.MASTER_NAME,
            "REDIS_SENTINEL_USERNAME": self.APP_USER,
            "REDIS_SENTINEL_PASSWORD": self.APP_PASSWORD,
        }

    def settings(self):
        """The same, as Django settings (what override_settings takes)."""
        env = self.env()
        return {
            "REDIS_URL": env["REDIS_URL"], "REDIS_SENTINELS": self.sentinels,
            "REDIS_SENTINEL_MASTER": self.MASTER_NAME,
            "REDIS_SENTINEL_USERNAME": self.APP_USER, "REDIS_SENTINEL_PASSWORD": self.APP_PASSWORD,
        }

    def _ask(self, address, *command):
        with contextlib.closing(self.client(address)) as client:
            return client.execute_command(*command)

    def named_masters(self):
        """The master each sentinel names now (None where one does not answer)."""
        named = []
        for sentinel in self.sentinels:
            try:
                host, port = self._ask(sentinel, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.MASTER_NAME)
                named.append((host, int(port)))
            except (redis.RedisError, TypeError, ValueError):
                named.append(None)
        return named

    def master(self):
        [master] = set(self.named_masters())
        return master

    def _wait(self, condition, timeout, what):
        deadline = time.monotonic() + timeout
        while True:
            try:
                if condition():
                    return
            except redis.RedisError:
                pass
            if time.monotonic() > deadline:
                logs = {path.name: path.read_text()[-2000:] for path in self.workdir.glob("*.log")}
                raise AssertionError(f"{what} within {timeout} s; logs: {logs}")
            time.sleep(0.05)

    def wait_until_ready(self, timeout=20):
        """Until every sentinel knows the master, its replica (in sync) and the two other sentinels,
        which a failover needs (the vote, and a replica to promote)."""
        def ready():
            for sentinel in self.sentinels:
                with contextlib.closing(self.client(sentinel)) as client:
                    state = client.sentinel_master(self.MASTER_NAME)
                    replicas = client.sentinel_slaves(self.MASTER_NAME)
                if (not state["is_master"] or state["is_sdown"] or int(state["num-other-sentinels"]) != 2
                        or len(replicas) != 1 or replicas[0]["is_sdown"]
                        or replicas[0]["master-link-status"] != "ok"):
                    return False
            return True

        self._wait(ready, timeout, "the sentinels did not see the master, its replica and each other")

    def _wait_for_new_master(self, old, started, timeout):
        def promoted():
            named = self.named_masters()
            return (len(set(named)) == 1 and named[0] not in (None, old)
                    and self._ask(named[0], "ROLE")[0] == "master")

        self._wait(promoted, timeout, "the sentinels did not agree on a new master")
        return time.monotonic() - started

    def failover(self, timeout=15):
        """SENTINEL FAILOVER; returns the seconds until every sentinel names the promoted replica."""
        old = self.master()
        started = time.monotonic()
        self._ask(self.sentinels[0], "SENTINEL", "FAILOVER", self.MASTER_NAME)
        return self._wait_for_new_master(old, started, timeout)

    def kill_master(self, timeout=20):
        """SIGKILL to the master; returns the seconds until every sentinel names the promoted replica."""
        old = self.master()
        started = time.monotonic()
        self.processes[old].kill()
        self.processes[old].wait()
        return self._wait_for_new_master(old, started, timeout)


@pytest.fixture
def sentinel_cluster(tmp_path):
    """A fresh SentinelCluster for one test (a failover changes it for good)."""
    cluster = SentinelCluster(tmp_path)
    try:
        yield cluster.start()
    finally:
        cluster.stop()


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
