"""Small pure pieces: frame validation, the token bucket, the log formatter."""

import logging
import sys

import pytest

from chat.protocol import ProtocolError, clean_body, clean_nickname, clean_since, parse_frame
from chat.ratelimit import TokenBucket
from chatservice.logformat import OneLineFormatter


@pytest.mark.parametrize(
    "raw, cleaned",
    [("alice", "alice"), ("  Bob  ", "Bob"), ("Zoë", "Zoë"), ("李雷", "李雷"),
     ("a.b-c_d e", "a.b-c_d e"), ("x" * 32, "x" * 32)],
)
def test_nickname_accepted(raw, cleaned):
    assert clean_nickname(raw) == cleaned


@pytest.mark.parametrize("raw", ["", "   ", "x" * 33, "a<b", "tab\there", "new\nline", "😀", None, 7])
def test_nickname_refused(raw):
    with pytest.raises(ProtocolError) as caught:
        clean_nickname(raw)
    assert caught.value.code == "invalid_nickname"


def test_body_is_trimmed_and_limited():
    assert clean_body("  hi there \n", 100) == "hi there"
    assert clean_body("line one\nline two", 100) == "line one\nline two"
    with pytest.raises(ProtocolError, match="longer than 5") as caught:
        clean_body("abcdef", 5)
    assert caught.value.code == "body_too_long"
    # The limit counts characters, not bytes.
    assert clean_body("é" * 5, 5) == "é" * 5


def test_since():
    assert clean_since(0) == 0
    assert clean_since(12) == 12
    for bad in (-1, "1", 1.0, None, True, [1]):
        with pytest.raises(ProtocolError):
            clean_since(bad)


def test_parse_frame_error_frame_shape():
    with pytest.raises(ProtocolError) as caught:
        parse_frame("{")
    assert caught.value.as_frame() == {
        "type": "error",
        "code": "invalid_json",
        "detail": "the frame is not valid JSON",
    }
    assert parse_frame('{"type": "ping", "extra": 1}') == {"type": "ping", "extra": 1}


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_token_bucket_allows_a_burst_then_refills_at_the_rate():
    clock = FakeClock()
    bucket = TokenBucket(rate=2, burst=3, clock=clock)
    assert [bucket.allow() for _ in range(4)] == [True, True, True, False]
    clock.now += 0.5  # one token at 2 per second
    assert [bucket.allow(), bucket.allow()] == [True, False]
    clock.now += 60  # refill never exceeds the burst
    assert [bucket.allow() for _ in range(4)] == [True, True, True, False]


def test_log_records_stay_on_one_line():
    formatter = OneLineFormatter("%(levelname)s %(message)s")
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord(
            "x", logging.ERROR, __file__, 1, "first\nsecond", None, sys.exc_info()
        )
    line = formatter.format(record)
    assert "\n" not in line
    assert line.startswith("ERROR first \\n second")
    assert "ValueError: boom" in line
