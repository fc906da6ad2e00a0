"""Live clients for checks that change the host under traffic (deploys, faults).

`Traffic` runs, in background threads, bounded HTTP polling of a path and a
room of WebSocket clients that behave like the page: on a close they come
back after the page's first jittered pause (or, for the share `at_once` of
them, at once, as a harsher client does) and count what they saw. Each
loop ends when the block ends or at `max_seconds`, whichever comes first.

With `senders`, that many of the clients also post a message every
`send_interval` seconds, one at a time (the next only once the last was
answered by its echo or an error frame naming it, or after `ANSWER_TIMEOUT`).
Like the page, each post carries a `client_id`, and a post whose socket
closed before its answer is sent again, unchanged, after the reconnect (the
server answers a post it had stored with that message). Every client keeps
the `seq`s it has seen and fills gaps from `history` as the page does (after
a reconnect, and on a hole).

When the block ends, the clients stop posting and wait for the answers to
their last posts (reconnecting and resending if need be); only once every
sender's last post is answered (stored or refused) does each client catch up
from history one last time. A post that waited for the database (a lock) can
be stored seconds after it was sent: catching up before it was answered would
miss it. Then the counts say what each client saw.
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
    # How each seq first came: live (a message or batch frame, the fan-out)
    # or caught up (history asked for after a gap or a reconnect). The
    # history of the first join is neither: those came before the client.
    live: set = field(default_factory=set)
    caught_up: set = field(default_factory=set)

    def add(self, messages, how="live"):
        for message in messages:
            seq = message["seq"]
            if seq not in self.seqs:
                if how == "live":
                    self.live.add(seq)
                elif how == "catch-up":
                    self.caught_up.add(seq)
            self.seqs.add(seq)
            self.bodies[seq] = message["body"]

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
    # When each of them failed (time.monotonic()): where an outage is
    # expected, its window.
    http_failed_at: list = field(default_factory=list)
    releases_seen: list = field(default_factory=list)
    # (close code, seconds from the close to the next open handshake)
    reconnects: list = field(default_factory=list)
    ws_failed_handshakes: list = field(default_factory=list)
    # Posting (with senders): bodies answered by their echo, refused by an
    # error frame naming them (code), sent again after their socket closed
    # before an answer (each also ends acknowledged or refused), and left
    # without any answer (a loss).
    acknowledged: list = field(default_factory=list)
    refused: list = field(default_factory=list)
    resent: list = field(default_factory=list)
    silent: list = field(default_factory=list)
    # Answers that came after the block ended (posts that were still waiting).
    late_answers: int = 0
    # Per client, what it saw once it caught up at the end (None: it could
    # not, by the end of the block's time).
    seen: list = field(default_factory=list)
    # Requests answered 200, per HTTP poller, when each stopped: a poller
    # that died early shows here instead of passing with no failures.
    polls: list = field(default_factory=list)
    # Close codes of handshakes that were accepted and closed at once (1013).
    closed_on_join: list = field(default_factory=list)
    # Every close any client saw, in the order seen: (close code, whether the
    # client had joined the room), 1006 for a connection lost without a
    # close frame.
    closes: list = field(default_factory=list)


class Traffic:
    # The defaults stay inside Nginx's per-address limits (the clients all
    # come from one address): 4 x 4 requests/s against 20/s for pages, and
    # sockets opened at 8/s against 10 handshakes/s.
    # Seconds the end may take beyond the last answers: reconnects and catching up.
    END_GRACE = 30

    def __init__(self, edge, room, http_clients=4, http_interval=0.25, sockets=50,
                 max_seconds=600, path="/healthz", opens_per_second=8, senders=0,
                 send_interval=1.0, wait_open=True, http_timeout=10, at_once=0.0):
        self.edge, self.room, self.path = edge, room, path
        self.http_clients, self.http_interval = http_clients, http_interval
        self.sockets, self.max_seconds = sockets, max_seconds
        self.opens_per_second = opens_per_second
        self.senders, self.send_interval = senders, send_interval
        # False: the block starts at once instead of once every socket is open.
        self.wait_open = wait_open
        self.http_timeout = http_timeout
        # The share of clients that reconnect at once after a close (every
        # other one for 0.5); the rest wait the page's jittered pause.
        self.at_once = at_once
        self.tag = f"{room}-{time.monotonic_ns()}"
        # Every client's Seen, live (for wait_seen_by_all).
        self._seen = [Seen() for _ in range(sockets)]
        self.counts = Counts()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = []
        self._ready = threading.Event()
        self._open = 0
        # The end: clients whose last post is answered, the event every
        # client waits for before its last catch-up (made in the room's
        # loop), and when the clients give up (set with _stop).
        self._answered = 0
        self._all_answered = None
        self._end_by = float("inf")

    # --- HTTP ---
    def _poll(self):
        deadline = time.monotonic() + self.max_seconds
        answered = 0
        try:
            while not self._stop.is_set() and time.monotonic() < deadline:
                try:
                    status, body = self.edge.get(self.path, timeout=self.http_timeout)
                    if status != 200:
                        raise ValueError(f"HTTP {status}: {body[:100]}")
                    release = json.loads(body).get("release") if self.path == "/healthz" else None
                    answered += 1
                    with self._lock:
                        self.counts.http_ok += 1
                        if release and (not self.counts.releases_seen or self.counts.releases_seen[-1] != release):
                            self.counts.releases_seen.append(release)
                # Any exception is a failed request (http.client's
                # IncompleteRead is not an OSError), never the poller's end.
                except Exception as error:
                    with self._lock:
                        self.counts.http_failed.append(repr(error)[:200])
                        self.counts.http_failed_at.append(time.monotonic())
                time.sleep(self.http_interval)
        finally:
            with self._lock:
                self.counts.polls.append(answered)

    # --- WebSockets ---
    def _take(self, seen, frame, pending, first_join=False):
        """Records a frame; returns (answer for the post whose client_id is pending, or None; whether a gap is open)."""
        kind = frame.get("type")
        messages = []
        if kind in ("message", "history"):
            messages = [frame] if kind == "message" else frame["messages"]
        elif kind == "batch":
            messages = frame["messages"]
        how = "live" if kind in ("message", "batch") else "join" if first_join else "catch-up"
        seen.add(messages, how)
        answer = None
        if pending is not None:
            if any(m.get("client_id") == pending for m in messages):
                answer = "ack"
            elif kind == "error" and frame.get("client_id") == pending:
                answer = frame["code"]
        gap = kind == "behind" or (messages and max(m["seq"] for m in messages) > seen.contiguous())
        return answer, gap

    def _record_answer(self, body, answer):
        """Counts the server's answer to one post: "ack", or the error code that refused it."""
        with self._lock:
            if self._stop.is_set():
                self.counts.late_answers += 1
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

    def _post_answered(self, finished):
        """Counts a client as done posting (once); the last one lets every client catch up."""
        if not finished:
            self._answered += 1
            if self._answered == self.sockets:
                self._all_answered.set()
        return True

    async def _client(self, index, deadline, start_after):
        url = f"{self.edge.ws_base}/ws/chat/{self.room}/"
        seen = self._seen[index]
        sender = index < self.senders
        # Spread over the room: with 0.5, every other client.
        at_once = int((index + 1) * self.at_once) > int(index * self.at_once)
        posted = 0
        # The post waiting for its answer: {"body", "client_id", "sent"} (when last sent).
        pending = None
        finished = False  # stopped posting, and the last post was answered
        await asyncio.sleep(start_after)
        closed = None  # (close code, when) of the last drop, until the next open
        first = True
        try:
            while time.monotonic() < min(deadline, self._end_by):
                if first and self._stop.is_set():
                    break  # never opened before the end: not part of the room
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
                        answer, _ = self._take(seen, joined, pending and pending["client_id"], first_join=first)
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
                        if pending is not None and answer is None:
                            # As the page does with its outbox: the same post, the same client_id.
                            pending["sent"] = time.monotonic()
                            await ws.send(json.dumps(pending["frame"]))
                        next_post = time.monotonic() + random.random() * self.send_interval
                        while time.monotonic() < min(deadline, self._end_by):
                            now = time.monotonic()
                            if answer is not None:
                                self._record_answer(pending["body"], answer)
                                pending, answer, next_post = None, None, now + self.send_interval
                            if pending is not None and now - pending["sent"] > ANSWER_TIMEOUT:
                                with self._lock:
                                    self.counts.silent.append(pending["body"])
                                pending, next_post = None, now + self.send_interval
                            stopping = self._stop.is_set()
                            if sender and not stopping and pending is None and now >= next_post:
                                posted += 1
                                body = f"{self.tag} {index}-{posted}"
                                pending = {"body": body, "client_id": f"{self.tag}-{index}-{posted}", "sent": now}
                                pending["frame"] = {"type": "message", "nickname": f"client{index}", "body": body,
                                                    "client_id": pending["client_id"]}
                                await ws.send(json.dumps(pending["frame"]))
                            if stopping and pending is None:
                                finished = self._post_answered(finished)
                            if finished and self._all_answered.is_set():
                                # Every sender's last post is answered: nothing
                                # is stored after this catch-up.
                                await self._catch_up(ws, seen)
                                with self._lock:
                                    self.counts.seen.append(seen)
                                return
                            try:
                                frame = json.loads(await asyncio.wait_for(ws.recv(), 0.25))
                            except TimeoutError:
                                continue
                            before = seen.contiguous()
                            answer, gap = self._take(seen, frame, pending and pending["client_id"])
                            if frame.get("type") == "history":
                                # Pages are capped: ask on only while they make progress.
                                asking = False
                                gap = gap and seen.contiguous() > before
                            if gap and not asking:
                                asking = True
                                await ws.send(json.dumps({"type": "history", "since": seen.contiguous()}))
                except ConnectionClosed as error:
                    code = error.rcvd.code if error.rcvd else 1006
                    with self._lock:
                        self.counts.closes.append((code, in_room))
                        if not in_room:
                            self.counts.closed_on_join.append(code)
                    closed = closed or (code, time.monotonic())
                except Exception as error:  # a refused or failed handshake
                    with self._lock:
                        self.counts.ws_failed_handshakes.append(repr(error)[:200])
                    closed = closed or ("handshake", time.monotonic())
                if pending is not None and pending["body"] not in self.counts.resent:
                    # The socket closed under a post: the server may or may not
                    # have it. It goes again after the reconnect.
                    with self._lock:
                        self.counts.resent.append(pending["body"])
                if at_once and in_room:
                    continue  # the first try after a close: no pause
                # The page's first retry: half to all of 500 ms.
                await asyncio.sleep(0.25 + random.random() * 0.25)
            # Out of time before the end was reached.
            if pending is not None:
                with self._lock:
                    self.counts.silent.append(pending["body"])
            with self._lock:
                self.counts.seen.append(None)
        finally:
            # Never keep the others waiting for a client that gave up.
            self._post_answered(finished)

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
            self._all_answered = asyncio.Event()
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
        # A last moment of traffic after the change, then stop: the last
        # answers may take ANSWER_TIMEOUT, the reconnects and catching up more.
        time.sleep(1)
        self._end_by = time.monotonic() + ANSWER_TIMEOUT + self.END_GRACE
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=ANSWER_TIMEOUT + self.END_GRACE + 15)
        return False
