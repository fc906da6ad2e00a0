#!/usr/bin/env python3
"""The soak: a realistic mix against the benchmark host for an hour or more, sampled every 30 s.

    soak.py run --duration 3600 --sample-cmd CMD [--deploy-at S --deploy-cmd CMD] [connection] > soak.json
    soak.py report RESULTS      RESULTS/soak.json.xz -> RESULTS/results.md and RESULTS/soak.png

What runs (scripts/bench.sh soak starts it); every loop is bounded in count
and in time, and all of it stops at --duration (at most four hours):
- rooms whose members stay the whole run: ten of 2 (a message every 2 s in
  each), three of 20 (2 msg/s each), one of 200 (1 msg/s) and a busy one of
  20 (20 msg/s). When the server closes one of them (a deploy restarts the
  servers) it reconnects at once and asks for what it missed, as room.js does;
- churn, from the first minute until two minutes before the end: --churn
  sockets a second join a room of 20 or the busy one and leave again, at
  most --churn-max at once. A quarter of them close cleanly after 2-30 s, a
  quarter vanish with a TCP reset, a quarter stop reading (so they answer no
  ping) and are reset after 70 s, past Daphne's ping timeout, and a quarter
  read two frames a second in the busy room for a minute, so that their
  backlog fills (`behind` notices);
- pages (the lobby, a room's) and /healthz, --http-rate a second, each on a
  connection of its own;
- the deploy (--deploy-cmd, a changed release) once, at --deploy-at.

Every 30 s a sample: what --sample-cmd prints on the host (per unit: resident
memory, open descriptors, processes; Redis's connected clients), and for the
30 s just past the fan-out's p50 and p99 (live messages only, by the send time
in their body), handshakes and requests that failed, the app's error frames,
`behind` notices and the closes the stable members saw.
"""

import argparse
import asyncio
import json
import random
import socket
import struct
import sys
import time
import uuid

import websockets

from loadgen import add_connection_arguments, percentiles, raise_nofile, tls_context, ws_connect

SAMPLE_EVERY = 30.0
# Rooms whose members stay: (members, messages per second in the room, how many such rooms).
STABLE_ROOMS = ((2, 0.5, 10), (20, 2.0, 3), (200, 1.0, 1))
BUSY_ROOM = (20, 20.0)
CHURN_KINDS = ("clean", "reset", "silent", "slow")
# Daphne pings a silent socket after 20 s and gives up 30 s later
# (daphne_ping_interval, daphne_ping_timeout): a silent one is kept past both.
SILENT_HOLD = 70.0


class Window:
    """What happened in the current 30 s, handed to the sampler and started anew."""

    def __init__(self):
        self.latencies = []
        self.counts = {}

    def add(self, key, n=1):
        self.counts[key] = self.counts.get(key, 0) + n

    def take(self):
        latencies, counts = self.latencies, self.counts
        self.latencies, self.counts = [], {}
        return latencies, counts


