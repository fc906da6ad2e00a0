"""HTTPS at the edge: protocols, ALPN, HSTS, http only redirects, wss, Django's view of it."""

import http.client
import json
import socket
import ssl
import uuid

import pytest

from clients import static_manifest


def handshake(edge, context, server_name="localhost"):
    """One TLS handshake with Nginx's https port; returns the TLS socket's facts."""
    with socket.create_connection(("127.0.0.1", edge.tls_port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname=server_name) as tls:
            return tls.version(), tls.selected_alpn_protocol()


def pinned_context(edge, version):
    context = edge.ssl_context()
    context.minimum_version = context.maximum_version = version
    return context


@pytest.mark.parametrize(("version", "name"), [
    (ssl.TLSVersion.TLSv1_2, "TLSv1.2"),
    (ssl.TLSVersion.TLSv1_3, "TLSv1.3"),
])
def test_modern_tls_versions_accepted(edge, version, name):
    negotiated, _ = handshake(edge, pinned_context(edge, version))
    print(f"offered only {name}: negotiated {negotiated}")
    assert negotiated == name


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1])
def test_old_tls_versions_refused_by_the_server(edge, version):
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    # The client's own library refuses these versions at its default
    # security level; level 0 lets it offer them, so the refusal is Nginx's.
    context.set_ciphers("ALL:@SECLEVEL=0")
    context.minimum_version = context.maximum_version = version
    with pytest.raises(ssl.SSLError) as refused:
        handshake(edge, context)
    print(f"offered only {version.name}: {refused.value}")
    # An alert from the server, not "no protocols available" on our side.
    assert refused.value.reason == "TLSV1_ALERT_PROTOCOL_VERSION", refused.value


def test_alpn_negotiates_http2(edge):
    context = edge.ssl_context()
    context.set_alpn_protocols(["h2", "http/1.1"])
    version, protocol = handshake(edge, context)
    print(f"ALPN h2,http/1.1 offered: {protocol} over {version}")
    assert protocol == "h2"


@pytest.mark.parametrize("path", ["/", "/healthz", "/ws/health/", "/no-such-page/"])
def test_hsts_on_every_response(edge, path):
    status, headers, _ = edge.request(edge.base + path)
    hsts = headers.get_all("Strict-Transport-Security")
    print(f"{path}: {status}, Strict-Transport-Security: {hsts}")
    assert hsts == ["max-age=63072000; includeSubDomains"], "one HSTS header, from Nginx"


def test_hsts_on_static_files(edge, host):
    manifest = static_manifest(host)
    hashed = next(iter(manifest["paths"].values()))
    status, headers, _ = edge.request(f"{edge.base}/static/{hashed}")
    assert status == 200
    assert headers["Strict-Transport-Security"].startswith("max-age=")


def http_get(edge, path, host="localhost"):
    """A plain-HTTP GET on port 80 that does not follow redirects."""
    connection = http.client.HTTPConnection("127.0.0.1", edge.http_port, timeout=10)
    try:
        connection.request("GET", path, headers={"Host": f"{host}:{edge.http_port}"})
        response = connection.getresponse()
        return response.status, response.getheader("Location"), response.read().decode()
    finally:
        connection.close()


@pytest.mark.parametrize("path", ["/", "/chat/lobby/?x=1", "/ws/health/", "/healthz"])
def test_http_only_redirects_to_https(edge, path):
    status, location, _ = http_get(edge, path)
    assert status == 301
    assert location == f"{edge.base}{path}"


def test_http_serves_acme_challenges(edge, host):
    token = uuid.uuid4().hex
    path = f"/var/www/acme/.well-known/acme-challenge/{token}"
    host.run_expect([0], f"echo {token}.proof > {path}")
    try:
        status, location, body = http_get(edge, f"/.well-known/acme-challenge/{token}")
    finally:
        host.run(f"rm -f {path}")
    assert (status, location, body.strip()) == (200, None, f"{token}.proof")


def test_websocket_exchange_over_wss(edge):
    assert edge.ws_base.startswith("wss://")
    room = f"wss-{uuid.uuid4().hex[:8]}"
    with edge.websocket(f"/ws/chat/{room}/") as alice, edge.websocket(f"/ws/chat/{room}/") as bob:
        assert edge.receive(alice)["type"] == "history"
        assert edge.receive(bob)["type"] == "history"
        alice.send(json.dumps({"type": "message", "nickname": "alice", "body": "over tls"}))
        assert edge.receive(bob)["body"] == "over tls"


def test_django_sees_https(edge):
    """Django redirects any request it takes for plain http (SECURE_SSL_REDIRECT):
    a 200 through Nginx's https means X-Forwarded-Proto told it https."""
    status, _, body = edge.request(edge.base + "/")
    assert status == 200, body[:200]


@pytest.mark.needs("web", "app")
def test_django_redirects_what_claims_plain_http(host):
    """Behind the proxy, a request that says it came over http is sent to https."""
    out = host.check_output(
        "curl -s -o /dev/null -w '%{http_code} %{redirect_url}' --unix-socket /run/chat/gunicorn.sock "
        "-H 'Host: localhost' -H 'X-Forwarded-Proto: http' http://localhost/healthz")
    assert out.startswith("301 https://localhost/healthz"), out


@pytest.mark.needs("app")
def test_deploy_check_is_clean(host):
    result = host.run("chat-manage check --deploy --fail-level WARNING")
    print(result.stdout + result.stderr)
    assert result.rc == 0
    assert "no issues" in result.stdout
