"""Names the site does not serve, and origins it does not trust, stop at the edge."""

import base64
import http.client
import os
import socket
import ssl
import time
import uuid

import pytest
from websockets.exceptions import InvalidStatus

FOREIGN = "evil.example"


def host_time(host):
    """The host's clock in whole seconds, for `journalctl --since @N`."""
    return int(host.check_output("date +%s"))


def app_journal_since(host, since):
    return host.check_output(f"journalctl -u 'chat-*' --since @{since} --no-pager -o cat")


def raw_websocket_handshake(edge, host_header):
    """A WebSocket handshake over TLS (SNI localhost) with any Host header.

    Returns the first bytes of the answer; b"" when Nginx closed without one.
    """
    key = base64.b64encode(os.urandom(16)).decode()
    request = (
        f"GET /ws/health/ HTTP/1.1\r\nHost: {host_header}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
        f"Origin: {edge.origin}\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", edge.tls_port), timeout=10) as raw:
        with edge.ssl_context().wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(request.encode())
            try:
                return tls.recv(200)
            except ConnectionResetError:
                return b""


def test_websocket_handshake_control_with_the_sites_host(edge):
    assert raw_websocket_handshake(edge, f"localhost:{edge.tls_port}").startswith(b"HTTP/1.1 101")


@pytest.mark.needs("web", "app")
def test_foreign_hosts_never_reach_the_app(host, edge):
    since = host_time(host)

    # Plain HTTP on port 80: closed without an answer (444).
    connection = http.client.HTTPConnection("127.0.0.1", edge.http_port, timeout=10)
    with pytest.raises((http.client.RemoteDisconnected, ConnectionResetError)):
        connection.request("GET", "/", headers={"Host": FOREIGN})
        connection.getresponse()
    connection.close()

    # TLS with the foreign name: no handshake, no certificate shown.
    with pytest.raises(ssl.SSLError) as refused:
        with socket.create_connection(("127.0.0.1", edge.tls_port), timeout=10) as raw:
            ssl.create_default_context().wrap_socket(raw, server_hostname=FOREIGN)
    print(f"TLS handshake for {FOREIGN}: {refused.value}")

    # TLS for the site, then a request for another name: closed (444).
    connection = http.client.HTTPSConnection("localhost", edge.tls_port, timeout=10, context=edge.ssl_context())
    with pytest.raises((http.client.RemoteDisconnected, ConnectionResetError)):
        connection.request("GET", "/", headers={"Host": FOREIGN})
        connection.getresponse()
    connection.close()

    # A WebSocket handshake with a valid Origin but a foreign Host.
    assert raw_websocket_handshake(edge, FOREIGN) == b""

    # The site's name in the request line (absolute form), a foreign Host:
    # Nginx routes by the request line, and the app must see that name too.
    with socket.create_connection(("127.0.0.1", edge.tls_port), timeout=10) as raw:
        with edge.ssl_context().wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(f"GET https://localhost:{edge.tls_port}/healthz HTTP/1.1\r\nHost: {FOREIGN}\r\n"
                        "Connection: close\r\n\r\n".encode())
            answer = tls.recv(200)
    assert answer.startswith(b"HTTP/1.1 200"), answer

    # Control and marker: a foreign name sent to Gunicorn's socket directly,
    # bypassing Nginx, is logged. Once it shows, everything before it has
    # reached the journal too, so its absence below is not a matter of time.
    marker = f"marker-{uuid.uuid4().hex[:8]}.invalid"
    host.run("curl -s -o /dev/null --unix-socket /run/chat/gunicorn.sock "
             f"-H 'Host: {marker}' -H 'X-Forwarded-Proto: https' http://x/")
    deadline = time.monotonic() + 30
    while marker not in (journal := app_journal_since(host, since)):
        assert time.monotonic() < deadline, "the control request never reached the journal"
        time.sleep(1)
    assert FOREIGN not in journal, journal[-2000:]
    disallowed = [line for line in journal.splitlines() if "DisallowedHost" in line]
    assert all(marker in line for line in disallowed), disallowed


@pytest.mark.parametrize("origin", [
    "http://localhost:{tls}",  # wrong scheme
    "https://localhost:{http}",  # wrong port
    "https://localhost",  # default port 443: not the published one
    "https://evil.example:{tls}",
])
def test_websocket_origin_must_match_exactly(edge, origin):
    origin = origin.format(tls=edge.tls_port, http=edge.http_port)
    with pytest.raises(InvalidStatus) as refused:
        edge.websocket("/ws/health/", origin=origin)
    assert refused.value.response.status_code == 403
