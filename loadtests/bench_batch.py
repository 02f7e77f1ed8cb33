"""The Batch API under load and across restarts (issue #26; by hand, not in CI).

    python loadtests/bench_batch.py                         # full: 20,000-line batch, 10,000-line restart test
    python loadtests/bench_batch.py --short --tag short     # ~3 min: 1,500 and 600 lines, shorter windows

It starts its own worker (`--model`, fp32 by default: the vectors are compared with /v1/embeddings' at cosine
>= 0.99999) and gateway on free loopback ports, both separately, so each can be killed.

1. **Online traffic beside a batch.** The capacity of single queries (closed loop, embeddings/s of 200s); then
   single queries on an open-loop Poisson schedule at `--load` (0.9) x capacity, first alone, then while a batch
   of `--lines` single-input lines runs: p50/p99 of the online 200s, online refusals (429/503/504, timeouts), the
   batch's lines/s in the window, and the machine's busy share = (online + batch embeddings/s) / capacity, beside
   the worker's CPU share (its CPU seconds over the window's wall seconds x cores). Targets: p99 with the batch
   <= 1.25 x without, no online refusals, busy >= 90 %.
2. **Restarts.** A batch of `--restart-lines` lines; the gateway is killed (SIGKILL) once a quarter is written and
   started again on the same port (it takes its lease back at once), the worker killed once half is written and
   started again. Then: the batch completed, every custom_id exactly once in the output, no error file, and each
   line's vector against /v1/embeddings of a fresh gateway (an empty cache, so the worker computes it again).

Prints a table and writes loadtests/results/bench_batch[-TAG].json. The load generator, gateway and worker share
the machine's cores: the JSON records the CPU, the load average and the busiest other processes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import numpy as np
import openai
import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from harness.procs import free_port, genembed, running  # noqa: E402
from loadtests.bench_gateway import Sentences, load_average, machine, percentile  # noqa: E402
from loadtests.load_suite import Outcome, other_processes, send, session  # noqa: E402

FINAL = ("completed", "failed", "cancelled", "expired")


@dataclass
class Window:
    """Online single queries at a fixed rate for a while, with or without a batch running."""

    name: str
    offered_per_s: float
    duration_s: float
    requests: int
    online_per_s: float
    refused: dict[str, int]  # status -> count, every answer but 200
    p50_ms: float
    p99_ms: float
    batch_lines_per_s: float
    busy_share: float  # (online + batch embeddings/s) / capacity
    worker_cpu_share: float  # the worker's CPU seconds / (wall seconds x cores)


class Stack:
    """The worker and the gateway as separate processes that can be killed and started again on their ports."""

    def __init__(self, model: str, dtype: str, logs: Path, env: dict[str, str]) -> None:
        self.model, self.dtype, self.logs, self.env = model, dtype, logs, env
        self.worker_port, self.gateway_port = free_port(), free_port()
        self.store = logs / "batches"
        self._stack = contextlib.ExitStack()
        self.worker: subprocess.Popen | None = None
        self.gateway: subprocess.Popen | None = None

    @property
    def worker_url(self) -> str:
        return f"http://127.0.0.1:{self.worker_port}"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.gateway_port}"

    def start_worker(self) -> None:
        cmd = genembed("worker", "--model", self.model, "--port", str(self.worker_port), "--dtype", self.dtype)
        log = self.logs / f"worker-{time.time():.0f}.log"
        self.worker = self._stack.enter_context(running(cmd, f"{self.worker_url}/ready", 600, log_path=log))

    def start_gateway(self) -> None:
        cmd = genembed("gateway", "--port", str(self.gateway_port), f"--worker={self.model}={self.worker_url}")
        env = {"GENEMBED_BATCH_DIR": str(self.store), **self.env}
        log = self.logs / f"gateway-{time.time():.0f}.log"
        self.gateway = self._stack.enter_context(running(cmd, f"{self.url}/ready", 120, env=env, log_path=log))

    def kill(self, proc: subprocess.Popen | None) -> None:
        assert proc is not None
        proc.kill()
        proc.wait()

    def close(self) -> None:
        self._stack.close()


def openai_client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=5, timeout=60)


def batch_lines(model: str, sentences: Sentences, count: int) -> list[dict]:
    return [
        {"custom_id": f"line-{i}", "method": "POST", "url": "/v1/embeddings", "body": {"model": model, "input": text}}
        for i, text in enumerate(sentences.take(count))
    ]


def create_batch(url: str, lines: list[dict]) -> str:
    client = openai_client(url)
    text = "".join(json.dumps(line) + "\n" for line in lines).encode()
    file = client.files.create(file=("batch.jsonl", io.BytesIO(text)), purpose="batch")
    return client.batches.create(input_file_id=file.id, endpoint="/v1/embeddings", completion_window="24h").id


def lines_done(store: Path, batch_id: str) -> int:
    """The batch's written lines, from its record in the store (works while no gateway runs)."""
    record = store / "batches" / "meta" / f"{batch_id}.json"
    return int(json.loads(record.read_text())["progress"]["lines_done"])


