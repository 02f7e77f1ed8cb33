"""Fleet benchmark (by hand, not in CI): throughput and latency with 1 vs 2 workers for one model.

    python loadtests/bench_fleet.py                                   # minilm-l6, this machine
    python loadtests/bench_fleet.py --rounds 5 --seconds 20 --concurrency 16

Two `genembed worker --model minilm-l6` processes with one torch thread each (OMP_NUM_THREADS=1) and two
gateways: one in front of the first worker only, one in front of both (`--worker minilm-l6=A --worker
minilm-l6=B`). Closed-loop load (N requests in flight, each 1, 4 or 16 new sentences, the gateway benchmark's
sweep point) goes to the 1-worker and the 2-worker gateway in alternating rounds, so both see the same
machine conditions; the table gives the median of the rounds and the 2-worker / 1-worker ratio within this
run. The load generator and the gateways share the CPU with the workers: on a 2-core machine read the ratio,
not the absolute rates. Writes `loadtests/results/fleet-<tag>.json` with the machine and its load average.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the process helpers the tests use

from harness.procs import free_port, genembed, running, worker_process  # noqa: E402
from loadtests.bench_gateway import MODEL, RESULTS, Sentences, SweepRow, load_average, machine, sweep_point  # noqa: E402

ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def gateway(stack: ExitStack, workers: list[str], logs: Path) -> str:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    entries = [f"--worker={MODEL}={w}" for w in workers]
    cmd = genembed("gateway", "--port", str(port), *entries, "--log-level", "warning")
    stack.enter_context(running(cmd, f"{url}/ready", env={"GENEMBED_CACHE_MAX_MB": "0"}, log_path=logs / f"{port}.log"))
    return url


def summary(rows: list[SweepRow]) -> dict[str, float]:
    """Medians over the rounds, errors and 429s summed."""
    return {
        "embeddings_per_s": statistics.median(r.embeddings_per_s for r in rows),
        "p50_ms": statistics.median(r.p50_ms for r in rows),
        "p99_ms": statistics.median(r.p99_ms for r in rows),
        "rejected_429": sum(r.rejected_429 for r in rows),
        "errors": sum(r.errors for r in rows),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight")
    parser.add_argument("--seconds", type=float, default=15, help="per round")
    parser.add_argument("--rounds", type=int, default=4, help="alternating rounds per fleet size")
    parser.add_argument("--tag", default="cpu", help="results file suffix")
    args = parser.parse_args()
    RESULTS.mkdir(exist_ok=True)
    logs = Path(tempfile.mkdtemp(prefix="genembed-fleet-"))
    sentences = Sentences()
    load_at_start = load_average()
    rounds: dict[int, list[SweepRow]] = {1: [], 2: []}

    with ExitStack() as stack:
        first, _ = stack.enter_context(worker_process(MODEL, logs, env=ONE_THREAD))
        second, _ = stack.enter_context(worker_process(MODEL, logs, env=ONE_THREAD))
        gateways = {1: gateway(stack, [first], logs), 2: gateway(stack, [first, second], logs)}
        asyncio.run(sweep_point(gateways[2], args.concurrency, 2, sentences))  # warm both paths
        print(f"== {MODEL}, {args.concurrency} requests in flight, {args.seconds:g} s rounds, one thread per worker")
        for r in range(args.rounds):
            for workers, url in gateways.items():
                row = asyncio.run(sweep_point(url, args.concurrency, args.seconds, sentences))
                rounds[workers].append(row)
                print(
                    f"  round {r + 1}  {workers} worker(s)  {row.embeddings_per_s:7.1f} emb/s  "
                    f"p50 {row.p50_ms:7.1f} ms  p99 {row.p99_ms:7.1f} ms  429s {row.rejected_429}  errors {row.errors}"
                )

    result = {workers: summary(rows) for workers, rows in rounds.items()}
    ratio = result[2]["embeddings_per_s"] / result[1]["embeddings_per_s"]
    print("\n| workers | embeddings/s | p50 ms | p99 ms | 429s | errors |")
    print("|---:|---:|---:|---:|---:|---:|")
    for workers, s in result.items():
        print(
            f"| {workers} | {s['embeddings_per_s']:.1f} | {s['p50_ms']:.0f} | {s['p99_ms']:.0f} | "
            f"{s['rejected_429']} | {s['errors']} |"
        )
    print(f"\n2 workers / 1 worker throughput: {ratio:.2f}x")
    report = {
        "machine": machine(),
        "load_average_1_5_15m": {"start": load_at_start, "end": load_average()},
        "model": MODEL,
        "threads_per_worker": 1,
        "concurrency": args.concurrency,
        "seconds_per_round": args.seconds,
        "rounds": {str(w): [asdict(r) for r in rows] for w, rows in rounds.items()},
        "median": {str(w): s for w, s in result.items()},
        "throughput_ratio_2_over_1": ratio,
    }
    out = RESULTS / f"fleet-{args.tag}.json"
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