class Soak:
    def __init__(self, args):
        self.args = args
        self.window = Window()
        self.started = time.monotonic()
        self.stop_at = self.started + args.duration
        # Churn runs between these; the last two minutes show what the server
        # gives back once it stops.
        self.churn_from = self.started + min(60.0, args.duration / 5)
        self.churn_until = self.stop_at - min(120.0, args.duration / 3)
        self.prefix = f"soak-{uuid.uuid4().hex[:6]}"
        self.events = []
        self.churning = 0

    def now(self):
        return round(time.monotonic() - self.started, 1)

    def remaining(self):
        return self.stop_at - time.monotonic()

    # The frames of a member: live messages give a latency (to the members
    # that stay only: a slow reader's are as late as it makes them); the
    # rest is counted.
    def read_frame(self, text, member, timed=True):
        frame = json.loads(text)
        kind = frame.get("type")
        if kind in ("message", "batch"):
            for message in frame.get("messages", [frame]):
                member["last_seq"] = max(member["last_seq"], message["seq"])
                body = message.get("body", "")
                if timed and body.startswith("t="):
                    self.window.latencies.append(time.time() - float(body[2:].split(";", 1)[0]))
        elif kind == "history":
            for message in frame["messages"]:
                member["last_seq"] = max(member["last_seq"], message["seq"])
        elif kind == "behind":
            self.window.add("behind")
            return {"type": "history", "since": frame["since"]}
        elif kind == "error":
            self.window.add(f"error:{frame.get('code')}")
        return None

    async def member(self, room, sends_per_s):
        """A member for the whole run; reconnects at once after a close, and catches up."""
        member = {"last_seq": 0}
        failures = 0
        while self.remaining() > 0:
            try:
                ws = await ws_connect(self.args, f"/ws/chat/{room}/")
            except Exception as error:
                self.window.add(f"handshake_failed:{type(error).__name__}")
                failures += 1
                await asyncio.sleep(min(2.0, 0.1 * 2 ** failures))
                continue
            failures = 0
            self.window.add("handshakes")
            if member["last_seq"]:
                await ws.send(json.dumps({"type": "history", "since": member["last_seq"]}))
            sender = asyncio.create_task(self.post(ws, room, sends_per_s)) if sends_per_s else None
            try:
                while True:
                    text = await asyncio.wait_for(ws.recv(), max(0.1, self.remaining()))
                    answer = self.read_frame(text, member)
                    if answer:
                        await ws.send(json.dumps(answer))
            except asyncio.TimeoutError:
                await ws.close()
                return
            except websockets.ConnectionClosed as closed:
                code = closed.rcvd.code if closed.rcvd else "none"
                self.window.add(f"member_closed:{code}")
            except Exception as error:  # counted, and the member connects again
                self.window.add(f"member_failed:{type(error).__name__}")
            finally:
                if sender:
                    sender.cancel()

    async def post(self, ws, room, rate):
        number = 0
        next_at = time.monotonic() + random.random() / rate
        while self.remaining() > 0:
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            next_at += 1.0 / rate
            body = f"t={time.time():.6f};{room};{number}"
            try:
                await ws.send(json.dumps({"type": "message", "nickname": "soak", "body": body}))
            except websockets.ConnectionClosed:
                return  # the member reconnects, and a new sender starts
            self.window.add("sent")
            number += 1

    async def churner(self, kind, room):
        """One socket that joins ROOM and leaves in KIND's way."""
        self.churning += 1
        try:
            # A slow reader lets its queue hold four frames: past that the
            # library stops reading the socket, and the server's backlog grows.
            ws = await ws_connect(self.args, f"/ws/chat/{room}/", **({"max_queue": 4} if kind == "slow" else {}))
        except Exception as error:
            self.window.add(f"handshake_failed:{type(error).__name__}")
            self.churning -= 1
            return
        self.window.add("handshakes")
        self.window.add(f"churn:{kind}")
        member = {"last_seq": 0}
        try:
            if kind == "silent":
                # Nothing read from now on: no pong goes back.
                ws.transport.pause_reading()
                await asyncio.sleep(min(SILENT_HOLD, max(0.0, self.remaining())))
                reset(ws)
                return
            hold = 60.0 if kind == "slow" else random.uniform(2, 30)
            until = time.monotonic() + min(hold, max(0.0, self.remaining()))
            while time.monotonic() < until:
                text = await asyncio.wait_for(ws.recv(), max(0.1, until - time.monotonic()))
                self.read_frame(text, member, timed=False)
                if kind == "slow":
                    await asyncio.sleep(0.5)
        except asyncio.TimeoutError:
            pass
        except websockets.ConnectionClosed as closed:
            self.window.add(f"churn_closed_by_server:{closed.rcvd.code if closed.rcvd else 'none'}")
            return
        except Exception as error:  # counted; the socket is dropped
            self.window.add(f"churn_failed:{type(error).__name__}")
            ws.transport.abort()
            return
        finally:
            self.churning -= 1
        if kind == "reset":
            reset(ws)
        else:
            await ws.close()

    async def churn(self):
        busy = f"{self.prefix}-busy"
        rooms = [f"{self.prefix}-20-{i}" for i in range(STABLE_ROOMS[1][2])]
        await asyncio.sleep(max(0.0, self.churn_from - time.monotonic()))
        self.events.append({"t": self.now(), "event": "churn starts"})
        tasks = set()
        interval = 1.0 / self.args.churn
        while time.monotonic() < self.churn_until:
            if self.churning < self.args.churn_max:
                kind = random.choice(CHURN_KINDS)
                room = busy if kind == "slow" else random.choice(rooms + [busy])
                task = asyncio.create_task(self.churner(kind, room))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            await asyncio.sleep(interval)
        self.events.append({"t": self.now(), "event": "churn stops"})
        await asyncio.gather(*tasks, return_exceptions=True)

    async def http(self):
        paths = ["/healthz", "/", f"/chat/{self.prefix}-20-0/"]
        host, port = self.args.connect.rsplit(":", 1)
        interval = 1.0 / self.args.http_rate
        number = 0
        while self.remaining() > 1:
            path = paths[number % len(paths)]
            number += 1
            began = time.monotonic()
            try:
                tls = {} if self.args.plain else {"ssl": self.args.tls, "server_hostname": self.args.server_name}
                reader, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port), **tls), 10)
                writer.write(f"GET {path} HTTP/1.1\r\nHost: {self.args.server_name}\r\n"
                             f"User-Agent: chat-soak\r\nConnection: close\r\n\r\n".encode())
                response = await asyncio.wait_for(reader.read(), 10)
                writer.close()
                status = response.split(b" ", 2)[1].decode() if response.startswith(b"HTTP/") else "none"
                self.window.add("http_ok" if status.startswith("2") else f"http_failed:{status}")
            except Exception as error:
                self.window.add(f"http_failed:{type(error).__name__}")
            await asyncio.sleep(max(0.0, interval - (time.monotonic() - began)))

    async def deploy(self):
        await asyncio.sleep(max(0.0, self.started + self.args.deploy_at - time.monotonic()))
        if self.remaining() <= 0:
            return
        self.events.append({"t": self.now(), "event": "deploy starts"})
        with open(self.args.deploy_log, "ab") as log:
            process = await asyncio.create_subprocess_shell(self.args.deploy_cmd, stdout=log, stderr=log)
            try:
                code = await asyncio.wait_for(process.wait(), max(1.0, self.remaining()))
            except asyncio.TimeoutError:
                process.kill()
                code = "killed at the end of the soak"
        self.events.append({"t": self.now(), "event": "deploy ends", "exit": code})

    async def sampler(self, samples):
        # Every 30 s, and a last one a second before the end, while the
        # members that stay are still there (they leave at the end).
        next_at = self.started + SAMPLE_EVERY
        while next_at < self.stop_at:
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            next_at = min(next_at + SAMPLE_EVERY, self.stop_at - 1.0) if next_at < self.stop_at - 1.0 else self.stop_at
            latencies, counts = self.window.take()
            host = await host_sample(self.args.sample_cmd)
            sample = {"t": self.now(), "churning": self.churning, "deliveries": len(latencies),
                      "latency_s": {k: (round(v, 4) if v is not None else None)
                                    for k, v in percentiles(latencies, (50, 99)).items()},
                      "counts": counts, **host}
            samples.append(sample)
            print(json.dumps({"t": sample["t"], "p99": sample["latency_s"]["p99"], "counts": counts}),
                  file=sys.stderr, flush=True)

    async def run(self):
        samples = []
        members = []
        for size, rate, count in STABLE_ROOMS:
            for i in range(count):
                room = f"{self.prefix}-{size}-{i}"
                members += [self.member(room, rate if n == 0 else 0) for n in range(size)]
        # The app lets one socket post 10 frames a second: the busy room's
        # messages come from four of its members.
        members += [self.member(f"{self.prefix}-busy", BUSY_ROOM[1] / 4 if n < 4 else 0)
                    for n in range(BUSY_ROOM[0])]
        tasks = [self.sampler(samples), self.churn(), self.http(), *members]
        if self.args.deploy_cmd:
            tasks.append(self.deploy())
        # Whatever a task raised ends the soak with its error, not a hang.
        await asyncio.wait_for(asyncio.gather(*tasks), self.args.duration + 300)
        return samples