def wait_until(predicate, timeout: float, what: str, every: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(every)


# ---------------------------------------------------------------------------------------------
# 1. Online traffic beside a batch


async def capacity(url: str, model: str, sentences: Sentences, concurrency: int, seconds: float) -> float:
    """Embeddings/s of single queries with `concurrency` in flight (a closed loop)."""
    done = 0
    stop = time.perf_counter() + seconds

    async def user(client: httpx.AsyncClient) -> None:
        nonlocal done
        while time.perf_counter() < stop:
            response = await client.post("/v1/embeddings", json={"model": model, "input": sentences.take(1)[0]})
            if response.status_code == 200:
                done += 1
            else:
                await asyncio.sleep(min(float(response.headers.get("retry-after", 1)), 1.0))

    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        started = time.perf_counter()
        await asyncio.gather(*(user(client) for _ in range(concurrency)))
        return done / (time.perf_counter() - started)


async def open_loop(
    url: str, model: str, sentences: Sentences, rate: float, seconds: float, seed: int
) -> list[Outcome]:
    """Single queries on a Poisson schedule at `rate`/s for `seconds`, each sent at its time."""
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1 / rate, int(rate * seconds * 1.5) + 10))
    arrivals = arrivals[arrivals < seconds]
    async with session(url, 40, connections=2048) as client:
        start = time.perf_counter()
        tasks = []
        for at in arrivals:
            delay = start + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            scheduled = start + at
            body = {"model": model, "input": sentences.take(1)[0]}
            tasks.append(asyncio.create_task(send(client, body, scheduled, time.perf_counter() - scheduled)))
        return list(await asyncio.gather(*tasks))


def window(
    name: str, outcomes: list[Outcome], rate: float, seconds: float, cap: float, batch_lines: int, cpu_s: float
) -> Window:
    ok = [1000 * o.latency_s for o in outcomes if o.status == "200"]
    refused: dict[str, int] = {}
    for o in outcomes:
        if o.status != "200":
            refused[o.status] = refused.get(o.status, 0) + 1
    online = len(ok) / seconds
    batch = batch_lines / seconds
    return Window(
        name=name,
        offered_per_s=round(rate, 2),
        duration_s=seconds,
        requests=len(outcomes),
        online_per_s=round(online, 2),
        refused=refused,
        p50_ms=round(percentile(ok, 50), 1),
        p99_ms=round(percentile(ok, 99), 1),
        batch_lines_per_s=round(batch, 2),
        busy_share=round((online + batch) / cap, 3),
        worker_cpu_share=round(cpu_s / seconds / (os.cpu_count() or 1), 3),
    )


def cpu_seconds(pid: int) -> float:
    with contextlib.suppress(psutil.Error):
        process = psutil.Process(pid)
        return sum(p.cpu_times().user + p.cpu_times().system for p in (process, *process.children(recursive=True)))
    return 0.0


