"""Proof of routing by failure: stopping one server breaks only its half.

Each test stops units and restarts them in a fixture's teardown, so the host
is whole again even when an assertion fails. Sockets are stopped with their
services: with socket activation, a connection to a live socket would start
the service again.
"""

import pytest

# Stops the app's units of the host and asks its own Nginx (the cluster
# stops a whole app host instead: test_90_cluster.py).
pytestmark = pytest.mark.needs("web", "app")
from websockets.exceptions import InvalidStatus


def _stopped(host, units):
    host.run_expect([0], "systemctl stop " + " ".join(units))
    try:
        yield
    finally:
        host.run_expect([0], "systemctl start " + " ".join(reversed(units)))


@pytest.fixture
def daphne_stopped(host, edge, daphne_instances):
    units = [f"chat-daphne@{n}.{kind}" for n in daphne_instances for kind in ("service", "socket")]
    yield from _stopped(host, units)
    edge.wait_healthy()


@pytest.fixture
def gunicorn_stopped(host, edge):
    yield from _stopped(host, ["chat-gunicorn.service", "chat-gunicorn.socket"])
    edge.wait_healthy()


def test_without_daphne_websockets_fail_and_http_answers(edge, daphne_stopped):
    with pytest.raises(InvalidStatus) as failed:
        edge.websocket("/ws/health/")
    assert failed.value.response.status_code == 502
    status, health = edge.get_json("/healthz")
    assert status == 200
    assert health["interface"] == "wsgi"


def test_without_gunicorn_http_fails_and_websockets_work(edge, gunicorn_stopped):
    status, _ = edge.get("/healthz")
    assert status == 502
    with edge.websocket("/ws/health/") as ws:
        assert edge.receive(ws)["interface"] == "asgi"


def test_both_halves_answer_again(edge):
    edge.wait_healthy()
    status, health = edge.get_json("/healthz")
    assert (status, health["interface"]) == (200, "wsgi")
    with edge.websocket("/ws/health/") as ws:
        assert edge.receive(ws)["interface"] == "asgi"
