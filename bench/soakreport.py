"""The soak's report (soak.py report RESULTS): RESULTS/soak.json.xz -> results.md and soak.png.

Per unit, the slope of its memory after warm-up (KiB and per cent per hour,
before and after the deploy, each on its own processes), and its
descriptors before churn, at the peak and two minutes after churn stopped;
the errors outside the deploy and in it; the fan-out's p99 at the start and
at the end. Verdicts against the bounds of issue 26: memory growth after
warm-up under 5 % an hour, descriptors back to their baseline after churn,
0 errors outside the deploy, p99 at the end within 1.5 times the start.

Memory is judged on the second half of each segment, and on private memory
where the samples have it. A leak grows with the churn, which is steady, so
its slope is the same in any part of the segment; memory that fills up to a
size (caches, the allocator's pools reaching the peak of open sockets) has a
slope that falls to zero, however long it took. Resident memory counts every
shared page once in each process that touched it: Nginx's workers each count
the shared zones (its TLS session cache is 10 MiB) as they fill, which is
bounded by configuration, not a leak. Both are shown in the table.
"""

import json
import lzma
import pathlib
import statistics

MAX_GROWTH_PCT_PER_H = 5.0
MAX_P99_RATIO = 1.5
JUDGED_NAMES = {"private_kib": "private memory", "rss_kib": "resident memory"}
# Descriptors "back to their baseline": within 5 % and 5 of them (a log
# file reopened, a connection in a pool).
FD_SLACK = (1.05, 5)
# Counted as errors wherever they happen; a server that closes a churning
# socket which stopped reading is doing its job, so that is not one.
ERROR_PREFIXES = ("handshake_failed:", "http_failed:", "error:", "member_closed:", "member_failed:",
                  "churn_failed:")


def groups(unit):
    if unit.startswith("chat-"):
        return "app servers (chat-*)"
    return unit.removesuffix(".service")


def slope_per_hour(points):
    """Least squares slope of (t, value) in value per hour, and the mean value."""
    n = len(points)
    mean_t = sum(t for t, _ in points) / n
    mean_v = sum(v for _, v in points) / n
    var = sum((t - mean_t) ** 2 for t, _ in points)
    if not var:
        return 0.0, mean_v
    return sum((t - mean_t) * (v - mean_v) for t, v in points) / var * 3600, mean_v


