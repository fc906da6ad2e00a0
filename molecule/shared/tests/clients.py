"""The clients and helpers the checks use, without pytest's hooks and fixtures.

`Edge` reaches the service through Nginx's published port as a browser does
(https, and WebSockets through `WebSocket`); the functions read the scenario's
inventory, run its playbooks and record the figures a run reports.
"""

import json
import os
import re
import shlex
import shutil
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
import uuid

import docker
import pytest
import testinfra
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from websockets.client import ClientProtocol
from websockets.exceptions import ConnectionClosed
from websockets.frames import Opcode
from websockets.http11 import Response
from websockets.protocol import State
from websockets.uri import parse_uri

INVENTORY = os.environ["MOLECULE_INVENTORY_FILE"]
REPO = os.environ["MOLECULE_PROJECT_DIRECTORY"]


class WebSocket:
    """A WebSocket client on one thread, with websockets' sans-I/O protocol.

    websockets' own sync client reads on a background thread while the
    caller writes on the same TLS socket; through Nginx's TLS about one
    handshake in 300 then never saw its 101 (Nginx logged it as sent) and
    blocked for a minute. Reading and writing on one thread avoids that.
    """

    def __init__(self, url, origin, ssl_context, timeout):
        uri = parse_uri(url)
        self.protocol = ClientProtocol(uri, origin=origin)
        self.pending = []
        raw = socket.create_connection((uri.host, uri.port), timeout=timeout)
        self.sock = ssl_context.wrap_socket(raw, server_hostname=uri.host) if uri.secure else raw
        try:
            self.protocol.send_request(self.protocol.connect())
            self._flush()
            deadline = time.monotonic() + timeout
            while self.protocol.state is State.CONNECTING and self.protocol.handshake_exc is None:
                self._read(deadline)
            if self.protocol.handshake_exc is not None:
                raise self.protocol.handshake_exc
            # The handshake's Response is the first event; frames may follow it.
            self.pending = [e for e in self.pending if not isinstance(e, Response)]
        except BaseException:
            self.sock.close()
            raise

    # How a peer that drops the connection shows on the socket: a reset, a
    # write into a closed pipe, or TLS ending without its close_notify (Nginx
    # closing a client whose upstream refused a 64 KiB frame, while the
    # client still writes it, gave SSLEOFError in CI).
    DROPPED = (ConnectionResetError, BrokenPipeError, ssl.SSLEOFError)

    def _flush(self):
        for data in self.protocol.data_to_send():
            if data:
                self.sock.sendall(data)

    def _read(self, deadline):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("no answer from the server in time")
        self.sock.settimeout(remaining)
        try:
            data = self.sock.recv(65536)
        except self.DROPPED:
            data = b""
        if data:
            self.protocol.receive_data(data)
        else:
            self.protocol.receive_eof()
        self.pending += self.protocol.events_received()
        self._flush()
        if not data and self.protocol.state is State.CONNECTING and self.protocol.handshake_exc is None:
            raise ConnectionError("the server closed the connection during the handshake")

    def send(self, text):
        """Send a text message; ConnectionClosed if the server has dropped the connection."""
        self.protocol.send_text(text.encode())
        try:
            self._flush()
        except self.DROPPED:
            self.protocol.receive_eof()
            raise self.protocol.close_exc from None

    def recv(self, timeout=10):
        """The next text or binary message; ConnectionClosed once the server closed."""
        deadline = time.monotonic() + timeout
        while True:
            while self.pending:
                frame = self.pending.pop(0)
                if frame.opcode in (Opcode.TEXT, Opcode.BINARY):
                    return frame.data.decode() if frame.opcode is Opcode.TEXT else frame.data
            if self.protocol.state is State.CLOSED:
                raise self.protocol.close_exc
            if self.protocol.close_rcvd is not None:
                # The server's close frame came; its TCP close may not have yet
                # (close_exc is only defined once CLOSED).
                sent = self.protocol.close_sent
                raise ConnectionClosed(self.protocol.close_rcvd, sent, True if sent is not None else None)
            self._read(deadline)

    def close(self):
        try:
            if self.protocol.state is State.OPEN:
                self.protocol.send_close(1000)
                self._flush()
            deadline = time.monotonic() + 2
            while self.protocol.state is not State.CLOSED and time.monotonic() < deadline:
                self._read(deadline)
        except (OSError, TimeoutError):
            pass
        finally:
            self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Edge:
    """The service as a client sees it: Nginx's https on 127.0.0.1:<published port>.

    Clients use the name localhost (which resolves to 127.0.0.1 only here):
    a client sends no SNI for an IP address, and the catch-all server refuses
    a TLS handshake without a name. The host's certificate is trusted by
    pinning it (`cadata`), so name and chain are still verified.
    """

    def __init__(self, http_port, tls_port, certificate_pem):
        self.http_port, self.tls_port = int(http_port), int(tls_port)
        self.base = f"https://localhost:{tls_port}"
        self.ws_base = f"wss://localhost:{tls_port}"
        self.http_base = f"http://localhost:{http_port}"
        self.certificate_pem = certificate_pem
        self.ssl = self.ssl_context()
        # AllowedHostsOriginValidator answers a handshake without a matching
        # Origin with 403, so clients send the site's own origin.
        self.origin = self.base
        self._opener = urllib.request.build_opener(urllib.request.HTTPSHandler(context=self.ssl))

    def ssl_context(self):
        """A fresh client context that trusts the host's certificate only."""
        return ssl.create_default_context(cadata=self.certificate_pem)

    def request(self, url, method="GET", headers=None, timeout=10):
        """One request to a full URL; returns (status, headers, body), no exception on 4xx/5xx."""
        req = urllib.request.Request(url, method=method, headers=headers or {})
        try:
            with self._opener.open(req, timeout=timeout) as response:
                return response.status, response.headers, response.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.headers, error.read().decode()

    def get(self, path, timeout=10):
        """GET path over https; returns (status, body) without raising on 4xx/5xx."""
        status, _, body = self.request(self.base + path, timeout=timeout)
        return status, body

    def get_json(self, path):
        status, body = self.get(path)
        return status, json.loads(body)

    def websocket(self, path, origin=None, timeout=10):
        return WebSocket(self.ws_base + path, origin or self.origin, self.ssl, timeout)

    def receive(self, ws, timeout=10):
        return json.loads(ws.recv(timeout=timeout))

    def healthy_once(self):
        """One HTTP health check and one WebSocket health check, both through Nginx."""
        status, body = self.get("/healthz", timeout=5)
        assert status == 200, f"/healthz answered {status}: {body[:200]}"
        with self.websocket("/ws/health/", timeout=5) as ws:
            assert self.receive(ws, timeout=5)["interface"] == "asgi"

    def wait_healthy(self, timeout=60, in_a_row=10):
        """Wait until both halves answer `in_a_row` times running.

        Several in a row, because each Nginx worker and each upstream server
        answers on its own: one success proves only one path.
        """
        deadline = time.monotonic() + timeout
        streak, last = 0, None
        while streak < in_a_row:
            if time.monotonic() > deadline:
                pytest.fail(f"the service did not become healthy in {timeout} s: {last}")
            try:
                self.healthy_once()
                streak += 1
            except Exception as error:  # any failure means: not up yet
                streak, last = 0, repr(error)
                time.sleep(1)


