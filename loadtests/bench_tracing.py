"""The cost of OpenTelemetry tracing (by hand, not in CI): the same load through a gateway + minilm-l6 worker
pair with tracing off and a pair with tracing on, in alternating rounds within one run.

    pip install -e '.[bench,otel]'
    python loadtests/bench_tracing.py                    # 3 rounds of each, this machine
    python loadtests/bench_tracing.py --rounds 5 --seconds 15

Both pairs run for the whole benchmark (an idle pair only answers readiness probes); the traced pair exports
every span over OTLP/HTTP (BatchSpanProcessor, default settings) to a receiver in this process that decodes
and counts them, as a collector would. Per round and pair: closed-loop throughput with 4 requests in flight
(batches of 1/4/16 new sentences, never cached) and the p50 of one short new sentence at a time. The table
gives the medians over rounds and on/off ratios; the load generator, both pairs and the receiver share the
machine's cores, so compare the ratios, not the absolute figures, and only within one run. Last, the CPU time
one span costs the thread that makes it, off vs on (a request makes 5 gateway and 3 worker spans).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the process helpers the tests use

from harness.procs import free_port, genembed, running, worker_process  # noqa: E402
from loadtests.bench_gateway import (  # noqa: E402
    MODEL,
    RESULTS,
    Sentences,
    load_average,
    machine,
    percentile,
    sweep_point,
)


class _Collector(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

        body = self.rfile.read(int(self.headers["content-length"]))
        request = ExportTraceServiceRequest.FromString(body)
        spans = sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans)
        with self.server.lock:  # type: ignore[attr-defined]
            self.server.spans += spans  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *_: object) -> None:
        pass


def start_collector() -> ThreadingHTTPServer:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Collector)
    server.spans, server.lock = 0, threading.Lock()  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def start_pair(stack: ExitStack, logs: Path, env: dict[str, str], tag: str) -> str:
    """A minilm-l6 worker and a gateway in front of it; returns the gateway's URL."""
    worker_env = {k.replace("GENEMBED_", "GENEMBED_WORKER_"): v for k, v in env.items()}  # OTEL_* unchanged
    worker, _ = stack.enter_context(worker_process(MODEL, logs / tag, env=worker_env))
    port = free_port()
    gateway = f"http://127.0.0.1:{port}"
    cmd = genembed("gateway", "--port", str(port), f"--worker={MODEL}={worker}", "--log-level", "warning")
    stack.enter_context(running(cmd, f"{gateway}/ready", env=env, log_path=logs / tag / "gateway.log"))
    return gateway


def span_cost_us(collector_port: int, n: int) -> dict[str, float]:
    """CPU time one span costs the thread that makes it (start with an attribute, end, hand to the batch
    processor), off vs on; the export thread's work is not in it. The end-to-end figures swing far more than
    this on a shared machine."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    from common import tracing

    def per_span() -> float:
        started = time.thread_time()
        for i in range(n):
            with tracing.span("bench", attributes={"genembed.items": i}):
                pass
        return (time.thread_time() - started) / n * 1e6

    off = per_span()
    tracing.setup("genembed-bench", OTLPSpanExporter(endpoint=f"http://127.0.0.1:{collector_port}/v1/traces"))
    on = per_span()
    tracing.shutdown()
    return {"off_us": off, "on_us": on}


def sequential_p50_ms(gateway: str, sentences: Sentences, n: int) -> float:
    out = []
    with httpx.Client(base_url=gateway, timeout=60) as client:
        for text in sentences.take(n):
            started = time.perf_counter()
            client.post("/v1/embeddings", json={"model": MODEL, "input": [text[:60]]}).raise_for_status()
            out.append((time.perf_counter() - started) * 1000)
    return percentile(out, 50)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10, help="closed-loop load per round and pair")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--sequential", type=int, default=100, help="single requests per round and pair (p50)")
    parser.add_argument("--spans", type=int, default=2000, help="per-span CPU cost (fits the 2048-span queue)")
    parser.add_argument("--tag", default="cpu", help="results file suffix")
    args = parser.parse_args()
    RESULTS.mkdir(exist_ok=True)
    logs = Path(tempfile.mkdtemp(prefix="genembed-bench-tracing-"))
    (logs / "off").mkdir()
    (logs / "on").mkdir()
    sentences = Sentences(seed=1)
    load_at_start = load_average()
    collector = start_collector()
    otel = {
        "GENEMBED_OTEL": "true",
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{collector.server_port}",
    }
    rounds: dict[str, list[dict[str, float]]] = {"off": [], "on": []}
    with ExitStack() as stack:
        gateways = {"off": start_pair(stack, logs, {}, "off"), "on": start_pair(stack, logs, otel, "on")}
        for _ in range(2):  # warm both pairs up (first requests pay for lazy initialisation)
            for gateway in gateways.values():
                sequential_p50_ms(gateway, sentences, 10)
        for r in range(args.rounds):
            for mode in ("off", "on") if r % 2 == 0 else ("on", "off"):
                row = asyncio.run(sweep_point(gateways[mode], args.concurrency, args.seconds, sentences))
                p50 = sequential_p50_ms(gateways[mode], sentences, args.sequential)
                figures = {"embeddings_per_s": row.embeddings_per_s, "p50_ms": row.p50_ms, "p99_ms": row.p99_ms}
                rounds[mode].append({**figures, "single_p50_ms": p50, "errors": row.errors})
                print(
                    f"  round {r + 1} tracing {mode:<3}  {row.embeddings_per_s:7.1f} emb/s  p50 {row.p50_ms:7.1f} ms"
                    f"  p99 {row.p99_ms:7.1f} ms  single p50 {p50:6.1f} ms  errors {row.errors}"
                )
        time.sleep(1)  # let the last batch of spans arrive

    summary = {mode: {k: statistics.median(x[k] for x in rows) for k in rows[0]} for mode, rows in rounds.items()}
    keys = ("embeddings_per_s", "p50_ms", "p99_ms", "single_p50_ms")
    ratios = {k: summary["on"][k] / summary["off"][k] for k in keys}
    print(
        f"\n== medians of {args.rounds} rounds, {args.concurrency} requests in flight ({args.seconds:g} s), "
        f"{args.sequential} single requests"
    )
    print(f"{'':<22}{'off':>10}{'on':>10}{'on/off':>9}")
    for key in ratios:
        print(f"{key:<22}{summary['off'][key]:>10.1f}{summary['on'][key]:>10.1f}{ratios[key]:>9.3f}")
    spans = span_cost_us(collector.server_port, args.spans)
    print(f"one span on the request's thread: {spans['off_us']:.2f} us off, {spans['on_us']:.2f} us on")
    print(f"spans received by the collector: {collector.spans}")
    report = {
        "machine": machine(),
        "load_average_1_5_15m": {"start": load_at_start, "end": load_average()},
        "model": MODEL,
        "settings": vars(args),
        "rounds": rounds,
        "median": summary,
        "on_over_off": ratios,
        "span_cpu_us": spans,
        "spans_received": collector.spans,
    }
    collector.shutdown()
    out = RESULTS / f"tracing-{args.tag}.json"
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
