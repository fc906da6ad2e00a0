"""Validation of client frames. Each failure carries a machine-readable code.

README.md documents the codes; clients match on them, so they never change
meaning.
"""

import json
import re

# Letters (any script), digits, space, "_", "-" and "."; 1-32 characters after
# trimming surrounding spaces.
NICKNAME_RE = re.compile(r"^[\w .-]{1,32}$")

CLIENT_TYPES = ("message", "history", "ping")


class ProtocolError(Exception):
    def __init__(self, code, detail):
        super().__init__(detail)
        self.code = code
        self.detail = detail

    def as_frame(self):
        return {"type": "error", "code": self.code, "detail": self.detail}


def parse_frame(text):
    """Decode a text frame into a dict with a known "type"."""
    try:
        frame = json.loads(text)
    except ValueError:
        raise ProtocolError("invalid_json", "the frame is not valid JSON") from None
    if not isinstance(frame, dict):
        raise ProtocolError("invalid_json", "the frame must be a JSON object")
    if frame.get("type") not in CLIENT_TYPES:
        raise ProtocolError(
            "unknown_type", f"type must be one of: {', '.join(CLIENT_TYPES)}"
        )
    return frame


def clean_nickname(value):
    nickname = value.strip() if isinstance(value, str) else ""
    if not NICKNAME_RE.fullmatch(nickname):
        raise ProtocolError(
            "invalid_nickname",
            "nickname must be 1-32 letters, digits, spaces, '_', '-' or '.'",
        )
    return nickname


def clean_body(value, max_length):
    body = value.strip() if isinstance(value, str) else ""
    if not body:
        raise ProtocolError("empty_body", "body must be a non-empty string")
    if len(body) > max_length:
        raise ProtocolError("body_too_long", f"body is longer than {max_length} characters")
    return body


def clean_since(value):
    # bool is an int subclass; true/false is not a sequence number.
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ProtocolError("invalid_since", "since must be an integer >= 0")
    return value