def groups_of(host):
    """The inventory groups the host is in (web, app, redis, db)."""
    return set(host.ansible.get_variables()["group_names"])


def inventory_groups(host):
    """Every group of the inventory, with its hosts."""
    return host.ansible.get_variables()["groups"]


def static_manifest(host):
    """collectstatic's manifest where this web host's Nginx serves static files from."""
    for folder in ("/srv/chat/current/staticfiles", "/srv/chat/static"):
        if host.file(f"{folder}/staticfiles.json").exists:
            return json.loads(host.file(f"{folder}/staticfiles.json").content_string)
    pytest.fail("no staticfiles.json on the host")


def _published_port(container_name, port):
    container = docker.from_env().containers.get(container_name)
    return container.ports[port][0]["HostPort"]


def inventory_host(name):
    """A host of the scenario's inventory, by name, for checks that span hosts."""
    return testinfra.get_host(f"ansible://{name}?ansible_inventory={INVENTORY}")


def edge_of(web_host):
    """A web host's Nginx, as published on 127.0.0.1."""
    name = web_host.backend.get_hostname()
    certificate = web_host.file("/etc/chat/tls/chat.crt").content_string
    return Edge(_published_port(name, "80/tcp"), _published_port(name, "443/tcp"), certificate)


# The measured figures, printed by conftest's pytest_terminal_summary.
REPORTS = []


