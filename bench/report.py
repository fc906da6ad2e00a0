#!/usr/bin/env python3
"""Tables and a plot from a results folder of bench.sh, or ratios between two.

The raw samples are read from RESULTS/samples.json.xz (samples.py), wrk's
output from RESULTS/*.wrk.txt.

    report.py table RESULTS     writes RESULTS/results.md and RESULTS/plot.png
    report.py compare A B       prints B/A for every figure both folders have
    report.py layouts RESULTS   the layout matrix (scripts/bench.sh layouts): a
                                table and a plot per measure over
                                RESULTS/<layout>/, with ratios to split, in
                                RESULTS/results.md and RESULTS/layouts.png
"""

import pathlib
import re
import sys

import samples


def load(folder):
    folder = pathlib.Path(folder)
    results = samples.load(folder)
    for path in sorted(folder.glob("*.wrk.txt")):
        results[path.name[: -len(".wrk.txt")]] = parse_wrk(path.read_text())
    return results


def parse_wrk(text):
    """Requests/s and the 99th percentile from `wrk --latency`."""
    result = {"scenario": "wrk", "raw": text}
    rate = re.search(r"Requests/sec:\s+([\d.]+)", text)
    p99 = re.search(r"^\s+99%\s+([\d.]+)(us|ms|s)", text, re.M)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    if rate:
        result["req_per_s"] = float(rate.group(1))
    if p99:
        scale = {"us": 1e-6, "ms": 1e-3, "s": 1.0}[p99.group(2)]
        result["p99_s"] = round(float(p99.group(1)) * scale, 6)
    result["non_2xx"] = int(non2xx.group(1)) if non2xx else 0
    load = re.search(r"^load average: (.*)$", text, re.M)
    if load:
        result["load"] = load.group(1).replace("->", "→")
    return result


def ms(seconds):
    return "–" if seconds is None else f"{seconds * 1000:,.0f} ms" if seconds >= 0.01 else f"{seconds * 1000:.2f} ms"


def cpu_per_1000(r):
    value = r.get("server_cpu_ms_per_1000_deliveries")
    return "–" if value is None else f"{value} ms ({r['server_cpu_s']} s in all)"


def figures(results):
    """The headline figures, name -> (value, unit); what compare divides."""
    out = {}
    for name in ("fanout-100", "fanout-1000"):
        r = results.get(name)
        if r:
            out[f"{name} delivered %"] = r["delivered_pct"]
            out[f"{name} p50 s"] = r["latency_s"]["p50"]
            out[f"{name} p99 s"] = r["latency_s"]["p99"]
            out[f"{name} frames/s"] = r["frames_per_s"]
            out[f"{name} messages/s"] = r["messages_per_s"]
            out[f"{name} server CPU ms per 1000 deliveries"] = r.get("server_cpu_ms_per_1000_deliveries")
    if "burst" in results:
        out["burst accepted"] = results["burst"]["accepted"]
    if "idle" in results:
        out["idle held"] = results["idle"]["still_open_after_hold"]
        out["idle KiB/connection"] = results["idle"].get("kib_per_connection")
    for name, r in results.items():
        if r.get("scenario") == "http":
            out[f"{name} req/s"] = r["req_per_s"]
            out[f"{name} p99 s"] = r["latency_s"]["p99"]
        elif r.get("scenario") == "wrk" and "req_per_s" in r:
            out[f"{name} req/s"] = r["req_per_s"]
            out[f"{name} p99 s"] = r.get("p99_s")
    return out


def verdict(ok):
    return "met" if ok else "**not met**"