def reset(ws):
    """Gone without a close: the TCP connection reset (SO_LINGER 0), as a client that vanished."""
    raw = ws.transport.get_extra_info("socket")
    if raw is not None:
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    ws.transport.abort()


async def host_sample(command):
    """Per unit: resident, proportional and private KiB, open descriptors and processes; Redis's clients.

    (soak-sample.sh; results from before it reported PSS and private memory have 4 fields a unit.)
    """
    process = await asyncio.create_subprocess_shell(command, stdout=asyncio.subprocess.PIPE,
                                                    stderr=asyncio.subprocess.DEVNULL)
    try:
        output, _ = await asyncio.wait_for(process.communicate(), 25)
    except asyncio.TimeoutError:
        process.kill()
        return {"units": {}, "sample_failed": True}
    units, extra = {}, {}
    for line in output.decode().splitlines():
        fields = line.split()
        if len(fields) in (4, 6) and all(f.isdigit() for f in fields[1:]):
            units[fields[0]] = dict(zip(("rss_kib", "fds", "procs", "pss_kib", "private_kib"), map(int, fields[1:])))
        elif len(fields) == 2 and fields[1].isdigit():
            extra[fields[0].replace("-", "_")] = int(fields[1])
    return {"units": units, **extra}


def run(args):
    if args.duration > 4 * 3600:
        sys.exit("--duration is capped at four hours")
    if args.churn_max > 500 or args.churn > 50 or args.http_rate > 50:
        sys.exit("at most 500 churning sockets, 50 new a second and 50 requests a second")
    raise_nofile()
    args.tls = tls_context(args)
    soak = Soak(args)
    began = time.time()
    samples = asyncio.run(soak.run())
    json.dump({"scenario": "soak", "started": began, "duration_s": args.duration,
               "churn_per_s": args.churn, "churn_max": args.churn_max, "http_per_s": args.http_rate,
               "stable_rooms": STABLE_ROOMS, "busy_room": BUSY_ROOM, "deploy_cmd": args.deploy_cmd,
               "events": soak.events, "samples": samples,
               "loadgen": {"websockets": websockets.__version__, "python": sys.version.split()[0]}},
              sys.stdout)
    print()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run")
    add_connection_arguments(r)
    r.add_argument("--duration", type=float, default=3600)
    r.add_argument("--churn", type=float, default=4, help="new churning sockets a second")
    r.add_argument("--churn-max", type=int, default=300)
    r.add_argument("--http-rate", type=float, default=5)
    r.add_argument("--sample-cmd", required=True, help="prints the host's per-unit figures")
    r.add_argument("--deploy-cmd", default="")
    r.add_argument("--deploy-at", type=float, default=1800)
    r.add_argument("--deploy-log", default="/dev/null")
    p = sub.add_parser("report")
    p.add_argument("results")
    args = parser.parse_args()
    if args.command == "run":
        run(args)
    else:
        import soakreport
        soakreport.report(args.results)


if __name__ == "__main__":
    main()
