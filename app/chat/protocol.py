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

# Every error code a ProtocolError carries (here and in consumers.py), as in
# README.md's table; also the label values of chat_messages_refused_total.
ERROR_CODES = (
    "invalid_json", "binary_not_supported", "unknown_type", "invalid_nickname", "empty_body",
    "body_too_long", "invalid_since", "invalid_client_id", "rate_limited", "store_failed",
    "history_failed",
)

# A post's idempotency key, chosen by the client (a UUID fits): 1-64 ASCII
# letters, digits, "_" and "-".
CLIENT_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class ProtocolError(Exception):
    def __init__(self, code, detail):
        super().__init__(detail)
        self.code = code
        self.detail = detail

    def as_frame(self, client_id=None):
        """The error frame; with the client_id of the refused post, when it had a valid one."""
        frame = {"type": "error", "code": self.code, "detail": self.detail}
        if client_id is not None:
            frame["client_id"] = client_id
        return frame


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


def clean_client_id(value):
    """A post's client_id: None when absent, else a string of CLIENT_ID_RE."""
    if value is None:
        return None
    if not isinstance(value, str) or not CLIENT_ID_RE.fullmatch(value):
        raise ProtocolError("invalid_client_id", "client_id must be 1-64 letters, digits, '_' or '-'")
    return value


def client_id_of(frame):
    """The valid client_id of a message frame, to name it in an error frame; else None."""
    if isinstance(frame, dict) and frame.get("type") == "message":
        value = frame.get("client_id")
        if isinstance(value, str) and CLIENT_ID_RE.fullmatch(value):
            return value
    return None
