"""The page's client (room.js) on batches, behind notices, gaps and duplicates, run in Node."""

import json
import pathlib
import shutil
import subprocess

import pytest

APP = pathlib.Path(__file__).resolve().parent.parent
ROOM_JS = APP / "chat" / "static" / "chat" / "room.js"
HARNESS = pathlib.Path(__file__).resolve().parent / "js" / "room_harness.js"

pytestmark = pytest.mark.skipif(shutil.which("node") is None, reason="needs Node.js")


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
