"""Live clients for checks that change the host under traffic (deploys, faults).

`Traffic` runs, in background threads, bounded HTTP polling of a path and a
room of WebSocket clients that behave like the page: on a close they come
back after the page's first jittered pause and count what they saw. Each
loop ends when the block ends or at `max_seconds`, whichever comes first.

With `senders`, that many of the clients also post a message every
`send_interval` seconds, one at a time (the next only once the last was
answered by its echo or an error frame, or after `ANSWER_TIMEOUT`). Every
client keeps the `seq`s it has seen and fills gaps from `history` as the page
does (after a reconnect, and on a hole); when the block ends, each client that
is still connected catches up once more, then the counts say what each saw.
"""

import asyncio
import json
import random
import threading
import time
from dataclasses import dataclass, field

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

# Seconds a sender waits for its message's echo or an error frame: longer
# than any pause the faults cause, so silence here is a real loss.
ANSWER_TIMEOUT = 20
HISTORY_PAGE = 200


@dataclass
class Seen:
    """What one client has seen of the room, by seq."""

    seqs: set = field(default_factory=set)
    bodies: dict = field(default_factory=dict)

    def add(self, messages):
        for message in messages:
            self.seqs.add(message["seq"])
            self.bodies[message["seq"]] = message["body"]

    def contiguous(self):
        """The highest seq with nothing missing below it (0: none)."""
        last = 0
        while last + 1 in self.seqs:
            last += 1
        return last


@dataclass
class Counts:
    http_ok: int = 0
    http_failed: list = field(default_factory=list)
    releases_seen: list = field(default_factory=list)
    # (close code, seconds from the close to the next open handshake)
    reconnects: list = field(default_factory=list)
    ws_failed_handshakes: list = field(default_factory=list)
    # Posting (with senders): bodies answered by their echo, refused by an
    # error frame (code), left without an answer when their socket closed,
    # and left without any answer on an open socket (a loss).
    acknowledged: list = field(default_factory=list)
    refused: list = field(default_factory=list)
    dropped_in_flight: list = field(default_factory=list)
    silent: list = field(default_factory=list)
    # Per client, what it saw once it caught up at the end (None: it was
    # not connected then).
    seen: list = field(default_factory=list)
    # Close codes of handshakes that were accepted and closed at once (1013).
    closed_on_join: list = field(default_factory=list)


