"""The soak's memory verdict tells a leak from a warm-up (bench/soakreport.py).

Synthetic hours of samples, shaped like the soaks measured: a leak grows at
the same rate all along; a warm-up (the allocator's pools reaching the peak
of open sockets, Nginx's shared zones filling to their size) rises for a
quarter of an hour and stays. Only the leak may fail the bound.
"""

import math
import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "bench"))

import soakreport  # noqa: E402

HOUR = 3600.0
DEPLOY = (1800.0, 1870.0)


def soak(private, rss=None):
    """An hour of samples every 30 s for one unit: private(t) and rss(t) in KiB, t from its processes' start."""
    samples = []
    for i in range(1, 121):
        t = i * 30.0
        # A deploy restarts the processes: their age starts again.
        age = t - DEPLOY[1] if t > DEPLOY[1] else t
        unit = {"fds": 100, "procs": 1}
        if private is not None:
            unit["private_kib"] = round(private(age))
        unit["rss_kib"] = round((rss or private)(age) + 20_000)
        samples.append({"t": t, "units": {"chat-daphne@1.service": unit}, "counts": {},
                        "latency_s": {"p50": 0.01, "p99": 0.05}})
    events = [{"event": "churn starts", "t": 60.0}, {"event": "churn stops", "t": HOUR - 120},
              {"event": "deploy starts", "t": DEPLOY[0]}, {"event": "deploy ends", "t": DEPLOY[1]}]
    return {"samples": samples, "events": events, "duration_s": HOUR}


def memory_verdict(data):
    result = soakreport.analyse(data)
    (ok,) = [ok for name, ok, _ in result["verdicts"] if name.startswith("memory growth")]
    return ok, result


def leak(age):
    # 100 MiB growing 10 % an hour, from the first socket to the last.
    return 100 * 1024 * (1 + 0.10 * age / HOUR)


def warm_up(age):
    # 95 MiB rising to 107 MiB, most of it in the first 15 minutes, then flat:
    # the Daphne instances of the 45-minute split soak.
    return 1024 * (107 - 12 * math.exp(-age / 300))


def test_a_steady_leak_fails_the_bound():
    ok, result = memory_verdict(soak(leak))
    assert ok is False
    for segment in result["rows"][0]["segments"]:
        assert segment["late_pct_per_h"] == pytest.approx(10 / 1.07, rel=0.1)


def test_a_warm_up_that_levels_off_passes_though_the_whole_segment_rises():
    ok, result = memory_verdict(soak(warm_up))
    assert ok is True
    # The slope over the whole segment, which the report judged before, is
    # well above the bound: that is what made a warm-up read as a leak.
    assert max(s["pct_per_h"] for s in result["rows"][0]["segments"]) > soakreport.MAX_GROWTH_PCT_PER_H


def test_shared_pages_filling_up_are_not_a_leak_but_private_growth_is():
    # Nginx: resident memory climbs as its workers touch the shared zones,
    # private memory stays flat. Judged on private memory: met.
    ok, result = memory_verdict(soak(lambda age: 30_000, rss=lambda age: 30_000 + 40_000 * age / HOUR))
    assert ok is True and result["judged"] == "private_kib"
    # The same private memory leaking fails, whatever RSS does.
    ok, _ = memory_verdict(soak(lambda age: 30_000 + 6_000 * age / HOUR, rss=lambda age: 50_000))
    assert ok is False


def test_soaks_sampled_before_private_memory_are_judged_on_resident_memory():
    ok, result = memory_verdict(soak(None, rss=leak))
    assert result["judged"] == "rss_kib" and ok is False