def report(line):
    """A measured figure, printed in the run's summary (pytest captures print())."""
    REPORTS.append(line)


def on_one_release(variable, default, what):
    """A pytestmark for checks that take minutes: they run in the default
    scenario on one Debian release only (variable, an environment variable,
    chooses it; the checks of the other release's run cover the rest)."""
    scenario = os.path.basename(os.environ.get("MOLECULE_SCENARIO_DIRECTORY", ""))
    wanted = os.environ.get(variable, default)
    suite = os.environ.get("CHAT_HOST_SUITE", "bookworm")
    return pytest.mark.skipif(
        scenario != "default" or suite != wanted,
        reason=f"SKIPPED: {what} run in the default scenario on {wanted} only "
               f"(this is {scenario} on {suite}; {variable} chooses)")


def playbook_command(playbook, *args):
    return ["ansible-playbook", os.path.join(REPO, playbook), "-i", INVENTORY, *args]


def playbook_env(**extra):
    """Output the tests can search: no colours, results as JSON (not wrapped YAML)."""
    return {**os.environ, "ANSIBLE_NOCOLOR": "1", "ANSIBLE_FORCE_COLOR": "0",
            "ANSIBLE_CALLBACK_RESULT_FORMAT": "json", **extra}


def inventory_value(host_name, variable):
    """A variable as Ansible resolves it for host_name (secrets decrypted from a vault)."""
    result = subprocess.run(
        ["ansible", host_name, "-i", INVENTORY, "-m", "ansible.builtin.debug", "-a", f"var={variable}"],
        cwd=REPO, env=playbook_env(ANSIBLE_LOAD_CALLBACK_PLUGINS="1", ANSIBLE_STDOUT_CALLBACK="json"),
        capture_output=True, text=True, timeout=120, check=True)
    # The scenario's timer callbacks print after the JSON document: read it alone.
    document, _ = json.JSONDecoder().raw_decode(result.stdout[result.stdout.index("{"):])
    return document["plays"][0]["tasks"][0]["hosts"][host_name][variable]


def run_playbook(playbook, *args, timeout=900, env=None):
    """ansible-playbook against the scenario's hosts, as Molecule's converge runs it.

    playbook is relative to the repository (site.yml, playbooks/deploy.yml).
    Returns the CompletedProcess, with the run's duration as .seconds.
    """
    started = time.monotonic()
    # Ansible writes failures to stderr: one stream keeps them in order.
    result = subprocess.run(playbook_command(playbook, *args), cwd=REPO, env=playbook_env(**(env or {})),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            timeout=timeout)
    result.seconds = time.monotonic() - started
    return result


def why_failed(result, tail=3000):
    """An assertion's message for a failed ansible-playbook run: every failed task first, in the
    order they failed, with its host and message, then the run's last lines. The first failure
    is the cause; the CI digest shows only a message's first line, and a task that printed much
    after it (a rescue's report) once pushed it out of the run's last 3,000 characters."""
    failures, task = [], "?"
    for line in result.stdout.splitlines():
        if line.startswith("TASK ["):
            task = line[len("TASK ["):line.rfind("]")]
        match = re.match(r"(?:fatal|failed): \[([^\]]+)\].*?=> (\{.*)", line)
        if match:
            try:
                document = json.loads(match.group(2))
                message = str(document.get("msg") or document.get("stderr") or document.get("stdout") or "")
            except ValueError:
                message = match.group(2)
            failures.append(f"[{match.group(1)}] {task}: {' '.join(message.split())[:500]}")
    return (f"ansible-playbook exited {result.returncode}; failed: " + " | then ".join(failures or ["(no task)"])
            + "\n--- the run's last lines:\n" + result.stdout[-tail:])


