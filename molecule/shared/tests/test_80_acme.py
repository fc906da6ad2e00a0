"""The acme certificate source: issued by an ACME CA, served on 443, renewed and its key rotated
(playbooks/rotate.yml -e chat_rotate_tls_key=true) without a failed request.

Only the acme scenario has a CA to ask (Debian's pebble on a second host,
which validates HTTP-01 for real through Nginx's port 80); elsewhere these
are skipped. The site's name (chat.acme.test) resolves on the scenario's
network only, so clients here reach the published https port on 127.0.0.1
and send that name as SNI and Host, trusting only pebble's root.
"""

import socket
import ssl
import threading
import time

import pytest
from clients import _published_port, public_key, report, run_playbook, why_failed

NAME = "chat.acme.test"
LIVE = f"/etc/letsencrypt/live/{NAME}"


@pytest.fixture(scope="module", autouse=True)
def acme_source(host):
    if host.ansible.get_variables().get("chat_tls_certificate_source") != "acme":
        pytest.skip("SKIPPED: only the acme scenario has an ACME CA to ask")


@pytest.fixture(scope="module")
def pebble_root(host):
    """The root pebble signs with (made anew each time pebble starts)."""
    return host.check_output("curl --fail --silent https://pebble.acme.test:15000/roots/0")


@pytest.fixture(scope="module")
def site(host, pebble_root):
    return Site(int(_published_port(host.backend.get_hostname(), "443/tcp")), pebble_root)


class Site:
    """HTTPS to the chat host as a client of chat.acme.test that trusts pebble's root only."""

    def __init__(self, tls_port, root_pem):
        self.tls_port = tls_port
        self.context = ssl.create_default_context(cadata=root_pem)

    def get(self, path="/healthz", timeout=10):
        """One request on a new connection: (status, the served certificate in DER, its details)."""
        with socket.create_connection(("127.0.0.1", self.tls_port), timeout=timeout) as raw:
            with self.context.wrap_socket(raw, server_hostname=NAME) as tls:
                der, details = tls.getpeercert(binary_form=True), tls.getpeercert()
                tls.sendall(f"GET {path} HTTP/1.1\r\nHost: {NAME}\r\nConnection: close\r\n\r\n".encode())
                answer = b""
                while chunk := tls.recv(65536):
                    answer += chunk
        return int(answer.split(b" ", 2)[1]), der, details


def live_certificate(host):
    return ssl.PEM_cert_to_DER_cert(host.file(f"{LIVE}/cert.pem").content_string)


def test_certificate_issued_by_pebble_and_served(host, site):
    status, der, details = site.get()
    issuer = dict(pair[0] for pair in details["issuer"])
    print(f"served: serial {details['serialNumber']}, issuer {issuer['commonName']}, "
          f"until {details['notAfter']}")
    assert status == 200
    assert issuer["commonName"].startswith("Pebble Intermediate CA"), issuer
    assert der == live_certificate(host), "Nginx serves certbot's live certificate"
    assert host.check_output("readlink /etc/chat/tls/chat.crt") == f"{LIVE}/fullchain.pem"
    assert host.check_output("readlink /etc/chat/tls/chat.key") == f"{LIVE}/privkey.pem"


def challenges_served(host):
    """HTTP-01 tokens Nginx handed out on port 80 (the CA's fetches)."""
    log = host.check_output("grep -F 'GET /.well-known/acme-challenge/' /var/log/nginx/access.log || true")
    return [line for line in log.splitlines() if '" 200 ' in line]


def test_the_ca_fetched_its_challenge_through_port_80(host):
    """pebble validated for real: it asked Nginx for the HTTP-01 token, and got it."""
    served = challenges_served(host)
    print("\n".join(served))
    assert served


def test_renewal_runs_from_certbots_timer(host):
    assert host.service("certbot.timer").is_enabled
    assert host.service("certbot.timer").is_running
    hook = host.file("/etc/letsencrypt/renewal-hooks/deploy/reload-chat")
    assert hook.mode == 0o755 and hook.user == "root"
    # What the timer starts: nothing is due yet, and it says so without error.
    host.run_expect([0], "systemctl start certbot.service")
    assert host.check_output("systemctl show --property=Result --value certbot.service") == "success"