class Traffic:
    # The defaults stay inside Nginx's per-address limits (the clients all
    # come from one address): 4 x 4 requests/s against 20/s for pages, and
    # sockets opened at 8/s against 10 handshakes/s.
    def __init__(self, edge, room, http_clients=4, http_interval=0.25, sockets=50,
                 max_seconds=600, path="/healthz", opens_per_second=8, senders=0,
                 send_interval=1.0, wait_open=True, http_timeout=10):
        self.edge, self.room, self.path = edge, room, path
        self.http_clients, self.http_interval = http_clients, http_interval
        self.sockets, self.max_seconds = sockets, max_seconds
        self.opens_per_second = opens_per_second
        self.senders, self.send_interval = senders, send_interval
        # False: the block starts at once instead of once every socket is open.
        self.wait_open = wait_open
        self.http_timeout = http_timeout
        self.tag = f"{room}-{time.monotonic_ns()}"
        # Every client's Seen, live (for wait_seen_by_all).
        self._seen = [Seen() for _ in range(sockets)]
        self.counts = Counts()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = []
        self._ready = threading.Event()
        self._open = 0

    # --- HTTP ---
    def _poll(self):
        deadline = time.monotonic() + self.max_seconds
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                status, body = self.edge.get(self.path, timeout=self.http_timeout)
                if status != 200:
                    raise ValueError(f"HTTP {status}: {body[:100]}")
                release = json.loads(body).get("release") if self.path == "/healthz" else None
                with self._lock:
                    self.counts.http_ok += 1
                    if release and (not self.counts.releases_seen or self.counts.releases_seen[-1] != release):
                        self.counts.releases_seen.append(release)
            except (OSError, ValueError) as error:
                with self._lock:
                    self.counts.http_failed.append(repr(error)[:200])
            time.sleep(self.http_interval)

    # --- WebSockets ---
    def _take(self, seen, frame, pending):
        """Records a frame; returns (answer for the pending post or None, whether a gap is open)."""
        kind = frame.get("type")
        messages = []
        if kind in ("message", "history"):
            messages = [frame] if kind == "message" else frame["messages"]
        elif kind == "batch":
            messages = frame["messages"]
        seen.add(messages)
        answer = None
        if pending is not None:
            if any(m["body"] == pending for m in messages):
                answer = "ack"
            elif kind == "error":
                answer = frame["code"]
        gap = kind == "behind" or (messages and max(m["seq"] for m in messages) > seen.contiguous())
        return answer, gap

    def _record_answer(self, body, answer):
        """Counts the server's answer to one post: "ack", or the error code that refused it."""
        with self._lock:
            if answer == "ack":
                self.counts.acknowledged.append(body)
            else:
                self.counts.refused.append((body, answer))

    async def _catch_up(self, ws, seen):
        """Asks for history from the highest seq seen without a hole, while pages come back full."""
        while True:
            since = seen.contiguous()
            await ws.send(json.dumps({"type": "history", "since": since}))
            while True:
                frame = json.loads(await asyncio.wait_for(ws.recv(), 10))
                self._take(seen, frame, None)
                if frame.get("type") == "history":
                    break
            if len(frame["messages"]) < HISTORY_PAGE:
                return

    async def _client(self, index, deadline, start_after):
        url = f"{self.edge.ws_base}/ws/chat/{self.room}/"
        seen = self._seen[index]
        sender = index < self.senders
        posted = 0
        pending = None  # (body, sent at) of the post waiting for its answer
        await asyncio.sleep(start_after)
        closed = None  # (close code, when) of the last drop, until the next open
        first = True
        while not self._stop.is_set() and time.monotonic() < deadline:
            in_room = False
            try:
                tls = self.edge.ssl if url.startswith("wss:") else None
                async with connect(url, origin=self.edge.origin, open_timeout=10, ssl=tls) as ws:
                    joined = json.loads(await asyncio.wait_for(ws.recv(), 10))  # the history frame
                    in_room = True
                    if closed is not None:
                        with self._lock:
                            self.counts.reconnects.append((closed[0], time.monotonic() - closed[1]))
                        closed = None
                    self._take(seen, joined, None)
                    if first:
                        with self._lock:
                            self._open += 1
                            if self._open == self.sockets:
                                self._ready.set()
                    asking = False  # a history request is on its way
                    if not first and seen.seqs:
                        # As the page does after a reconnect.
                        asking = True
                        await ws.send(json.dumps({"type": "history", "since": seen.contiguous()}))
                    first = False
                    next_post = time.monotonic() + random.random() * self.send_interval
                    while not self._stop.is_set() and time.monotonic() < deadline:
                        now = time.monotonic()
                        if sender and pending is None and now >= next_post:
                            posted += 1
                            pending = (f"{self.tag} {index}-{posted}", now)
                            await ws.send(json.dumps({"type": "message", "nickname": f"client{index}",
                                                      "body": pending[0]}))
                        try:
                            frame = json.loads(await asyncio.wait_for(ws.recv(), 0.25))
                        except TimeoutError:
                            frame = None
                        if frame is not None:
                            before = seen.contiguous()
                            answer, gap = self._take(seen, frame, pending and pending[0])
                            if frame.get("type") == "history":
                                # Pages are capped: ask on only while they make progress.
                                asking = False
                                gap = gap and seen.contiguous() > before
                            if gap and not asking:
                                asking = True
                                await ws.send(json.dumps({"type": "history", "since": seen.contiguous()}))
                            if answer is not None:
                                self._record_answer(pending[0], answer)
                                pending, next_post = None, time.monotonic() + self.send_interval
                        if pending is not None and time.monotonic() - pending[1] > ANSWER_TIMEOUT:
                            with self._lock:
                                self.counts.silent.append(pending[0])
                            pending, next_post = None, time.monotonic() + self.send_interval
                    # The end: wait for the last answer, then fill what is missing.
                    answer_by = time.monotonic() + (ANSWER_TIMEOUT if pending else 0)
                    while pending is not None and time.monotonic() < answer_by:
                        try:
                            frame = json.loads(await asyncio.wait_for(ws.recv(), 0.5))
                        except TimeoutError:
                            continue
                        answer, _ = self._take(seen, frame, pending[0])
                        if answer is not None:
                            self._record_answer(pending[0], answer)
                            pending = None
                    if pending is not None:
                        with self._lock:
                            self.counts.silent.append(pending[0])
                    await self._catch_up(ws, seen)
                    with self._lock:
                        self.counts.seen.append(seen)
                    return
            except ConnectionClosed as error:
                code = error.rcvd.code if error.rcvd else 1006
                if not in_room:
                    with self._lock:
                        self.counts.closed_on_join.append(code)
                closed = closed or (code, time.monotonic())
            except Exception as error:  # a refused or failed handshake
                with self._lock:
                    self.counts.ws_failed_handshakes.append(repr(error)[:200])
                closed = closed or ("handshake", time.monotonic())
            if pending is not None:
                # The socket closed under a post: the server may or may not have it.
                with self._lock:
                    self.counts.dropped_in_flight.append(pending[0])
                pending = None
            # The page's first retry: half to all of 500 ms.
            await asyncio.sleep(0.25 + random.random() * 0.25)
        with self._lock:
            self.counts.seen.append(None)

    def wait_seen_by_all(self, seq, timeout):
        """Seconds until every client has seen seq (in order, no hole below it); raises on timeout."""
        started = time.monotonic()
        while any(seen.contiguous() < seq for seen in self._seen):
            if time.monotonic() - started > timeout:
                behind = [seen.contiguous() for seen in self._seen if seen.contiguous() < seq]
                raise AssertionError(f"{len(behind)} clients had not seen seq {seq} after {timeout} s: {behind}")
            time.sleep(0.05)
        return time.monotonic() - started

    def _room(self):
        async def run():
            deadline = time.monotonic() + self.max_seconds
            await asyncio.gather(*(self._client(n, deadline, n / self.opens_per_second)
                                   for n in range(self.sockets)))

        asyncio.run(run())

    def __enter__(self):
        for _ in range(self.http_clients):
            self._threads.append(threading.Thread(target=self._poll, daemon=True))
        if self.sockets:
            self._threads.append(threading.Thread(target=self._room, daemon=True))
        for thread in self._threads:
            thread.start()
        if self.sockets and self.wait_open and not self._ready.wait(60):
            self._stop.set()
            raise AssertionError(f"only {self._open} of {self.sockets} WebSockets opened in 60 s")
        return self.counts

    def __exit__(self, *exc):
        # A last moment of traffic after the change, then stop.
        time.sleep(1)
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)
        return False