def memory_slopes(points_rss, points_judged):
    """One segment's figures: its resident memory's slope, and the judged series' slope in its second half."""
    slope, mean = slope_per_hour(points_rss)
    half = points_judged[len(points_judged) // 2:]
    late, late_mean = slope_per_hour(half)
    return {"samples": len(points_rss), "mean_mib": round(mean / 1024, 1), "kib_per_h": round(slope),
            "pct_per_h": round(100 * slope / mean, 2) if mean else None,
            "late_samples": len(half), "late_mean_mib": round(late_mean / 1024, 1), "late_kib_per_h": round(late),
            "late_pct_per_h": round(100 * late / late_mean, 2) if late_mean else None}


def analyse(data):
    samples = data["samples"]
    events = {e["event"]: e for e in data["events"]}
    duration = data["duration_s"]
    warmup = min(600.0, duration * 0.15)
    churn_from = events.get("churn starts", {}).get("t", 0.0)
    churn_until = events.get("churn stops", {}).get("t", duration)
    deploy = (events["deploy starts"]["t"], events["deploy ends"]["t"]) if "deploy ends" in events else None

    def in_deploy(t, grace=30.0):
        # A sample covers the 30 s before its t.
        return deploy is not None and t > deploy[0] and t - 30.0 < deploy[1] + grace

    # Segments where memory should be flat: churning, past warm-up, and for
    # the second one past a warm-up after the deploy's new processes started.
    segments = [("before the deploy" if deploy else "whole run",
                 churn_from + warmup, deploy[0] if deploy else churn_until)]
    if deploy:
        segments.append(("after the deploy", deploy[1] + warmup / 2, churn_until))
    units = sorted({unit for s in samples for unit in s.get("units", {})})
    # Private memory where every sample has it (soaks from before it was sampled have RSS only).
    judged = "private_kib" if all("private_kib" in u for s in samples for u in s.get("units", {}).values()) \
        else "rss_kib"
    rows, verdicts = [], []
    for unit in units:
        series = [(s["t"], s["units"][unit]) for s in samples if unit in s.get("units", {})]
        row = {"unit": unit, "segments": []}
        for name, start, end in segments:
            points = [(t, u) for t, u in series if start <= t <= end]
            # Ten samples (five minutes) in the half that is judged.
            if len(points) >= 20:
                row["segments"].append({"name": name, **memory_slopes([(t, u["rss_kib"]) for t, u in points],
                                                                      [(t, u[judged]) for t, u in points])})
        before = [u for t, u in series if t <= churn_from + 1]
        during = [u for t, u in series if churn_from < t <= churn_until]
        # Past the last churning socket (a silent one is reset 70 s after it came).
        after = [u for t, u in series if t >= churn_until + 75]
        row["fds"] = {"before_churn": before[-1]["fds"] if before else None,
                      "peak": max((u["fds"] for u in during), default=None),
                      "after_churn": after[-1]["fds"] if after else None}
        rows.append(row)
    growth = [(row["unit"], seg) for row in rows for seg in row["segments"]]
    if growth:
        worst = max(growth, key=lambda item: item[1]["late_pct_per_h"] or 0)
        verdicts.append((f"memory growth after warm-up under {MAX_GROWTH_PCT_PER_H:g} % an hour, every unit "
                         f"({JUDGED_NAMES[judged]}, second half of each segment)",
                         all((seg["late_pct_per_h"] or 0) < MAX_GROWTH_PCT_PER_H for _, seg in growth),
                         f"largest: {worst[0]} {worst[1]['late_pct_per_h']} %/h ({worst[1]['name']})"))
    else:
        verdicts.append(("memory growth after warm-up", None, "run too short for a slope (20 samples a segment)"))

    # Descriptors, per group of units (a deploy's new processes spread the
    # sockets over the instances differently).
    totals = {}
    for row in rows:
        group = totals.setdefault(groups(row["unit"]), {"before_churn": 0, "after_churn": 0, "known": True})
        for key in ("before_churn", "after_churn"):
            if row["fds"][key] is None:
                group["known"] = False
            else:
                group[key] += row["fds"][key]
    fd_ok = [g["known"] and g["after_churn"] <= g["before_churn"] * FD_SLACK[0] + FD_SLACK[1]
             for g in totals.values()]
    verdicts.append(("descriptors back to their baseline after churn (each group of units)",
                     all(fd_ok) if all(g["known"] for g in totals.values()) else None,
                     "; ".join(f"{name}: {g['before_churn']} → {g['after_churn']}" for name, g in totals.items())))

    errors_out, errors_in = {}, {}
    for s in samples:
        for key, n in s.get("counts", {}).items():
            if key.startswith(ERROR_PREFIXES):
                target = errors_in if in_deploy(s["t"]) else errors_out
                target[key] = target.get(key, 0) + n
    verdicts.append(("0 errors outside the deploy", not errors_out,
                     ", ".join(f"{k} {n}" for k, n in sorted(errors_out.items())) or "none"))

    steady = [s for s in samples if churn_from + warmup <= s["t"] <= churn_until and not in_deploy(s["t"], warmup / 2)
              and s["latency_s"]["p99"] is not None]
    if len(steady) >= 10:
        start = statistics.median(s["latency_s"]["p99"] for s in steady[:5])
        end = statistics.median(s["latency_s"]["p99"] for s in steady[-5:])
        verdicts.append((f"fan-out p99 at the end within {MAX_P99_RATIO:g}x the start", end <= start * MAX_P99_RATIO,
                         f"{start * 1000:.0f} ms → {end * 1000:.0f} ms ({end / start:.2f}x)"))
    else:
        verdicts.append(("fan-out p99 at the end against the start", None, "run too short"))
    return {"rows": rows, "verdicts": verdicts, "errors_outside": errors_out, "errors_in_deploy": errors_in,
            "deploy": deploy, "churn": (churn_from, churn_until), "warmup": warmup, "judged": judged}


def verdict(ok):
    return {True: "**met**", False: "**not met**", None: "not measured"}[ok]


def report(folder):
    folder = pathlib.Path(folder)
    data = json.load(lzma.open(folder / "soak.json.xz"))
    result = analyse(data)
    samples = data["samples"]
    totals = {}
    for s in samples:
        for key, n in s.get("counts", {}).items():
            totals[key] = totals.get(key, 0) + n
    lines = [f"# Soak {folder.name}", ""]
    if (folder / "host.txt").exists():
        lines += ["```", (folder / "host.txt").read_text().rstrip(), "```", ""]
    lines += [f"{data['duration_s'] / 60:.0f} minutes, {len(samples)} samples (every 30 s); warm-up "
              f"{result['warmup']:.0f} s; churn {result['churn'][0]:.0f}-{result['churn'][1]:.0f} s at "
              f"{data['churn_per_s']:g} sockets a second (at most {data['churn_max']} at once); "
              f"{data['http_per_s']:g} requests a second; deploy "
              + (f"{result['deploy'][0]:.0f}-{result['deploy'][1]:.0f} s" if result["deploy"] else "none") + ".", "",
              "## Verdicts", "", "| bound | verdict | figures |", "|---|---|---|"]
    lines += [f"| {name} | {verdict(ok)} | {figures} |" for name, ok, figures in result["verdicts"]]
    lines += ["", "## Memory and descriptors per unit", "",
              f"Resident memory over the whole segment; {JUDGED_NAMES[result['judged']]} over its second half, "
              "which the verdict judges.", "",
              "| unit | segment | samples | mean RSS | RSS slope | RSS growth "
              f"| mean {JUDGED_NAMES[result['judged']]}, 2nd half | slope, 2nd half | growth, 2nd half "
              "| fds before churn | fds peak | fds after churn |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        fds = row["fds"]
        for seg in row["segments"] or [{"name": "too short for a slope"}]:
            slope = (f"{seg['mean_mib']} MiB | {seg['kib_per_h']:,} KiB/h | {seg['pct_per_h']} %/h "
                     f"| {seg['late_mean_mib']} MiB | {seg['late_kib_per_h']:,} KiB/h | {seg['late_pct_per_h']} %/h"
                     if "mean_mib" in seg else "– | – | – | – | – | –")
            lines.append(f"| {row['unit']} | {seg['name']} | {seg.get('samples', 0)} | {slope} "
                         f"| {fds['before_churn']} | {fds['peak']} | {fds['after_churn']} |")
    lines += ["", "## Counts over the whole run", "", "| what | count |", "|---|---|"]
    lines += [f"| {key} | {n:,} |" for key, n in sorted(totals.items())]
    lines += ["", "Errors in the deploy's window: "
              + (", ".join(f"{k} {n}" for k, n in sorted(result["errors_in_deploy"].items())) or "none") + ".", ""]
    if (folder / "commands.txt").exists():
        lines += ["## Commands", "", "```", (folder / "commands.txt").read_text().rstrip(), "```", ""]
    (folder / "results.md").write_text("\n".join(lines))
    plot(folder, data, result)
    print("\n".join(lines))


def plot(folder, data, result):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = data["samples"]
    minutes = [s["t"] / 60 for s in samples]
    fig, axes = plt.subplots(4, 1, figsize=(11, 13), sharex=True)
    units = sorted({unit for s in samples for unit in s.get("units", {})})
    for unit in units:
        seen = [(s["t"] / 60, s["units"][unit]) for s in samples if unit in s.get("units", {})]
        xs = [x for x, _ in seen]
        line, = axes[0].plot(xs, [u["rss_kib"] / 1024 for _, u in seen], label=unit)
        if result["judged"] != "rss_kib":
            axes[0].plot(xs, [u[result["judged"]] / 1024 for _, u in seen], color=line.get_color(), linestyle="--")
        axes[1].plot(xs, [u["fds"] for _, u in seen], label=unit)
    axes[0].set_ylabel("resident memory (MiB)" if result["judged"] == "rss_kib"
                       else f"memory (MiB): resident, {JUDGED_NAMES[result['judged']]} dashed")
    axes[1].set_ylabel("open descriptors")
    axes[2].plot(minutes, [(s["latency_s"]["p50"] or 0) * 1000 for s in samples], label="p50")
    axes[2].plot(minutes, [(s["latency_s"]["p99"] or 0) * 1000 for s in samples], label="p99")
    axes[2].set_ylabel("fan-out latency (ms)")
    axes[2].set_yscale("log")
    axes[3].plot(minutes, [s.get("churning", 0) for s in samples], label="churning sockets")
    axes[3].plot(minutes, [s.get("redis_clients", 0) for s in samples], label="Redis clients")
    axes[3].plot(minutes, [sum(n for k, n in s.get("counts", {}).items() if k.startswith(ERROR_PREFIXES))
                           for s in samples], label="errors in 30 s")
    axes[3].plot(minutes, [s.get("counts", {}).get("behind", 0) for s in samples], label="behind notices in 30 s")
    axes[3].set_xlabel("minutes")
    for axis in axes:
        if result["deploy"]:
            axis.axvspan(result["deploy"][0] / 60, result["deploy"][1] / 60, color="orange", alpha=0.2)
        for t in result["churn"]:
            axis.axvline(t / 60, color="grey", linestyle=":")
        axis.legend(fontsize="small", loc="upper left")
        axis.grid(alpha=0.3)
    axes[0].set_title(f"Soak {folder.name}: deploy shaded, churn between the dotted lines")
    fig.tight_layout()
    fig.savefig(folder / "soak.png", dpi=90)
