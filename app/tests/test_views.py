import pytest

from chat import store

pytestmark = pytest.mark.django_db


def test_lobby_lists_rooms_with_counts_most_recent_first(client):
    store.post_message("older", "a", "1")
    store.post_message("newer", "a", "1")
    store.post_message("newer", "a", "2")
    response = client.get("/")
    assert response.status_code == 200
    rooms = list(response.context["rooms"])
    assert [(r.name, r.last_seq) for r in rooms] == [("newer", 2), ("older", 1)]
    html = response.content.decode()
    assert 'href="/chat/newer/"' in html
    assert 'action="/enter/"' in html
    assert "/static/chat/chat.css" in html


def test_lobby_without_rooms(client):
    response = client.get("/")
    assert response.status_code == 200
    assert "No messages yet" in response.content.decode()


def test_refused_room_input_is_echoed_escaped(client):
    response = client.get("/enter/", {"room": "<script>"})
    assert response.status_code == 400
    html = response.content.decode()
    assert "<script>" not in html
    assert "&lt;script&gt;" in html


def test_enter_normalises_and_redirects(client):
    response = client.get("/enter/", {"room": "  General "})
    assert response.status_code == 302
    assert response["Location"] == "/chat/general/"


@pytest.mark.parametrize("name", ["", "a b", "x" * 51, "dot.ted"])
def test_enter_refuses_invalid_names(client, name):
    response = client.get("/enter/", {"room": name})
    assert response.status_code == 400
    assert "1-50 characters" in response.content.decode()


def test_room_page(client):
    response = client.get("/chat/general/")
    assert response.status_code == 200
    html = response.content.decode()
    assert 'data-room="general"' in html
    assert "/static/chat/room.js" in html
    assert 'maxlength="2000"' in html


@pytest.mark.parametrize("path", ["/chat/General/", "/chat/" + "x" * 51 + "/", "/chat/dot.ted/"])
def test_invalid_room_page_is_404(client, path):
    assert client.get(path).status_code == 404


@pytest.mark.parametrize("path", ["/", "/chat/general/", "/healthz"])
def test_head_is_answered_like_get(client, path):
    get, head = client.get(path), client.head(path)
    assert head.status_code == get.status_code == 200
    assert head["Content-Type"] == get["Content-Type"]
    assert head.content == b""


def test_pages_refuse_post(client):
    assert client.post("/").status_code == 405


def test_unknown_host_is_refused(client):
    assert client.get("/", HTTP_HOST="evil.example").status_code == 400