def interference(stack: Stack, args: argparse.Namespace, sentences: Sentences) -> dict[str, object]:
    url, model = stack.url, args.model
    asyncio.run(capacity(url, model, sentences, args.concurrency, 5))  # warm-up
    cap = asyncio.run(capacity(url, model, sentences, args.concurrency, args.capacity_s))
    rate = args.load * cap
    print(f"capacity {cap:.1f} embeddings/s; offering {rate:.1f}/s for {args.window_s:g} s, alone then with a batch")
    assert stack.worker is not None

    cpu = cpu_seconds(stack.worker.pid)
    alone = asyncio.run(open_loop(url, model, sentences, rate, args.window_s, seed=1))
    baseline = window("online alone", alone, rate, args.window_s, cap, 0, cpu_seconds(stack.worker.pid) - cpu)

    batch_id = create_batch(url, batch_lines(model, sentences, args.lines))
    client = openai_client(url)
    wait_until(lambda: client.batches.retrieve(batch_id).request_counts.completed > 0, 300, "the batch never started")
    before, cpu = client.batches.retrieve(batch_id).request_counts.completed, cpu_seconds(stack.worker.pid)
    beside = asyncio.run(open_loop(url, model, sentences, rate, args.window_s, seed=2))
    after = client.batches.retrieve(batch_id)
    with_batch = window(
        "online + batch",
        beside,
        rate,
        args.window_s,
        cap,
        after.request_counts.completed - before,
        cpu_seconds(stack.worker.pid) - cpu,
    )
    if after.status not in FINAL:
        client.batches.cancel(batch_id)
        wait_until(lambda: client.batches.retrieve(batch_id).status in FINAL, 60, "the cancel did not finish")
    return {
        "capacity_per_s": round(cap, 2),
        "windows": [asdict(baseline), asdict(with_batch)],
        "p99_ratio": round(with_batch.p99_ms / baseline.p99_ms, 3) if baseline.p99_ms else None,
        "batch_lines": args.lines,
        "batch_status_after_window": after.status,
    }


# ---------------------------------------------------------------------------------------------
# 2. Restarts


