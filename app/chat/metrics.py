"""The chat's own Prometheus metrics: the one place that defines them.

The names and labels are a contract (alert rules and dashboards match on
them; README.md lists them): change them only together with those.

Who serves them (CHAT_METRICS_LISTEN): Daphne from its own process
(chatservice/serve_daphne.py, prometheus_client's default registry, which
adds process_* and python_* metrics); Gunicorn from its master, summing
every worker's values in multiprocess mode (chatservice/gunicorn_hooks.py,
PROMETHEUS_MULTIPROC_DIR). Under Gunicorn, prometheus_client decides on
multiprocess mode when it is first imported, from PROMETHEUS_MULTIPROC_DIR:
each worker then writes its values to files there, and the modes below say
how the master combines the workers' gauges.

Cost: the hot path (fan-out) counts per flush or per batch, never per
socket and message; an increment is a lock and an addition (plus a write to
a memory-mapped file in multiprocess mode).
"""

from prometheus_client import Counter, Gauge, Histogram

from .protocol import ERROR_CODES

# 1 ms to 10 s: a batch window is 5 ms, a gap wait 200 ms, SQLite's busy
# timeout 5 s; slower ends in +Inf.
SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

WEBSOCKETS_OPEN = Gauge(
    "chat_websockets_open", "Open chat WebSockets (joined to a room) in this process.",
    multiprocess_mode="livesum")

HANDSHAKES = Counter(
    "chat_websocket_handshakes_total",
    "WebSocket handshakes by outcome: accepted, not_found (4004), unavailable (1013), refused_origin (403).",
    ["outcome"])
HANDSHAKE_OUTCOMES = ("accepted", "not_found", "unavailable", "refused_origin")
# Bound once: labels() costs a lock and a lookup per call.
HANDSHAKES_ACCEPTED, HANDSHAKES_NOT_FOUND, HANDSHAKES_UNAVAILABLE, HANDSHAKES_REFUSED_ORIGIN = (
    HANDSHAKES.labels(outcome) for outcome in HANDSHAKE_OUTCOMES)

MESSAGES_POSTED = Counter(
    "chat_messages_posted_total",
    "Message frames that passed parsing and rate limits and were handed to the hub to store.")
MESSAGES_STORED = Counter(
    "chat_messages_stored_total", "Messages newly stored (not resends of a message stored before).")

MESSAGES_REFUSED = Counter(
    "chat_messages_refused_total", "Client frames refused with an error frame, by its code.", ["reason"])
# Every code exists from the start (a rate() over a series that appears with
# its first increment misses that increment), and the label set stays the
# fixed set of protocol.ERROR_CODES.
_REFUSED = {code: MESSAGES_REFUSED.labels(code) for code in ERROR_CODES}

FANOUT_DELIVERY = Histogram(
    "chat_fanout_delivery_seconds",
    "Seconds from a message being stored to its frame being written to a socket "
    "(once per flush for the sockets it reached at once, and once per send of a lagging socket).",
    buckets=SECONDS_BUCKETS)

BEHIND_NOTICES = Counter("chat_behind_notices_total", "behind notices sent to sockets that fell too far behind.")

HUB_RECOVERIES = Counter(
    "chat_hub_recoveries_total", "Recoveries of the hub after it lost the channel layer (Redis).")

DB_CALLS = Histogram(
    "chat_db_call_seconds",
    "Seconds of the WebSocket side's database calls (chat/dbcalls.py), waiting for a thread included.",
    ["kind"], buckets=SECONDS_BUCKETS)
DB_READ_SECONDS, DB_WRITE_SECONDS = DB_CALLS.labels("read"), DB_CALLS.labels("write")

# A wait for the database's primary (chat/failover.py): a Patroni
# switchover's gap is 1-5 s, the waits' deadlines are 5 s (/healthz) and
# 10 s (posts) by default.
FAILOVER_BUCKETS = (0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 30.0)
FAILOVER_KINDS, FAILOVER_OUTCOMES = ("write", "read", "health"), ("ok", "failed")
FAILOVER_WAITS = Counter(
    "chat_database_failover_waits_total",
    "Database calls that failed for want of a primary and were tried again, by kind (write: storing posts, "
    "health: /healthz) and outcome (ok: went through; failed: the deadline passed, or COMMIT's outcome was "
    "unknown for posts without client_id).",
    ["kind", "outcome"])
FAILOVER_WAIT_SECONDS = Histogram(
    "chat_database_failover_wait_seconds",
    "Seconds such a call waited for a primary, from its first attempt to its success or giving up.",
    ["kind"], buckets=FAILOVER_BUCKETS)
# Every series from the start (see _REFUSED).
_FAILOVER = {(kind, outcome): (FAILOVER_WAITS.labels(kind, outcome), FAILOVER_WAIT_SECONDS.labels(kind))
             for kind in FAILOVER_KINDS for outcome in FAILOVER_OUTCOMES}

RELEASE_INFO = Gauge(
    "chat_release_info", "The release this process serves (value 1), and its interface: asgi or wsgi.",
    ["release", "interface"], multiprocess_mode="livemax")

HTTP_RESPONSES = Counter(
    "chat_http_responses_total", "HTTP responses of Django, by status class (2xx, 4xx, 5xx, ...).", ["status"])
_HTTP_CLASSES = {number: HTTP_RESPONSES.labels(f"{number}xx") for number in range(1, 6)}


def refused(code):
    """Counts a refused frame by its error code."""
    counter = _REFUSED.get(code)
    if counter is None:
        # Not in protocol.ERROR_CODES (add it there): one series for all such.
        counter = _REFUSED.setdefault("other", MESSAGES_REFUSED.labels("other"))
    counter.inc()


def http_response(status_code):
    counter = _HTTP_CLASSES.get(status_code // 100)
    if counter is not None:
        counter.inc()


def failover_wait(kind, outcome, seconds):
    """Counts a call that waited for the database's primary, and how long it waited."""
    counter, histogram = _FAILOVER[kind, outcome]
    counter.inc()
    histogram.observe(seconds)


def set_release(release, interface):
    """Says which release and interface this process serves (once, at start)."""
    RELEASE_INFO.labels(release, interface).set(1)
