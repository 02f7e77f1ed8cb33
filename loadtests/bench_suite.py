"""The test suite's wall time in one process against pytest-xdist's two, as `.ci/run` runs it (by hand: about half
an hour on 2 cores; the setup must have run).

    python loadtests/bench_suite.py                          # one process, then -n 2 --dist loadfile
    python loadtests/bench_suite.py --variants xdist --tag zen3
    python loadtests/bench_suite.py --tag smoke tests/test_refine_math.py   # a part of the suite

Each variant is a whole `python -m pytest -q -p no:cacheprovider` run of this checkout's tests, one after the other.
This file is also the pytest plugin that records each test (loaded with `-p`): its start and end, and how busy the
machine's cores were meanwhile (/proc/stat, all processes: the servers a test starts are its own children or not).
Reported per variant: wall time and pytest's summary, the mean cores busy, how long 0, 1 or 2+ tests ran at once
(a `solo` test runs alone: tests/solo.py), and for a one-process run the files whose tests left the most core-seconds
idle (where a second process has room). Prints a table and writes JSON (results/suite-<tag>.json).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"
VARIANTS = {"serial": [], "xdist": ["-n", "2", "--dist", "loadfile"]}
_RECORD = "GENEMBED_SUITE_RECORD"  # the JSON-lines file the plugin appends to; unset: the plugin does nothing


def _busy_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs since boot."""
    with open("/proc/stat") as stat:
        values = [int(v) for v in stat.readline().split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return sum(values) - idle, sum(values)


_started: dict[str, tuple[float, int, int]] = {}


def pytest_runtest_setup(item) -> None:
    if os.environ.get(_RECORD):
        _started[item.nodeid] = (time.time(), *_busy_jiffies())


def pytest_runtest_logreport(report) -> None:
    if report.when != "teardown" or report.nodeid not in _started:
        return
    start, busy0, total0 = _started.pop(report.nodeid)
    busy1, total1 = _busy_jiffies()
    cores = (os.cpu_count() or 1) * (busy1 - busy0) / max(1, total1 - total0)
    row = {"id": report.nodeid, "start": start, "end": time.time(), "cores": cores}
    with open(os.environ[_RECORD], "a") as out:  # one short line per write: the xdist processes append whole lines
        out.write(json.dumps(row) + "\n")


def _running_at_once(rows: list[dict]) -> dict[str, float]:
    """Seconds with 0, 1 and 2+ tests running, between the first start and the last end."""
    events = sorted([(r["start"], 1) for r in rows] + [(r["end"], -1) for r in rows])
    seconds = {"0": 0.0, "1": 0.0, "2+": 0.0}
    running, last = 0, events[0][0]
    for at, change in events:
        seconds[str(running) if running < 2 else "2+"] += at - last
        running, last = running + change, at
    return seconds


def _idle_by_file(rows: list[dict], top: int = 10) -> list[dict]:
    """Core-seconds each file's tests left idle; meaningful where one test runs at a time."""
    cpus = os.cpu_count() or 1
    idle: dict[str, float] = defaultdict(float)
    wall: dict[str, float] = defaultdict(float)
    for r in rows:
        name = r["id"].split("::")[0]
        seconds = r["end"] - r["start"]
        wall[name] += seconds
        idle[name] += seconds * (cpus - r["cores"])
    ranked = sorted(idle, key=idle.get, reverse=True)[:top]
    return [{"file": f, "wall_s": round(wall[f], 1), "idle_core_s": round(idle[f], 1)} for f in ranked]


def run_variant(name: str, extra: list[str], paths: list[str]) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".jsonl", delete=False) as record:
        path = record.name
    recorder = ["-p", "loadtests.bench_suite"]
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *recorder, *extra, *paths]
    from loadtests.bench_gateway import load_average

    load_before = load_average()
    started = time.time()
    done = subprocess.run(cmd, cwd=REPO, env={**os.environ, _RECORD: path}, capture_output=True, text=True)
    wall = time.time() - started
    rows = [json.loads(line) for line in Path(path).read_text().splitlines()]
    os.unlink(path)
    summary = [line for line in done.stdout.splitlines() if re.search(r"\d+ (passed|failed)", line)]
    tests_s = sum(r["end"] - r["start"] for r in rows)
    return {
        "variant": name,
        "args": extra,
        "returncode": done.returncode,
        "summary": summary[-1].strip("= ") if summary else done.stdout[-500:],
        "wall_s": round(wall, 1),
        "tests": len(rows),
        "mean_cores_busy": round(sum((r["end"] - r["start"]) * r["cores"] for r in rows) / tests_s, 2),
        "seconds_with_tests_running": {k: round(v, 1) for k, v in _running_at_once(rows).items()},
        "idle_by_file": _idle_by_file(rows) if not extra else [],
        "loadavg_before": load_before,
    }


def machine() -> dict:
    """bench_gateway's description of the machine, with the vector extensions and the commit measured."""
    from loadtests.bench_gateway import machine as described  # here, not at the top: the recorder stays light

    flags = set(re.search(r"^flags\s*:\s*(.*)$", Path("/proc/cpuinfo").read_text(), re.M).group(1).split())
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    simd = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if f in flags]
    return {**described(), "simd": simd, "commit": commit.stdout.strip()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--tag", default="cpu")
    parser.add_argument("paths", nargs="*", help="test files or ids (default: the whole suite)")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))  # run as a script: the sibling benchmarks import as loadtests.*
    report = {"machine": machine(), "paths": args.paths, "variants": []}
    for name in args.variants:
        print(f"running the suite: {name} ...", flush=True)
        report["variants"].append(run_variant(name, VARIANTS[name], args.paths))
    print(f"\n{'variant':8} {'wall':>9} {'tests':>6} {'cores busy':>10} {'0 / 1 / 2+ running (s)':>24}  pytest")
    for v in report["variants"]:
        at_once = " / ".join(f"{s:.0f}" for s in v["seconds_with_tests_running"].values())
        minutes = f"{int(v['wall_s'] // 60)}:{v['wall_s'] % 60:04.1f}"
        print(f"{v['variant']:8} {minutes:>9} {v['tests']:>6} {v['mean_cores_busy']:>10} {at_once:>24}  {v['summary']}")
    for v in report["variants"]:
        if v["idle_by_file"]:
            print(f"\nmost idle core-seconds ({v['variant']}):")
            for f in v["idle_by_file"]:
                print(f"  {f['file']:45} {f['idle_core_s']:7.1f} idle core-s in {f['wall_s']:6.1f} s")
    if len(report["variants"]) == 2:
        first, second = report["variants"]
        print(f"\n{first['variant']} / {second['variant']} wall: {first['wall_s'] / second['wall_s']:.2f}x")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"suite-{args.tag}.json"
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
