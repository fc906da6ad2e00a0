#!/usr/bin/env python3
"""The project's load generator: WebSocket rooms, handshake bursts, idle sockets, HTTP.

Every scenario is bounded in count and in time and stops by itself. Work is
spread over several processes (`--procs`): one process may hold at most as many
sockets as its descriptor limit (20,000 on our machines). Each prints one JSON
object on stdout; bench.sh stores it and report.py turns it into tables.

    loadgen.py fanout --members 100 --senders 25 --rate 8 --duration 20 --drain 20
    loadgen.py burst  --count 10000
    loadgen.py idle   --count 20000 --hold 30 --rss-cmd 'docker exec chat-bench ...'
    loadgen.py http   --path /healthz [--unix /proc/PID/root/run/chat/gunicorn.sock]

Everything goes to --connect HOST:PORT (the benchmark container's own address,
port 443) over TLS, with --server-name (localhost) as the SNI name, the Host
header and the name checked in the certificate, which is pinned with --cafile
(the host's self-signed one): the edge refuses a handshake without a name it
serves, and the app a WebSocket whose Origin (--origin) is not the site's.
--plain speaks clear text instead (the Nginx ceiling server, Gunicorn's
unix socket).
"""

import argparse
import asyncio
import json
import multiprocessing
import os
import resource
import ssl
import subprocess
import sys
import time
import uuid

import websockets
from websockets.asyncio.client import connect

ORIGIN = "https://localhost"


def percentiles(values, points=(50, 95, 99)):
    if not values:
        return {f"p{p}": None for p in points}
    ordered = sorted(values)
    return {f"p{p}": ordered[min(len(ordered) - 1, int(len(ordered) * p / 100))] for p in points}


def split(total, parts):
    """`total` spread over `parts` as evenly as possible."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def raise_nofile():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def tls_context(args):
    """None for --plain; otherwise a client context that trusts --cafile only."""
    if args.plain:
        return None
    if not args.cafile:
        sys.exit("--cafile (the site's certificate) is required for TLS, or --plain")
    context = ssl.create_default_context(cafile=args.cafile)
    # HTTP/1.1: what the load generator speaks (Nginx offers h2 too).
    context.set_alpn_protocols(["http/1.1"])
    return context


def ws_connect(args, path, **extra):
    """A connect() to the site's PATH; EXTRA replaces any of the defaults (max_queue)."""
    host, port = args.connect.rsplit(":", 1)
    tls = {} if args.plain else {"ssl": args.tls, "server_hostname": args.server_name}
    options = dict(
        host=host,
        port=int(port),
        origin=args.origin,
        **tls,
        compression=None,
        # Never through a proxy from the environment: only the benchmark host.
        proxy=None,
        ping_interval=None,
        open_timeout=args.open_timeout,
        max_size=None,
        max_queue=None,
    )
    options.update(extra)
    return connect(f"{'ws' if args.plain else 'wss'}://{args.server_name}{path}", **options)


# Room fan-out --------------------------------------------------------------


class Member:
    """One room member: records latency of each message by the send time in its body."""

    def __init__(self, ws, stats):
        self.ws = ws
        self.stats = stats
        self.last_seq = 0
        self.seen = set()

    def take(self, message):
        seq = message["seq"]
        if seq in self.seen:
            self.stats["duplicates"] += 1
            return
        self.seen.add(seq)
        if seq < self.last_seq:
            self.stats["out_of_order"] += 1
        self.last_seq = max(self.last_seq, seq)
        body = message["body"]
        if body.startswith("t="):
            sent = float(body[2:].split(";", 1)[0])
            self.stats["latencies"].append(time.time() - sent)

    async def read(self, until):
        while True:
            remaining = until - time.monotonic()
            if remaining <= 0:
                return
            try:
                text = await asyncio.wait_for(self.ws.recv(), remaining)
            except (asyncio.TimeoutError, websockets.ConnectionClosed):
                return
            self.stats["frames"] += 1
            frame = json.loads(text)
            kind = frame.get("type")
            if kind == "message":
                self.take(frame)
            elif kind in ("batch", "history"):
                for message in frame["messages"]:
                    self.take(message)
            elif kind == "behind":
                # What room.js does: fetch the dropped range from history.
                self.stats["behind"] += 1
                await self.ws.send(json.dumps({"type": "history", "since": frame["since"]}))
            elif kind == "error":
                self.stats["errors"][frame["code"]] = self.stats["errors"].get(frame["code"], 0) + 1