def changed_per_host(output):
    """From an ansible-playbook run's recap: {host: number of changed tasks}."""
    return {host: int(changed) for host, changed in
            re.findall(r"^(\S+)\s+: ok=\d+\s+changed=(\d+)", output, re.MULTILINE)}


def app_copy(tmp_path, name, change=None):
    """A copy of app/ to ship as another release; change(path) edits it."""
    target = tmp_path / name
    shutil.copytree(os.path.join(REPO, "app"), target, ignore=shutil.ignore_patterns(
        ".venv*", "__pycache__", "*.pyc", ".pytest_cache", "staticfiles", "db.sqlite3*"))
    # Any new file makes a new release id; the lock file stays the same.
    (target / "DEPLOY_MARK").write_text(f"{name} {time.time()}\n")
    if change:
        change(target)
    return target


def public_key(certificate_der):
    """The public key a certificate (DER) carries, as DER: what a key rotation changes."""
    return x509.load_der_x509_certificate(certificate_der).public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def wait(condition, timeout, what, interval=3, explain=None):
    """Seconds until CONDITION() is true, and its result; fails the check after TIMEOUT seconds,
    with what EXPLAIN() then returns (the state a CI log needs to name the cause)."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        result = condition()
        if result:
            return time.monotonic() - started, result
        time.sleep(interval)
    pytest.fail(f"{what}: not within {timeout} s" + (f"; {explain()}" if explain else ""))


REACH = """
import concurrent.futures, socket, sys
def reach(target):
    address, port = target.rsplit(":", 1)
    try:
        socket.create_connection((address, int(port)), timeout=3).close()
        return "1"
    except OSError:
        return "0"
with concurrent.futures.ThreadPoolExecutor(32) as pool:
    print("".join(pool.map(reach, sys.argv[1:])))
"""


def tcp_reachable(host, targets):
    """{(address, port): whether host can open a TCP connection to it}, asked all at once (3 s at most)."""
    targets = list(targets)
    answer = host.check_output("python3 -c %s " + " ".join(["%s"] * len(targets)), REACH,
                               *[f"{address}:{port}" for address, port in targets])
    return {target: flag == "1" for target, flag in zip(targets, answer)}


def tcp_open(host, address, port):
    """Whether host can open a TCP connection to address:port (3 s at most)."""
    return host.run("timeout 3 bash -c %s", f"</dev/tcp/{address}/{port}").rc == 0


def post_probe(edge, room, timeout=60):
    """Posts one message through a fresh socket, retrying until it is echoed; returns its seq."""
    deadline = time.monotonic() + timeout
    body = f"probe {uuid.uuid4().hex}"
    # As the page's outbox does: a resend of a post that got no answer in
    # time (stored meanwhile) is recognised by its client_id, not stored twice.
    client_id = uuid.uuid4().hex
    last = None
    while time.monotonic() < deadline:
        try:
            with edge.websocket(f"/ws/chat/{room}/", timeout=10) as ws:
                edge.receive(ws)  # the join history
                ws.send(json.dumps({"type": "message", "nickname": "probe", "body": body, "client_id": client_id}))
                while True:
                    frame = edge.receive(ws, timeout=10)
                    messages = frame.get("messages", [frame])
                    for message in messages:
                        if message.get("body") == body:
                            return message["seq"]
                    if frame["type"] == "error":
                        raise AssertionError(f"probe refused: {frame}")
        except (OSError, TimeoutError, ConnectionClosed, AssertionError) as error:
            last = error
            time.sleep(0.5)
    raise AssertionError(f"no message could be posted in {timeout} s: {last!r}")


def stored_messages(host, room):
    """Every message of the room as the database holds it, {seq: body}.

    Read by the app's own manage.py on an app host (SQLite or PostgreSQL
    alike), not through the service: a check of "nothing lost" must not
    trust the code it checks.
    """
    query = ("import json; from chat.models import Message; print(json.dumps(list("
             f"Message.objects.filter(room__name={room!r}).order_by('seq').values_list('seq', 'body'))))")
    out = host.check_output(f"chat-manage shell -c {shlex.quote(query)}")
    # The app's log lines share stdout: on Debian 13 psycopg's pool warns at
    # exit, after the answer.
    return dict(json.loads(next(line for line in reversed(out.splitlines()) if line.startswith("["))))