def targets(results):
    """Issue 10's targets next to what this run measured."""
    rows = []
    for name, members, bound in (("fanout-100", 100, 0.250), ("fanout-1000", 1000, 0.100)):
        r = results.get(name)
        if r:
            p99 = r["latency_s"]["p99"]
            ok = r["delivered_pct"] == 100 and p99 is not None and p99 < bound
            rows.append(f"| room of {members:,}, {r['senders'] * r['rate_per_sender']:g} msg/s in: 100 % delivered, "
                        f"p99 under {bound * 1000:.0f} ms | {r['delivered_pct']} %, p99 {ms(p99)} "
                        f"(load {r['loadavg_before']} → {r['loadavg_after']}) | {verdict(ok)} |")
    r = results.get("burst")
    if r:
        rows.append(f"| {r['attempted']:,} handshakes at once, all accepted | {r['accepted']:,} accepted "
                    f"| {verdict(r['accepted'] == r['attempted'])} |")
    r = results.get("idle")
    if r:
        held = r["still_open_after_hold"]
        rows.append(f"| {r['attempted']:,} idle sockets held on the demo host | {held:,} still answer a ping "
                    f"after {r['hold_s']:g} s | {verdict(held == r['attempted'])} |")
        per = r.get("kib_per_connection")
        if per:
            rows.append(f"| 50,000 on a host without the 20,000-descriptor limit (on paper) "
                        f"| 50,000 x {per} KiB = {50000 * per / 1024 / 1024:.2f} GiB of Daphne and Nginx memory, "
                        f"100,000 Nginx connections | arithmetic |")
    if not rows:
        return []
    return ["## Targets", "", "| target | measured | |", "|---|---|---|", *rows, ""]


def lost(r):
    """Sockets that did not answer the ping after the hold: closed, or only late."""
    if "closed_before_ping" not in r:
        return ""
    return f"; closed {r['closed_before_ping']:,}, no pong in 30 s {r['no_pong_in_30s']:,}"