async def sender(ws, rate, start, stop, stats, tag):
    interval = 1.0 / rate
    number = 0
    next_at = start
    while True:
        now = time.monotonic()
        if now >= stop:
            return
        if next_at > now:
            await asyncio.sleep(next_at - now)
        body = f"t={time.time():.6f};{tag};{number}"
        try:
            await ws.send(json.dumps({"type": "message", "nickname": "bench", "body": body}))
        except websockets.ConnectionClosed:
            return
        stats["sent"] += 1
        number += 1
        next_at += interval


async def fanout_worker(args, index, members, senders, ready, go_at):
    stats = {"sent": 0, "frames": 0, "latencies": [], "behind": 0, "duplicates": 0,
             "out_of_order": 0, "errors": {}, "connected": 0, "failed": 0, "retries": 0}
    path = f"/ws/chat/{args.room}/"
    gate = asyncio.Semaphore(args.connect_concurrency)

    async def open_one():
        # Members must all be in the room before it is measured: a refused
        # handshake (the burst scenario measures those) is retried.
        for attempt in range(8):
            async with gate:
                try:
                    ws = await ws_connect(args, path)
                    await ws.recv()  # the join history: the member is in the room now
                    stats["connected"] += 1
                    return ws
                except Exception:
                    stats["retries"] += 1
            await asyncio.sleep(0.2 * 2 ** attempt)
        stats["failed"] += 1
        return None

    sockets = [ws for ws in await asyncio.gather(*(open_one() for _ in range(members))) if ws]
    ready.put(index)
    while go_at.value == 0:
        await asyncio.sleep(0.01)
    # Wall-clock start shared by every process, turned into this one's monotonic clock.
    start = time.monotonic() + (go_at.value - time.time())
    stop_sending = start + args.duration
    stop_reading = stop_sending + args.drain
    room_members = [Member(ws, stats) for ws in sockets]
    tasks = [asyncio.create_task(m.read(stop_reading)) for m in room_members]
    for number, ws in enumerate(sockets[:senders]):
        # Spread the senders' ticks over one interval rather than all at once.
        offset = (number / max(senders, 1)) / args.rate
        tasks.append(asyncio.create_task(
            sender(ws, args.rate, start + offset, stop_sending, stats, f"w{index}s{number}")))
    await asyncio.gather(*tasks)
    await asyncio.gather(*(ws.close() for ws in sockets), return_exceptions=True)
    return stats


def run_fanout_process(args, index, members, senders, ready, go_at, out):
    raise_nofile()
    out.put(asyncio.run(fanout_worker(args, index, members, senders, ready, go_at)))


