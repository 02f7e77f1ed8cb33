"""What one admission decision costs the worker's event loop: `decide()` per call, this tree against a git revision.

    python loadtests/bench_admission.py --against d4765a4 --out loadtests/results/admission-decide-cpu.json

At overload most calls are refused, each after a decision made on the worker's event loop, which shares the
interpreter with the engine thread; so a decision's time is taken from the forward passes. The queue: 40 running
gircse sequences and `waiting` more in 64 slots, one single-query call at K = 20 (deadline 30 s), decided
repeatedly against the same queue version (what the worker does between two iterations). Both versions run in
this process, alternated, best of `rounds`; the table gives the ratio and that both decided the same.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from loadtests.bench_gateway import load_average, machine  # noqa: E402
from model_server import admission  # noqa: E402


def at_revision(revision: str):
    """model_server/admission.py as it was at `revision`, imported as its own module."""
    source = subprocess.run(
        ["git", "show", f"{revision}:model_server/admission.py"], cwd=REPO, check=True, capture_output=True, text=True
    ).stdout
    path = Path(tempfile.mkdtemp()) / "admission_at_revision.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("admission_at_revision", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their annotations through it
    spec.loader.exec_module(module)
    return module


def per_decision_ms(a, waiting: int, calls: int) -> tuple[float, str]:
    model = a.CostModel()
    model.coefficients = np.array([0.02, 0.004, 0.0002, 1e-6, 0.001])  # the order of a gircse fit on 2 cores
    capacity = a.Capacity(64, 4096, 65536)
    rng = np.random.default_rng(0)
    running = a.Seqs.of([0] * 40, list(rng.integers(30, 60, 40)), list(rng.integers(1, 21, 40)), [30.0] * 40)
    queue = a.Seqs.waiting(list(rng.integers(20, 50, waiting)), list(rng.integers(0, 21, waiting)), 25.0)
    ahead = a.Backlog(running, queue, a.EMPTY).schedule(capacity)
    one = np.array([1])
    call = a.Call(np.array([30]), one * 20, one * 20, one, np.array([True]), 1, 30.0, "online", 0.0)
    idle = a.Schedule(a.EMPTY, capacity.slots_for(call.seqs(0)), capacity.batch_tokens)
    started = time.perf_counter()
    for _ in range(calls):
        decision = a.decide(model, ahead, idle, call, a.Policy(), 1.0)
    return (time.perf_counter() - started) / calls * 1e3, f"{decision.outcome} {decision.expected_s or 0:.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--against", required=True, help="git revision to compare with")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    versions = {args.against: at_revision(args.against), "this tree": admission}
    rows = []
    print(f"{'waiting':>7} {'version':>10} {'ms/decision':>11} {'ratio':>6}  decision")
    for waiting in (20, 300):
        best: dict[str, tuple[float, str]] = {}
        for _ in range(args.rounds):
            for name, module in versions.items():
                ms, decided = per_decision_ms(module, waiting, args.calls)
                best[name] = min(best.get(name, (ms, decided)), (ms, decided))
        base = best[args.against][0]
        for name, (ms, decided) in best.items():
            print(f"{waiting:7d} {name:>10} {ms:11.3f} {base / ms:5.2f}x  {decided}")
            rows.append({"waiting": waiting, "version": name, "ms_per_decision": ms, "decision": decided})
    report = {"machine": machine(), "load_average_1_5_15m": load_average(), "against": args.against, "rows": rows}
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