def table(folder):
    folder = pathlib.Path(folder)
    results = load(folder)
    lines = [f"# Benchmark {folder.name}", ""]
    host = folder / "host.txt"
    if host.exists():
        lines += ["```", host.read_text().rstrip(), "```", ""]
    lines += targets(results)

    lines += ["## WebSocket fan-out (through Nginx, the app's protocol)", "",
              "| room | demand | delivered | p50 | p95 | p99 | max | frames/s | messages/s | behind | out of order | server CPU per 1,000 deliveries | load avg before → after |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in ("fanout-100", "fanout-1000"):
        r = results.get(name)
        if not r:
            continue
        demand = r["senders"] * r["rate_per_sender"] * r["connected"]
        lines.append(
            f"| {r['connected']} members, {r['senders']} sender(s) x {r['rate_per_sender']:g} msg/s "
            f"| {demand:,.0f} deliveries/s | {r['delivered_pct']} % "
            f"| {ms(r['latency_s']['p50'])} | {ms(r['latency_s']['p95'])} | {ms(r['latency_s']['p99'])} "
            f"| {ms(r['latency_max_s'])} | {r['frames_per_s']:,.0f} | {r['messages_per_s']:,.0f} "
            f"| {r['behind_frames']} | {r['out_of_order']} "
            f"| {cpu_per_1000(r)} | {r['loadavg_before']} → {r['loadavg_after']} |")
    lines.append("")

    lines += ["## Handshakes and idle sockets", "",
              "| scenario | attempted | accepted | HTTP errors | refused | timeouts | other | still open after hold | handshakes/s | memory per connection | load avg before → after |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in ("burst", "idle"):
        r = results.get(name)
        if not r:
            continue
        per = (f"{r['kib_per_connection']} KiB (RSS of the app servers' and Nginx's units' processes)"
               if r.get("kib_per_connection") else "–")
        lines.append(
            f"| {name} | {r['attempted']:,} | {r['accepted']:,} | {r['http_status'] or 0} | {r['refused']} "
            f"| {r['timeouts']} | {r['other_errors'] or 0} | {r['still_open_after_hold']:,} ({r['hold_s']:g} s{lost(r)}) "
            f"| {r['handshakes_per_s']} | {per} | {r.get('loadavg_before', '–')} → {r.get('loadavg_after', '–')} |")
    lines.append("")

    lines += ["## HTTP", "", "| target | client | req/s | p50 | p99 | non-2xx / errors | load avg before → after |",
              "|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        if r.get("scenario") == "http":
            bad = sum(n for code, n in r["status"].items() if not code.startswith("2"))
            lines.append(f"| {r['target']} | loadgen, {r['connections']} conns | {r['req_per_s']:,.0f} "
                         f"| {ms(r['latency_s']['p50'])} | {ms(r['latency_s']['p99'])} | {bad} / {r['errors']} "
                         f"| {r.get('loadavg_before', '–')} → {r.get('loadavg_after', '–')} |")
        elif r.get("scenario") == "wrk" and "req_per_s" in r:
            lines.append(f"| {name} | wrk, 64 conns | {r['req_per_s']:,.0f} | – | {ms(r.get('p99_s'))} "
                         f"| {r['non_2xx']} | {r.get('load', '–')} |")
    lines.append("")
    commands = folder / "commands.txt"
    if commands.exists():
        lines += ["## Commands", "", "```", commands.read_text().rstrip(), "```", ""]
    (folder / "results.md").write_text("\n".join(lines))
    plot(folder, results)
    print("\n".join(lines))


def plot(folder, results):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name in ("fanout-100", "fanout-1000"):
        r = results.get(name)
        if not r or not r.get("latency_sample"):
            continue
        sample = r["latency_sample"]
        fraction = [i / len(sample) for i in range(1, len(sample) + 1)]
        demand = r["senders"] * r["rate_per_sender"] * r["connected"]
        left.plot([x * 1000 for x in sample], fraction,
                  label=f"{r['connected']} members, {demand:,.0f} deliveries/s")
    left.set_xscale("log")
    left.set_xlabel("fan-out latency, ms (send to receive)")
    left.set_ylabel("fraction of deliveries")
    left.set_title("WebSocket fan-out: latency distribution per load")
    left.grid(True, which="both", alpha=0.3)
    left.legend()

    http = [(r["target"], r["req_per_s"], r["latency_s"]["p99"]) for r in results.values()
            if r.get("scenario") == "http"]
    if http:
        labels, rates, p99 = zip(*http)
        right.barh(labels, rates)
        for y, (rate, p) in enumerate(zip(rates, p99)):
            right.text(rate, y, f" {rate:,.0f}/s, p99 {ms(p)}", va="center", fontsize=8)
        right.set_xscale("log")
        right.set_xlabel("requests/s (log)")
        right.set_title("HTTP through Nginx, Gunicorn direct, Nginx ceiling")
    fig.tight_layout()
    fig.savefig(folder / "plot.png", dpi=100)


def compare(a, b):
    fa, fb = figures(load(a)), figures(load(b))
    print(f"| figure | {pathlib.Path(a).name} | {pathlib.Path(b).name} | B/A |")
    print("|---|---|---|---|")
    for key in fa:
        if key in fb and fa[key] is not None and fb[key] is not None:
            ratio = f"{fb[key] / fa[key]:.2f}" if fa[key] else "–"
            print(f"| {key} | {fa[key]:,} | {fb[key]:,} | {ratio} |")


LAYOUTS = ("split", "daphne", "uvicorn")
# (title, unit, how to read it from a layout's results, True when more is better)
LAYOUT_MEASURES = [
    ("Pages: the lobby through Nginx, requests/s", "req/s",
     lambda r: r.get("http-nginx-lobby", {}).get("req_per_s"), True),
    ("Pages: the lobby through Nginx, p99", "ms",
     lambda r: _ms(r.get("http-nginx-lobby", {}).get("latency_s", {}).get("p99")), False),
    ("Pages: a room page through Nginx, requests/s", "req/s",
     lambda r: r.get("http-nginx-room", {}).get("req_per_s"), True),
    ("/healthz through Nginx, requests/s", "req/s",
     lambda r: r.get("http-nginx-healthz", {}).get("req_per_s"), True),
    ("/healthz through Nginx, p99", "ms",
     lambda r: _ms(r.get("http-nginx-healthz", {}).get("latency_s", {}).get("p99")), False),
    ("Fan-out, room of 100: delivered", "%", lambda r: r.get("fanout-100", {}).get("delivered_pct"), True),
    ("Fan-out, room of 100: p99", "ms",
     lambda r: _ms(r.get("fanout-100", {}).get("latency_s", {}).get("p99")), False),
    ("Fan-out, room of 1,000: delivered", "%", lambda r: r.get("fanout-1000", {}).get("delivered_pct"), True),
    ("Fan-out, room of 1,000: p99", "ms",
     lambda r: _ms(r.get("fanout-1000", {}).get("latency_s", {}).get("p99")), False),
    ("Fan-out, room of 100: server CPU per 1,000 deliveries", "ms",
     lambda r: r.get("fanout-100", {}).get("server_cpu_ms_per_1000_deliveries"), False),
    ("Handshake burst: accepted", "handshakes", lambda r: r.get("burst", {}).get("accepted"), True),
    ("Idle sockets held", "sockets", lambda r: r.get("idle", {}).get("still_open_after_hold"), True),
    ("Idle: memory per connection (app servers and Nginx)", "KiB",
     lambda r: r.get("idle", {}).get("kib_per_connection"), False),
    ("Memory of the app's server processes at rest", "MiB",
     lambda r: _mib(r.get("memory", {}).get("app_servers_rss_kib")), False),
]


def _ms(seconds):
    return None if seconds is None else round(seconds * 1000, 1)


def _mib(kib):
    return None if kib is None else round(kib / 1024, 1)


def _attempted(results):
    """The sizes this run used (a quick run is smaller): for the table's notes."""
    notes = []
    for name in ("burst", "idle"):
        if name in results:
            notes.append(f"{name} {results[name]['attempted']:,}")
    return ", ".join(notes)


def layouts(folder):
    folder = pathlib.Path(folder)
    runs = {name: load(folder / name) for name in LAYOUTS if (folder / name).is_dir()}
    if "split" not in runs:
        sys.exit(f"{folder}/split/ is missing: the ratios are to the default layout")
    lines = [f"# Layout matrix {folder.name}", "",
             "The same host (CPU set, memory, descriptor limits) moved from one layout to the",
             "next with `site.yml -e chat_layout=...`; each layout's own folder has its full",
             "tables, versions, load averages and commands. Ratio: the layout's figure over",
             "split's (above 1 is more of it, whether that is better or worse).", ""]
    if any(r.get("idle", {}).get("attempted", 20000) < 20000 for r in runs.values()):
        lines += ["**A smoke run (`CHAT_BENCH_QUICK=1`): every scenario shortened and small. It shows",
                  "that the matrix works; its figures do not rank the layouts.**", ""]
    host = folder / "split" / "host.txt"
    if host.exists():
        lines += ["```", host.read_text().rstrip(), "```", ""]
    lines += [f"Sizes: {', '.join(f'{name}: {_attempted(r)}' for name, r in runs.items())}", ""]
    measured = []
    for title, unit, read, more_is_better in LAYOUT_MEASURES:
        values = {name: read(results) for name, results in runs.items()}
        base = values.get("split")
        lines += [f"## {title}", "", f"| layout | {unit} | ratio to split |", "|---|---|---|"]
        for name, value in values.items():
            ratio = "–" if value is None or not base else f"{value / base:.2f}"
            shown = "–" if value is None else f"{value:,}"
            lines.append(f"| {name} | {shown} | {ratio} |")
        lines += ["", f"({'more' if more_is_better else 'less'} is better)", ""]
        measured.append((title, unit, values))
    (folder / "results.md").write_text("\n".join(lines))
    plot_layouts(folder, measured)
    print("\n".join(lines))


def plot_layouts(folder, measured):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = 3
    rows = (len(measured) + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(5 * columns, 3.2 * rows))
    for axis, (title, unit, values) in zip(axes.flat, measured):
        names = list(values)
        heights = [values[name] or 0 for name in names]
        axis.bar(names, heights, color=["tab:blue", "tab:orange", "tab:green"][:len(names)])
        base = values.get("split")
        for x, name in enumerate(names):
            value = values[name]
            label = "–" if value is None else f"{value:,}" + (f"\n{value / base:.2f}x" if base else "")
            axis.text(x, heights[x], label, ha="center", va="bottom", fontsize=8)
        axis.set_title(title, fontsize=9)
        axis.set_ylabel(unit)
        axis.margins(y=0.25)
    for axis in list(axes.flat)[len(measured):]:
        axis.axis("off")
    fig.tight_layout()
    fig.savefig(folder / "layouts.png", dpi=90)


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "table":
        table(sys.argv[2])
    elif len(sys.argv) == 3 and sys.argv[1] == "layouts":
        layouts(sys.argv[2])
    elif len(sys.argv) == 4 and sys.argv[1] == "compare":
        compare(sys.argv[2], sys.argv[3])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