class Polled:
    """HTTPS requests on new connections while an action runs: 4 clients x 4 requests/s (inside
    the edge's page limit, 20/s), each counting what it got and which certificate served it."""

    def __init__(self, site):
        self.site, self.seen, self.failures, self.served = site, {}, [], 0
        self.lock, self.stop = threading.Lock(), threading.Event()

    def poll(self):
        deadline = time.monotonic() + 180
        while not self.stop.is_set() and time.monotonic() < deadline:
            try:
                status, der, _ = self.site.get(timeout=10)
                with self.lock:
                    self.served += 1
                    self.seen[der] = self.seen.get(der, 0) + 1
                    if status != 200:
                        self.failures.append(f"HTTP {status}")
            except (OSError, ValueError, IndexError) as error:
                with self.lock:
                    self.failures.append(repr(error)[:200])
            time.sleep(0.25)

    def during(self, action, served_after):
        """Runs ACTION() under the requests and returns its result; the requests go on until
        SERVED_AFTER() names the certificate that 8 of them got (each Nginx worker moves to a
        new one when the reload reaches it), 30 s at most."""
        threads = [threading.Thread(target=self.poll, daemon=True) for _ in range(4)]
        for thread in threads:
            thread.start()
        try:
            time.sleep(2)
            result = action()
            after = served_after()
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                with self.lock:
                    if self.seen.get(after, 0) >= 8:
                        break
                time.sleep(0.5)
            time.sleep(2)
        finally:
            self.stop.set()
            for thread in threads:
                thread.join(timeout=30)
        return result


def test_forced_renewal_is_served_without_a_failed_request(host, site):
    """`certbot renew --force-renewal` under https load: every request answered, the new certificate served."""
    before, challenges_before = live_certificate(host), len(challenges_served(host))
    polled = Polled(site)
    started = time.monotonic()
    renewal = polled.during(lambda: host.run("certbot renew --force-renewal --no-random-sleep-on-renew"),
                            lambda: live_certificate(host))
    renewed_in = time.monotonic() - started
    after, seen = live_certificate(host), polled.seen
    report(f"acme renewal: certbot renew --force-renewal took {renewed_in:.1f} s; {polled.served} https requests "
           f"during it, {len(polled.failures)} failed; {seen.get(before, 0)} served the old certificate, "
           f"{seen.get(after, 0)} the new one")
    assert renewal.rc == 0, renewal.stdout + renewal.stderr
    assert after != before, "certbot did not replace the certificate"
    # pebble reuses no authorisation here: the renewal was validated again.
    assert len(challenges_served(host)) > challenges_before
    assert polled.failures == [], polled.failures[:10]
    assert seen.get(before, 0) > 0 and seen.get(after, 0) >= 8, {len(k): v for k, v in seen.items()}
    assert set(seen) == {before, after}
    status, der, _ = site.get()
    assert (status, der) == (200, after)


def test_a_key_rotation_by_rotate_yml_is_served_without_a_failed_request(host, site):
    """playbooks/rotate.yml -e chat_rotate_tls_key=true (README "Operating: secrets") under https
    load: the CA issues a certificate for a new key, due or not, Nginx serves it, every request is
    answered, and no connection gets the old key afterwards."""
    before = live_certificate(host)
    polled = Polled(site)
    rotation = polled.during(lambda: run_playbook("playbooks/rotate.yml", "-e", "chat_rotate_tls_key=true"),
                             lambda: live_certificate(host))
    after, seen = live_certificate(host), polled.seen
    report(f"TLS key rotated (acme): rotate.yml {rotation.seconds:.0f} s; {polled.served} https requests during "
           f"it, {len(polled.failures)} failed; {seen.get(before, 0)} served the old key, {seen.get(after, 0)} the new")
    assert rotation.returncode == 0, why_failed(rotation)
    assert public_key(after) != public_key(before), "the new certificate kept the old key"
    assert polled.failures == [], polled.failures[:10]
    assert seen.get(after, 0) >= 8, {len(k): v for k, v in seen.items()}
    # Every worker moved: ten new connections in a row get the new key.
    assert {public_key(site.get()[1]) for _ in range(10)} == {public_key(after)}
