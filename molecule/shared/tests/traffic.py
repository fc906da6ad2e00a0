"""Live clients for checks that change the host under traffic (deploys, faults).

`Traffic` runs, in background threads, bounded HTTP polling of a path and a
room of WebSocket clients that behave like the page: on a close they come
back after the page's first jittered pause and count what they saw. Each
loop ends when the block ends or at `max_seconds`, whichever comes first.
"""

import asyncio
import json
import random
import threading
import time
from dataclasses import dataclass, field

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed


@dataclass
class Counts:
    http_ok: int = 0
    http_failed: list = field(default_factory=list)
    releases_seen: list = field(default_factory=list)
    # (close code, seconds from the close to the next open handshake)
    reconnects: list = field(default_factory=list)
    ws_failed_handshakes: list = field(default_factory=list)


class Traffic:
    # The defaults stay inside Nginx's per-address limits (the clients all
    # come from one address): 4 x 4 requests/s against 20/s for pages, and
    # sockets opened at 8/s against 10 handshakes/s.
    def __init__(self, edge, room, http_clients=4, http_interval=0.25, sockets=50,
                 max_seconds=600, path="/healthz", opens_per_second=8):
        self.edge, self.room, self.path = edge, room, path
        self.http_clients, self.http_interval = http_clients, http_interval
        self.sockets, self.max_seconds = sockets, max_seconds
        self.opens_per_second = opens_per_second
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
                status, body = self.edge.get(self.path, timeout=10)
                if status != 200:
                    raise ValueError(f"HTTP {status}: {body[:100]}")
                release = json.loads(body).get("release")
                with self._lock:
                    self.counts.http_ok += 1
                    if not self.counts.releases_seen or self.counts.releases_seen[-1] != release:
                        self.counts.releases_seen.append(release)
            except (OSError, ValueError) as error:
                with self._lock:
                    self.counts.http_failed.append(repr(error)[:200])
            time.sleep(self.http_interval)

    # --- WebSockets ---
    async def _client(self, deadline, start_after):
        url = f"{self.edge.ws_base}/ws/chat/{self.room}/"
        await asyncio.sleep(start_after)
        closed = None  # (close code, when) of the last drop, until the next open
        first = True
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                tls = self.edge.ssl if url.startswith("wss:") else None
                async with connect(url, origin=self.edge.origin, open_timeout=10, ssl=tls) as ws:
                    if closed is not None:
                        with self._lock:
                            self.counts.reconnects.append((closed[0], time.monotonic() - closed[1]))
                        closed = None
                    await asyncio.wait_for(ws.recv(), 10)  # the history frame
                    if first:
                        first = False
                        with self._lock:
                            self._open += 1
                            if self._open == self.sockets:
                                self._ready.set()
                    while not self._stop.is_set() and time.monotonic() < deadline:
                        try:
                            await asyncio.wait_for(ws.recv(), 0.5)
                        except TimeoutError:
                            continue
                    return
            except ConnectionClosed as error:
                closed = closed or (error.rcvd.code if error.rcvd else 1006, time.monotonic())
            except Exception as error:  # a refused or failed handshake
                with self._lock:
                    self.counts.ws_failed_handshakes.append(repr(error)[:200])
                closed = closed or ("handshake", time.monotonic())
            # The page's first retry: half to all of 500 ms.
            await asyncio.sleep(0.25 + random.random() * 0.25)

    def _room(self):
        async def run():
            deadline = time.monotonic() + self.max_seconds
            await asyncio.gather(*(self._client(deadline, n / self.opens_per_second)
                                   for n in range(self.sockets)))

        asyncio.run(run())

    def __enter__(self):
        for _ in range(self.http_clients):
            self._threads.append(threading.Thread(target=self._poll, daemon=True))
        if self.sockets:
            self._threads.append(threading.Thread(target=self._room, daemon=True))
        for thread in self._threads:
            thread.start()
        if self.sockets and not self._ready.wait(60):
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
