"""The page's client (room.js) on batches, behind notices, gaps and duplicates, run in Node."""

import json
import pathlib
import shutil
import subprocess

import pytest

APP = pathlib.Path(__file__).resolve().parent.parent
ROOM_JS = APP / "chat" / "static" / "chat" / "room.js"
HARNESS = pathlib.Path(__file__).resolve().parent / "js" / "room_harness.js"



@pytest.fixture(autouse=True)
def node():
    """These checks fail, never skip, without Node.js: a skip here once hid
    them on every machine that lacked it (Debian: apt-get install nodejs)."""
    if shutil.which("node") is None:
        pytest.fail("Node.js is not on PATH: install it (Debian: apt-get install nodejs) to test room.js")


def message(seq):
    return {"type": "message", "id": seq, "seq": seq, "room": "lobby", "nickname": "n",
            "body": f"m{seq}", "created": "2025-01-01T12:00:00+00:00"}


def run_page(frames):
    result = subprocess.run(["node", str(HARNESS), str(ROOM_JS)], input=json.dumps(frames),
                            capture_output=True, text=True, timeout=30, check=True)
    return json.loads(result.stdout)


def history(*seqs):
    return {"type": "history", "messages": [message(s) for s in seqs]}


def test_a_batch_is_shown_like_its_messages_one_by_one():
    page = run_page([history(1), {"type": "batch", "messages": [message(2), message(3)]}])
    assert page["rendered"] == ["m1", "m2", "m3"]
    assert page["sent"] == []


def test_behind_fetches_the_gap_before_showing_newer_messages():
    page = run_page([
        history(1),
        {"type": "behind", "since": 1, "until": 4},
        message(5),
    ])
    # 5 waits: 2..4 were dropped for this socket and are asked for.
    assert page["rendered"] == ["m1"]
    assert page["sent"] == [{"type": "history", "since": 1}]

    page = run_page([
        history(1),
        {"type": "behind", "since": 1, "until": 4},
        message(5),
        history(2, 3, 4, 5),
    ])
    assert page["rendered"] == ["m1", "m2", "m3", "m4", "m5"]


def test_behind_keeps_asking_while_pages_make_progress():
    page = run_page([
        history(1),
        {"type": "behind", "since": 1, "until": 6},
        history(2, 3),  # a short page (the server caps pages)
    ])
    assert page["rendered"] == ["m1", "m2", "m3"]
    assert page["sent"] == [{"type": "history", "since": 1}, {"type": "history", "since": 3}]


def test_a_gap_is_asked_for_once_and_filled_in_order():
    page = run_page([history(1), message(3), {"type": "batch", "messages": [message(4)]}, history(2, 3)])
    assert page["sent"] == [{"type": "history", "since": 1}]
    assert page["rendered"] == ["m1", "m2", "m3", "m4"]


def test_duplicates_are_shown_once():
    page = run_page([history(1, 2), message(2), {"type": "batch", "messages": [message(2), message(3)]}])
    assert page["rendered"] == ["m1", "m2", "m3"]


def posted(body, client_id):
    return {"type": "message", "nickname": "me", "body": body, "client_id": client_id}


def echo(seq, body, client_id):
    return {**message(seq), "nickname": "me", "body": body, "client_id": client_id}


def test_a_post_carries_a_client_id_and_waits_in_the_outbox_until_it_comes_back():
    page = run_page([history(1), {"page": "submit", "body": "hello"}])
    assert page["sent"] == [posted("hello", "id-1")]
    assert page["input"] == ""
    assert page["outbox"] == ["me hello (sending…)"]

    page = run_page([history(1), {"page": "submit", "body": "hello"}, echo(2, "hello", "id-1")])
    assert page["outbox"] == []
    assert page["rendered"] == ["m1", "hello"]


def test_unanswered_posts_are_sent_again_with_their_ids_after_a_reconnect():
    page = run_page([
        history(1),
        {"page": "submit", "body": "first"},
        {"page": "submit", "body": "second"},
        echo(2, "first", "id-1"),
        {"page": "drop"},
        {"page": "submit", "body": "typed while away"},
        {"page": "reconnect"},
    ])
    # "second" got no answer before the drop; "typed while away" could not be sent.
    assert page["sent"] == [
        posted("first", "id-1"), posted("second", "id-2"),
        {"type": "history", "since": 2},
        posted("second", "id-2"), posted("typed while away", "id-3"),
    ]
    assert page["outbox"] == ["me second (sending…)", "me typed while away (sending…)"]


def test_a_resent_post_the_server_had_stored_is_shown_once():
    page = run_page([
        history(1), {"page": "submit", "body": "in flight"}, {"page": "drop"}, {"page": "reconnect"},
        # The server had stored it before the drop: history has it, and the
        # resend is answered with the same message.
        {"type": "history", "messages": [echo(2, "in flight", "id-1")]},
        echo(2, "in flight", "id-1"), echo(2, "in flight", "id-1"),
    ])
    assert page["rendered"] == ["m1", "in flight"]
    assert page["outbox"] == []


def test_store_failed_gives_the_text_back_and_shows_the_error():
    refused = {"type": "error", "code": "store_failed", "detail": "could not be stored", "client_id": "id-1"}
    page = run_page([history(1), {"page": "submit", "body": "keep me"}, refused])
    assert page["input"] == "keep me"
    assert page["outbox"] == []
    assert "could not be stored (store_failed)" in page["notice"]
    assert page["rendered"] == ["m1"]

    # Something newer typed meanwhile stays in the input; the refused post stays in view.
    page = run_page([history(1), {"page": "submit", "body": "keep me"}, {"page": "type", "body": "newer"},
                     refused])
    assert page["input"] == "newer"
    assert page["outbox"] == ["me keep me (not sent: store_failed)"]


def test_pruned_messages_below_first_are_skipped_not_asked_for_again():
    """The page saw up to 2, was away while 3..9 were pruned (the retention
    time), and 10.. came after: the history answer says the room starts at
    10, and the page goes on from there instead of asking for 3 for ever."""
    pruned = {"type": "history", "messages": [message(10), message(11)], "first": 10}
    page = run_page([history(1, 2), message(11), pruned, message(12)])
    assert page["rendered"] == ["m1", "m2", "m10", "m11", "m12"]
    assert page["sent"] == [{"type": "history", "since": 2}]