def fanout(args):
    args.room = args.room or f"bench-{uuid.uuid4().hex[:8]}"
    ctx = multiprocessing.get_context("fork")
    ready, out = ctx.Queue(), ctx.Queue()
    go_at = ctx.Value("d", 0.0)
    member_split = split(args.members, args.procs)
    sender_split = split(args.senders, args.procs)
    procs = [
        ctx.Process(target=run_fanout_process,
                    args=(args, i, member_split[i], sender_split[i], ready, go_at, out))
        for i in range(args.procs)
    ]
    for p in procs:
        p.start()
    for _ in procs:
        ready.get(timeout=args.open_timeout * 10 + 120)
    cpu_before = cpu_ns(args.cpu_cmd)
    go_at.value = time.time() + 1.0
    results = [out.get(timeout=args.duration + args.drain + 120) for _ in procs]
    cpu_after = cpu_ns(args.cpu_cmd)
    for p in procs:
        p.join(timeout=30)
    connected = sum(r["connected"] for r in results)
    sent = sum(r["sent"] for r in results)
    latencies = [x for r in results for x in r["latencies"]]
    expected = sent * connected
    in_time = sum(1 for x in latencies if x <= args.duration + args.drain)
    measured = cpu_before is not None and cpu_after is not None
    errors = {}
    for r in results:
        for code, n in r["errors"].items():
            errors[code] = errors.get(code, 0) + n
    return {
        "scenario": "fanout",
        "room_members": args.members,
        "connected": connected,
        "failed_handshakes": sum(r["failed"] for r in results),
        "handshake_retries": sum(r["retries"] for r in results),
        "senders": args.senders,
        "rate_per_sender": args.rate,
        "duration_s": args.duration,
        "drain_s": args.drain,
        "sent": sent,
        "deliveries_expected": expected,
        "deliveries": len(latencies),
        "delivered_pct": round(100.0 * in_time / expected, 2) if expected else None,
        "latency_s": {k: (round(v, 4) if v is not None else None)
                      for k, v in percentiles(latencies).items()},
        "latency_max_s": round(max(latencies), 4) if latencies else None,
        "frames": sum(r["frames"] for r in results),
        "frames_per_s": round(sum(r["frames"] for r in results) / args.duration, 1),
        "messages_per_s": round(len(latencies) / args.duration, 1),
        "behind_frames": sum(r["behind"] for r in results),
        "duplicates": sum(r["duplicates"] for r in results),
        "out_of_order": sum(r["out_of_order"] for r in results),
        "errors": errors,
        # The server's CPU time over sending and draining: unlike latency, it
        # hardly depends on what else runs on the machine.
        "server_cpu_s": round((cpu_after - cpu_before) / 1e9, 2) if measured else None,
        "server_cpu_ms_per_1000_deliveries": (
            round((cpu_after - cpu_before) / 1e6 / len(latencies) * 1000, 1)
            if measured and latencies else None),
        # For the latency-against-load plot: the sorted latencies, thinned.
        "latency_sample": sorted(latencies)[:: max(1, len(latencies) // 2000)],
    }


# Handshake burst and idle sockets -------------------------------------------------


def status_of(error):
    response = getattr(error, "response", None)
    return getattr(response, "status_code", None)


async def hold_worker(args, count, ready, release, concurrency):
    """Opens `count` sockets (at most `concurrency` handshakes in flight) and holds them."""
    path = "/ws/chat/bench-idle/"
    result = {"accepted": 0, "status": {}, "refused": 0, "timeouts": 0, "other": {},
              "still_open": 0, "connect_s": 0.0}
    gate = asyncio.Semaphore(concurrency)

    async def open_one():
        async with gate:
            try:
                ws = await ws_connect(args, path)
                await asyncio.wait_for(ws.recv(), args.open_timeout)
                result["accepted"] += 1
                return ws
            except websockets.InvalidStatus as error:
                code = str(status_of(error))
                result["status"][code] = result["status"].get(code, 0) + 1
            except ConnectionRefusedError:
                result["refused"] += 1
            except (asyncio.TimeoutError, TimeoutError):
                result["timeouts"] += 1
            except Exception as error:  # counted by kind: the report says what failed
                name = type(error).__name__
                result["other"][name] = result["other"].get(name, 0) + 1
            return None

    began = time.monotonic()
    sockets = [ws for ws in await asyncio.gather(*(open_one() for _ in range(count))) if ws]
    result["connect_s"] = round(time.monotonic() - began, 2)
    ready.put(result["accepted"])
    deadline = time.monotonic() + args.hold + 60
    while release.value == 0 and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    # Still open after the hold: a ping answered by the server proves it. A
    # few hundred in flight at a time, each with time enough on a busy
    # machine: a late pong is counted apart from a socket that was closed.
    pings = asyncio.Semaphore(200)

    async def alive(ws):
        async with pings:
            try:
                await asyncio.wait_for(await ws.ping(), 30)
                return "open"
            except websockets.ConnectionClosed:
                return "closed"
            except (asyncio.TimeoutError, TimeoutError):
                return "no_pong"
            except Exception:
                return "closed"
    states = await asyncio.gather(*(alive(ws) for ws in sockets))
    result["still_open"] = states.count("open")
    result["closed"] = states.count("closed")
    result["no_pong"] = states.count("no_pong")
    await asyncio.gather(*(ws.close() for ws in sockets), return_exceptions=True)
    return result


def run_hold_process(args, count, ready, release, out, concurrency):
    result = {"nofile": raise_nofile()}
    result.update(asyncio.run(hold_worker(args, count, ready, release, concurrency)))
    out.put(result)


def cpu_ns(command):
    """Cumulative CPU nanoseconds of the server (its cgroup's cpuacct.usage)."""
    if not command:
        return None
    output = subprocess.run(command, shell=True, capture_output=True, text=True, timeout=60).stdout
    try:
        return int(float(output.split()[0]))
    except (IndexError, ValueError):
        return None  # not measurable here; the report says so


def rss_kib(command):
    """Sum of the numbers a command prints (ps -o rss= in the container)."""
    if not command:
        return None
    output = subprocess.run(command, shell=True, capture_output=True, text=True, timeout=60).stdout
    return sum(int(x) for x in output.split() if x.isdigit())


def hold(args, scenario):
    ctx = multiprocessing.get_context("fork")
    ready, out = ctx.Queue(), ctx.Queue()
    release = ctx.Value("i", 0)
    # A burst: every handshake at once. Idle: a steady ramp the server can take.
    concurrency = args.count if scenario == "burst" else args.ramp
    rss_before = rss_kib(args.rss_cmd)
    began = time.monotonic()
    procs = [ctx.Process(target=run_hold_process, args=(args, n, ready, release, out, concurrency))
             for n in split(args.count, args.procs)]
    for p in procs:
        p.start()
    accepted = sum(ready.get(timeout=args.open_timeout * 4 + args.count / 50 + 120) for _ in procs)
    connect_s = time.monotonic() - began
    time.sleep(args.hold)
    rss_held = rss_kib(args.rss_cmd)
    release.value = 1
    results = [out.get(timeout=args.count / 20 + 240) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    merged = {"status": {}, "other": {}}
    for r in results:
        for key in ("status", "other"):
            for k, v in r[key].items():
                merged[key][k] = merged[key].get(k, 0) + v
    report = {
        "scenario": scenario,
        "attempted": args.count,
        "accepted": accepted,
        "http_status": merged["status"],
        "refused": sum(r["refused"] for r in results),
        "timeouts": sum(r["timeouts"] for r in results),
        "other_errors": merged["other"],
        "still_open_after_hold": sum(r["still_open"] for r in results),
        "closed_before_ping": sum(r["closed"] for r in results),
        "no_pong_in_30s": sum(r["no_pong"] for r in results),
        "hold_s": args.hold,
        "connect_s": round(connect_s, 2),
        "handshakes_per_s": round(accepted / connect_s, 1) if connect_s else None,
        "client_nofile_per_process": results[0]["nofile"] if results else None,
        "procs": args.procs,
    }
    if rss_before is not None and rss_held is not None and accepted:
        report["server_rss_kib_before"] = rss_before
        report["server_rss_kib_held"] = rss_held
        report["kib_per_connection"] = round((rss_held - rss_before) / accepted, 1)
    return report


# HTTP ----------------------------------------------------------------------


async def http_worker(args, stop_at, out):
    extra = "".join(f"{header}\r\n" for header in args.header)
    request = (f"GET {args.path} HTTP/1.1\r\nHost: {args.server_name}\r\n"
               f"User-Agent: chat-bench\r\n{extra}\r\n").encode()
    latencies, status = [], {}
    errors = 0

    async def one_connection():
        nonlocal errors
        reader = writer = None
        while time.monotonic() < stop_at:
            try:
                if writer is None:
                    if args.unix:
                        reader, writer = await asyncio.open_unix_connection(args.unix)
                    else:
                        host, port = args.connect.rsplit(":", 1)
                        tls = {} if args.plain else {"ssl": args.tls, "server_hostname": args.server_name}
                        reader, writer = await asyncio.open_connection(host, int(port), **tls)
                began = time.monotonic()
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                code = lines[0].split(" ", 2)[1]
                headers = {k.lower(): v.strip() for k, _, v in (l.partition(":") for l in lines[1:] if l)}
                if "content-length" in headers:
                    await reader.readexactly(int(headers["content-length"]))
                else:
                    await reader.read()  # until close
                latencies.append(time.monotonic() - began)
                status[code] = status.get(code, 0) + 1
                if headers.get("connection", "").lower() == "close" or "content-length" not in headers:
                    writer.close()
                    writer = None
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, IndexError):
                errors += 1
                if writer is not None:
                    writer.close()
                writer = None
                await asyncio.sleep(0.01)
        if writer is not None:
            writer.close()

    await asyncio.gather(*(one_connection() for _ in range(args.conns)))
    out.put({"latencies": latencies, "status": status, "errors": errors})


def run_http_process(args, stop_at_wall, out):
    stop_at = time.monotonic() + (stop_at_wall - time.time())
    asyncio.run(http_worker(args, stop_at, out))


def http(args):
    args.conns = max(1, args.conns // args.procs)
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    stop_at_wall = time.time() + args.duration
    procs = [ctx.Process(target=run_http_process, args=(args, stop_at_wall, out))
             for _ in range(args.procs)]
    for p in procs:
        p.start()
    results = [out.get(timeout=args.duration + 60) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    latencies = [x for r in results for x in r["latencies"]]
    status = {}
    for r in results:
        for k, v in r["status"].items():
            status[k] = status.get(k, 0) + v
    return {
        "scenario": "http",
        "target": args.label or args.path,
        "path": args.path,
        "via": "unix:" + args.unix if args.unix else ("http://" if args.plain else "https://") + args.connect,
        "connections": args.conns * args.procs,
        "duration_s": args.duration,
        "requests": len(latencies),
        "req_per_s": round(len(latencies) / args.duration, 1),
        "status": status,
        "errors": sum(r["errors"] for r in results),
        "latency_s": {k: (round(v, 5) if v is not None else None)
                      for k, v in percentiles(latencies).items()},
    }


def add_connection_arguments(parser):
    """Where the load goes and how it is spoken (loadgen.py and soak.py)."""
    parser.add_argument("--connect", default="127.0.0.1:443", help="HOST:PORT to connect to")
    parser.add_argument("--server-name", default="localhost",
                        help="the site's name: SNI, Host header and certificate name")
    parser.add_argument("--cafile", default="", help="the site's certificate (PEM), trusted alone")
    parser.add_argument("--plain", action="store_true", help="clear text instead of TLS")
    parser.add_argument("--origin", default=ORIGIN)
    parser.add_argument("--open-timeout", type=float, default=30)


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_connection_arguments(parser)
    parser.add_argument("--procs", type=int, default=4)
    sub = parser.add_subparsers(dest="scenario", required=True)

    f = sub.add_parser("fanout")
    f.add_argument("--room", default="")
    f.add_argument("--members", type=int, required=True)
    f.add_argument("--senders", type=int, required=True)
    f.add_argument("--rate", type=float, required=True, help="messages/s per sender")
    f.add_argument("--duration", type=float, default=20)
    f.add_argument("--drain", type=float, default=20)
    f.add_argument("--cpu-cmd", default="", help="prints the server's CPU nanoseconds so far")
    f.add_argument("--connect-concurrency", type=int, default=10,
                   help="handshakes in flight per process")

    for name in ("burst", "idle"):
        h = sub.add_parser(name)
        h.add_argument("--count", type=int, required=True)
        h.add_argument("--hold", type=float, default=5 if name == "burst" else 30)
        h.add_argument("--ramp", type=int, default=10, help="handshakes in flight per process (idle)")
        h.add_argument("--rss-cmd", default="", help="prints the server's RSS in KiB")

    w = sub.add_parser("http")
    w.add_argument("--path", required=True)
    w.add_argument("--label", default="")
    w.add_argument("--header", action="append", default=[], metavar="NAME: VALUE",
                   help="an extra request header (e.g. X-Forwarded-Proto: https to Gunicorn)")
    w.add_argument("--unix", default="")
    w.add_argument("--conns", type=int, default=64)
    w.add_argument("--duration", type=float, default=10)

    args = parser.parse_args()
    args.plain = args.plain or bool(getattr(args, "unix", ""))
    args.tls = tls_context(args)
    # Hard bounds whatever the arguments: at most 10 minutes and 60,000 sockets.
    for name in ("duration", "drain", "hold"):
        if getattr(args, name, 0) > 300:
            sys.exit(f"--{name} is capped at 300 s")
    if getattr(args, "count", 0) > 60000 or getattr(args, "members", 0) > 60000:
        sys.exit("at most 60000 sockets")
    if args.scenario == "fanout":
        result = fanout(args)
    elif args.scenario in ("burst", "idle"):
        result = hold(args, args.scenario)
    else:
        result = http(args)
    result["loadgen"] = {"websockets": websockets.__version__, "python": sys.version.split()[0],
                         "pid": os.getpid(), "argv": sys.argv[1:]}
    json.dump(result, sys.stdout)
    print()


if __name__ == "__main__":
    main()