def restarts(stack: Stack, args: argparse.Namespace, sentences: Sentences) -> dict[str, object]:
    lines = batch_lines(args.model, sentences, args.restart_lines)
    total = len(lines)
    started = time.monotonic()
    batch_id = create_batch(stack.url, lines)
    events = []

    wait_until(lambda: lines_done(stack.store, batch_id) >= total // 4, 3600, "a quarter never got written")
    events.append({"event": "gateway killed", "lines_done": lines_done(stack.store, batch_id)})
    stack.kill(stack.gateway)
    stack.start_gateway()
    wait_until(lambda: lines_done(stack.store, batch_id) >= total // 2, 3600, "half never got written")
    events.append({"event": "worker killed", "lines_done": lines_done(stack.store, batch_id)})
    stack.kill(stack.worker)
    stack.start_worker()
    client = openai_client(stack.url)
    wait_until(lambda: client.batches.retrieve(batch_id).status in FINAL, 3600, "the batch did not finish", every=1)
    batch = client.batches.retrieve(batch_id)
    elapsed = time.monotonic() - started
    output = [json.loads(row) for row in client.files.content(batch.output_file_id).text.splitlines()]
    ids = [r["custom_id"] for r in output]
    exactly_once = sorted(ids) == sorted(line["custom_id"] for line in lines)
    print(f"restart batch {batch.status} in {elapsed:.0f} s; every line exactly once: {exactly_once}")

    # /v1/embeddings of the same inputs through a fresh gateway: its cache is empty, the worker computes them again.
    by_id = {line["custom_id"]: line["body"]["input"] for line in lines}
    got = np.array([r["response"]["body"]["data"][0]["embedding"] for r in output], dtype=np.float64)
    expected = []
    port = free_port()
    cmd = genembed("gateway", "--port", str(port), f"--worker={args.model}={stack.worker_url}")
    fresh = tempfile.mkdtemp(prefix="bench-batch-ref-")
    reference = f"http://127.0.0.1:{port}"
    env = {"GENEMBED_BATCH_DIR": fresh}
    with (
        running(cmd, f"{reference}/ready", 120, env=env, log_path=stack.logs / "ref.log"),
        httpx.Client(base_url=reference, timeout=120) as http,
    ):
        for start in range(0, len(ids), 64):
            chunk = [by_id[i] for i in ids[start : start + 64]]
            response = http.post("/v1/embeddings", json={"model": args.model, "input": chunk})
            response.raise_for_status()
            expected += [d["embedding"] for d in response.json()["data"]]
    reference_vectors = np.array(expected, dtype=np.float64)
    cosines = (got * reference_vectors).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(reference_vectors, axis=1)
    return {
        "lines": total,
        "status": batch.status,
        "seconds": round(elapsed, 1),
        "events": events,
        "request_counts": batch.request_counts.model_dump(),
        "error_file": batch.error_file_id,
        "every_line_exactly_once": exactly_once,
        "min_cosine_to_v1_embeddings": float(cosines.min()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="minilm-l6")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--lines", type=int, default=20_000, help="the batch beside online traffic")
    parser.add_argument("--restart-lines", type=int, default=10_000)
    parser.add_argument("--load", type=float, default=0.9, help="online load, x capacity")
    parser.add_argument("--concurrency", type=int, default=8, help="closed loop measuring capacity")
    parser.add_argument("--capacity-s", type=float, default=30)
    parser.add_argument("--window-s", type=float, default=60)
    parser.add_argument("--short", action="store_true", help="1,500 / 600 lines, 10 s capacity, 20 s windows")
    parser.add_argument("--skip", choices=["interference", "restarts"], action="append", default=[])
    parser.add_argument("--tag", default="")
    parser.add_argument("--out", type=Path, default=REPO / "loadtests" / "results")
    args = parser.parse_args()
    if args.short:
        args.lines, args.restart_lines, args.capacity_s, args.window_s = 1500, 600, 10, 20
    report: dict[str, object] = {
        "machine": machine(),
        "load_average_start": load_average(),
        "args": vars(args) | {"out": str(args.out)},
    }
    sentences = Sentences(seed=26)
    with tempfile.TemporaryDirectory(prefix="bench-batch-") as tmp:
        stack = Stack(
            args.model, args.dtype, Path(tmp), {"GENEMBED_BATCH_CHECKPOINT_S": "0.5", "GENEMBED_BATCH_POLL_S": "0.5"}
        )
        try:
            stack.start_worker()
            stack.start_gateway()
            report["other_processes"] = other_processes({os.getpid(), stack.worker.pid, stack.gateway.pid})  # type: ignore[union-attr]
            if "interference" not in args.skip:
                report["interference"] = interference(stack, args, sentences)
            if "restarts" not in args.skip:
                report["restarts"] = restarts(stack, args, sentences)
        finally:
            stack.close()
    report["load_average_end"] = load_average()
    print_report(report)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"bench_batch{'-' + args.tag if args.tag else ''}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")


def print_report(report: dict) -> None:
    if "interference" in report:
        part = report["interference"]
        print(f"\ncapacity {part['capacity_per_s']} embeddings/s; p99 with/without the batch: {part['p99_ratio']}")
        header = ("window", "offered/s", "online/s", "p50 ms", "p99 ms", "batch/s", "busy", "cpu")
        print(f"{header[0]:16}" + "".join(f"{h:>10}" for h in header[1:]) + "  refused")
        for w in part["windows"]:
            numbers = [w[k] for k in ("offered_per_s", "online_per_s", "p50_ms", "p99_ms", "batch_lines_per_s")]
            shares = [w["busy_share"], w["worker_cpu_share"]]
            row = "".join(f"{n:10.1f}" for n in numbers) + "".join(f"{s:10.1%}" for s in shares)
            print(f"{w['name']:16}{row}  {w['refused'] or '-'}")
    if "restarts" in report:
        part = report["restarts"]
        print(f"\nrestarts: {part['lines']} lines {part['status']} in {part['seconds']} s, {part['request_counts']}")
        print(f"  every line exactly once: {part['every_line_exactly_once']}")
        print(f"  min cosine to /v1/embeddings: {part['min_cosine_to_v1_embeddings']:.7f}")
        for event in part["events"]:
            print(f"  {event['event']} at {event['lines_done']} lines written")


if __name__ == "__main__":
    main()
