"""Capacity and overload: an open-loop load suite against `genembed serve` (by hand, not in CI).

    python loadtests/load_suite.py                      # full suite (~15 min), loadtests/results/load-cpu.*
    python loadtests/load_suite.py --quick --out /tmp/load-quick   # ~10 s per scenario: a smoke test

It starts its own `genembed serve --model smollm2-gircse --model minilm-l6` on a free loopback port, warms it
up, measures each model's capacity (closed loop of single queries, embeddings/s of 200s), then drives it with
an OPEN-LOOP generator: arrivals on a precomputed Poisson schedule, each request sent at its time whatever is
outstanding, so overload is real (a closed loop slows down with the server and never overloads it). Every
request has a client timeout a little above the gateway's deadline, so nothing hangs; latency counts from the
scheduled arrival, so a late generator shows up as latency rather than hiding it (its lag is reported too).

Scenarios: (a) single gircse queries at 0.5/0.9/1.5/4x capacity, K uniform from {0,1,3,5,10,20};
(b) indexing: 8 clients sending 128-document batches back to back to minilm-l6 (429s honour Retry-After);
(c) burst: 256 simultaneous gircse queries on an idle server; (d) gircse and minilm-l6 each at 0.9x of its own
capacity at once; (e) (a) at 1.5x and 4x with `refinement_steps: {"min": 1, "max": 10}` (reported as
unsupported if the gateway answers 400 to that form); (f) two gateways in front of the same gircse worker (a
second `genembed gateway` on serve's worker), offered 0.9x and 2.5x of capacity in total, half through each;
(g) heavy requests on an idle server: 200 concurrent requests of 16 inputs at K = 20. Then the issue's target:
64 concurrent single queries at K = 5 through the gateway vs bench_engine.py's lock-step baseline run in this
process on the same prompts.

Per scenario: offered rate, goodput, p50/p95/p99 of 200s, shares of 429/503/other, the share *accepted then
late* (504, or a client timeout: the gateway answers every request it does not refuse by its deadline plus a
second, so a client that waited past that had its request accepted), mean steps granted, where each 429 came
from (a gateway bound, a worker's decision, or the gateway repeating a worker's refusal that still holds), and the
peak RSS of the gateway and each worker (psutil, every 0.5 s). The load generator, the gateway and the workers
share this machine's cores: the JSON records the CPU, the load average and the busiest other processes.
`--offer-per-s GIRCSE MINILM` offers multiples of fixed rates instead of the capacity each run measures, so the two
sides of an A/B get the same load (the measured capacity moves by tens of percent between runs on a noisy VM).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import resource
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import aiohttp
import httpx
import numpy as np
import orjson
import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the process helpers the tests use

from harness.procs import free_port, genembed, running  # noqa: E402
from loadtests.bench_engine import MIXED_K, make_prompts, run_lockstep  # noqa: E402
from loadtests.bench_gateway import Sentences, load_average, machine, percentile  # noqa: E402
from service.settings import GatewaySettings  # noqa: E402

GIRCSE = "smollm2-gircse"
MINILM = "minilm-l6"
STEP_RANGE = {"min": 1, "max": 10}


# ---------------------------------------------------------------------------------------------
# Memory of the served process tree


class RssSampler:
    """Samples the RSS of `genembed serve` (the gateway), each worker child, a second gateway this process started
    and this process (the load generator) every `interval` s, and counts each one's CPU seconds per scenario.

    Workers are found by their command line on every sample, so a restarted worker is still tracked."""

    def __init__(self, root_pid: int, interval: float = 0.5) -> None:
        self.root = psutil.Process(root_pid)
        self.me = psutil.Process()
        self.interval = interval
        self.peaks: dict[str, float] = {}
        self.cpu_seen: dict[int, float] = {}  # pid: user + system seconds at the last take_cpu
        self.lock = threading.Lock()
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def pids(self) -> set[int]:
        with contextlib.suppress(psutil.Error):
            return {self.root.pid, *(p.pid for p in self.root.children(recursive=True))}
        return {self.root.pid}

    def processes(self) -> list[tuple[str, psutil.Process]]:
        """(label, process): `gateway`, `worker:<model>`, `gateway-2` (scenario f) and `generator`."""
        out = [("generator", self.me), ("gateway", self.root)]
        with contextlib.suppress(psutil.Error):
            for child in self.root.children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    cmd = child.cmdline()
                    if "worker" in cmd and "--model" in cmd:
                        out.append((f"worker:{cmd[cmd.index('--model') + 1]}", child))
            for child in self.me.children():
                with contextlib.suppress(psutil.Error):
                    if child.pid != self.root.pid and "gateway" in child.cmdline():
                        out.append(("gateway-2", child))
        return out

    def sample(self) -> dict[str, float]:
        """MB per process label."""
        out: dict[str, float] = {}
        for label, proc in self.processes():
            with contextlib.suppress(psutil.Error):
                out[label] = out.get(label, 0.0) + proc.memory_info().rss / 2**20
        return out

    def take_cpu(self) -> dict[str, float]:
        """CPU seconds (user + system, threads included) per label since the last call: where the cores went."""
        out: dict[str, float] = {}
        for label, proc in self.processes():
            with contextlib.suppress(psutil.Error):
                times = proc.cpu_times()
                total = times.user + times.system
                out[label] = out.get(label, 0.0) + max(0.0, total - self.cpu_seen.get(proc.pid, 0.0))
                self.cpu_seen[proc.pid] = total
        return {k: round(v, 1) for k, v in out.items()}

    def _run(self) -> None:
        while not self.stop_event.wait(self.interval):
            current = self.sample()
            with self.lock:
                for label, mb in current.items():
                    self.peaks[label] = max(self.peaks.get(label, 0.0), mb)

    def start(self) -> None:
        self.thread.start()

    def take_usage(self) -> tuple[dict[str, float], dict[str, float]]:
        """RSS peaks (MB) and CPU seconds per label since the last call (one scenario's), then start afresh."""
        current = self.sample()
        with self.lock:
            peaks = {k: round(max(v, current.get(k, 0.0)), 1) for k, v in self.peaks.items()}
            self.peaks = {}
        return peaks, self.take_cpu()

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(2)


class WorkerEstimates:
    """How each worker's expected finish times held up over a scenario: the worker's own histogram of expected minus
    actual seconds to each accepted online call's answer (`genembed_worker_finish_error_seconds`), read before and
    after. Admission is only as good as these estimates: a call answered after its expected time is one its worker
    admitted on too short an estimate, late to the client or not."""

    METRIC = "genembed_worker_finish_error_seconds_bucket"

    def __init__(self, workers: dict[str, str]) -> None:
        self.workers = workers  # model: worker URL
        self.seen = {model: self._read(url) for model, url in workers.items()}

    def _read(self, url: str) -> dict[str, float]:
        """Cumulative count per bucket bound (`le`)."""
        with contextlib.suppress(httpx.HTTPError):
            text = httpx.get(f"{url}/metrics", timeout=10).text
            return {le: float(v) for le, v in re.findall(rf'^{self.METRIC}{{le="([^"]+)"}} (\S+)$', text, re.M)}
        return {}

    def take(self) -> dict[str, dict[str, object]]:
        """Per model since the last call: accepted online calls, the shares answered after their expected time and
        more than 1 s after it, and the histogram's cumulative counts (expected minus actual seconds, per bound)."""
        out = {}
        for model, url in self.workers.items():
            now = self._read(url)
            delta = {le: v - self.seen[model].get(le, 0.0) for le, v in now.items()}
            self.seen[model] = now
            calls = delta.get("+Inf", 0.0)
            out[model] = {
                "calls": calls,
                "after_expected": delta.get("0.0", 0.0) / calls if calls else 0.0,
                "over_1s_after": delta.get("-1.0", 0.0) / calls if calls else 0.0,
                "cumulative": delta,
            }
        return out


def output_path(prefix: Path, suffix: str) -> Path:
    """`prefix` with `suffix` added: a prefix may hold dots (`/tmp/load-share0.7`), which `with_suffix` would cut."""
    return prefix.with_name(prefix.name.removesuffix(suffix) + suffix)


def other_processes(exclude: set[int], top: int = 8) -> list[dict[str, object]]:
    """The busiest processes outside the suite and its server over one second: what else shared the CPU."""
    procs = []
    for proc in psutil.process_iter(["pid", "name", "cmdline"]):
        if proc.pid in exclude:
            continue
        with contextlib.suppress(psutil.Error):
            proc.cpu_percent(None)
            procs.append(proc)
    time.sleep(1.0)
    busy = []
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            cpu = proc.cpu_percent(None)
            if cpu >= 5:
                cmd = " ".join(proc.info["cmdline"] or [proc.info["name"] or "?"])
                busy.append({"pid": proc.pid, "cpu_percent": round(cpu, 1), "cmd": cmd[:120]})
    return sorted(busy, key=lambda p: -p["cpu_percent"])[:top]


# ---------------------------------------------------------------------------------------------
# Requests and their outcomes


@dataclass
class Outcome:
    status: str  # "200", "429", "503", another code, "timeout" or "error"
    latency_s: float
    embeddings: int = 0
    steps: list[int] = field(default_factory=list)
    lag_s: float = 0.0  # how late the generator sent it
    refused_by: str = ""  # a 429's source (`refusal_source`)


#: a 429's message, as the gateway words it, and which bound or decision refused the request
REFUSAL_SOURCES = (
    ("behind its requests", "gateway: event loop late"),
    ("inputs are in flight", "gateway: inputs bound"),
    ("worker calls are in flight", "gateway: calls bound"),
    ("refused a call at least as heavy", "gateway: the worker's recent refusal"),
    ("hold any new call", "worker: queue ahead"),
    ("would finish after", "worker: would finish late"),
    ("would make calls already accepted", "worker: would make others late"),
)


def refusal_source(body: dict | None) -> str:
    message = ((body or {}).get("error") or {}).get("message", "")
    return next((source for words, source in REFUSAL_SOURCES if words in message), "other")


@dataclass
class ScenarioResult:
    name: str
    model: str
    offered_per_s: float | None
    duration_s: float
    requests: int
    statuses: dict[str, int]
    share_429: float
    share_503: float
    share_other: float  # neither 200, 429, 503 nor late
    share_late: float  # accepted then late: 504 or a client timeout
    goodput_per_s: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    mean_steps_granted: float | None
    generator_lag_p99_ms: float
    rss_peak_mb: dict[str, float]
    cpu_s: dict[str, float]  # CPU seconds per process over the scenario (the cores are shared)
    refused_by: dict[str, int] = field(default_factory=dict)  # 429s per source (REFUSAL_SOURCES)
    note: str = ""
    estimates: dict[str, object] | None = None  # how its worker's expected finish times held up (WorkerEstimates)


def summarise(
    name: str,
    model: str,
    outcomes: list[Outcome],
    elapsed: float,
    offered: float | None,
    usage: tuple[dict[str, float], dict[str, float]],
    note: str = "",
) -> ScenarioResult:
    statuses = Counter(o.status for o in outcomes)
    ok = [o for o in outcomes if o.status == "200"]
    ms = [1000 * o.latency_s for o in ok]
    steps = [s for o in ok for s in o.steps]
    n = max(1, len(outcomes))
    late = statuses["504"] + statuses["timeout"]
    other = sum(v for k, v in statuses.items() if k not in ("200", "429", "503", "504", "timeout"))
    return ScenarioResult(
        name=name,
        model=model,
        offered_per_s=offered,
        duration_s=round(elapsed, 2),
        requests=len(outcomes),
        statuses=dict(statuses),
        share_429=statuses["429"] / n,
        share_503=statuses["503"] / n,
        share_other=other / n,
        share_late=late / n,
        goodput_per_s=sum(o.embeddings for o in ok) / elapsed if elapsed > 0 else 0.0,
        p50_ms=percentile(ms, 50),
        p95_ms=percentile(ms, 95),
        p99_ms=percentile(ms, 99),
        mean_steps_granted=float(np.mean(steps)) if steps else None,
        generator_lag_p99_ms=percentile([1000 * o.lag_s for o in outcomes], 99),
        rss_peak_mb=usage[0],
        cpu_s=usage[1],
        refused_by=dict(Counter(o.refused_by for o in outcomes if o.status == "429")),
        note=note,
    )


def query_body(model: str, texts: list[str] | list[list[int]], steps: object = None, input_type: str = "query"):
    body: dict[str, object] = {"model": model, "input": texts, "input_type": input_type}
    if steps is not None:
        body["refinement_steps"] = steps
    return body


@dataclass
class Reply:
    status: str  # the HTTP status, "timeout" or "error"
    body: dict | None = None  # a JSON answer
    retry_after: float = 1.0


async def post(client: aiohttp.ClientSession, body: dict) -> Reply:
    """POST /v1/embeddings. aiohttp, not httpx: httpcore's pool walks every open connection on each request and
    release (encode/httpcore#1035), and this generator holds thousands at 4x: with httpx it fell 20 s behind its
    schedule there and spent more CPU than the gateway (loadtests/bench_http_client.py)."""
    try:
        async with client.post("/v1/embeddings", json=body) as response:
            raw = await response.read()
            retry_after = response.headers.get("retry-after", "1")
            status = response.status
    except TimeoutError:
        return Reply("timeout")
    except aiohttp.ClientError:
        return Reply("error")
    with contextlib.suppress(ValueError):
        return Reply(str(status), orjson.loads(raw), float(retry_after) if retry_after.isdigit() else 1.0)
    return Reply(str(status), {"text": raw[:300].decode(errors="replace")})


def session(url: str, timeout_s: float, connections: int = 4096) -> aiohttp.ClientSession:
    """The generator's client: each request gives up `timeout_s` after it is sent."""
    return aiohttp.ClientSession(
        url,
        # idle connections dropped before uvicorn's own keep-alive timeout (5 s) closes them: a request sent on one
        # it is closing fails ("error", one in a few thousand at 4x before)
        connector=aiohttp.TCPConnector(limit=connections, keepalive_timeout=4),
        timeout=aiohttp.ClientTimeout(total=timeout_s),
        json_serialize=lambda body: orjson.dumps(body).decode(),
    )


async def send(client: aiohttp.ClientSession, body: dict, scheduled: float, lag: float = 0.0) -> Outcome:
    """One request; latency from `scheduled` (perf_counter), so generator lag counts against the server."""
    reply = await post(client, body)
    latency = time.perf_counter() - scheduled
    if reply.status == "429":
        return Outcome(reply.status, latency, lag_s=lag, refused_by=refusal_source(reply.body))
    if reply.status != "200" or reply.body is None:
        return Outcome(reply.status, latency, lag_s=lag)
    data = reply.body["data"]
    steps = [d["refinement_steps"] for d in data if d.get("refinement_steps") is not None]
    return Outcome("200", latency, embeddings=len(data), steps=steps, lag_s=lag)


class Load:
    """The server under test: base URL, client settings, distinct texts and the RSS sampler."""

    def __init__(self, url: str, deadline_s: float, sampler: RssSampler, seed: int = 0) -> None:
        self.url = url
        self.client_timeout = deadline_s + 5
        self.sampler = sampler
        self.sentences = Sentences(seed)  # numbered: never a cache hit
        self.rng = np.random.default_rng(seed)

    def client(self) -> aiohttp.ClientSession:
        return session(self.url, self.client_timeout)

    def single(self, model: str, steps: object = "mixed") -> dict:
        """One new query; `steps`: "mixed" draws K from MIXED_K, None leaves it to the model (pooled)."""
        k = int(self.rng.choice(MIXED_K)) if steps == "mixed" else steps
        return query_body(model, self.sentences.take(1), k)

    async def closed_loop(self, model: str, concurrency: int, seconds: float, steps: object = "mixed") -> float:
        """Capacity: `concurrency` single queries in flight for `seconds`; embeddings/s of the 200s. A 429 waits
        its Retry-After (at most 1 s) so a refusal is not counted as capacity."""
        done = 0
        stop = time.perf_counter() + seconds

        async def user(client: aiohttp.ClientSession) -> None:
            nonlocal done
            while time.perf_counter() < stop:
                outcome = await send(client, self.single(model, steps), time.perf_counter())
                done += outcome.embeddings
                if outcome.status != "200":
                    await asyncio.sleep(1.0)

        async with self.client() as client:
            started = time.perf_counter()
            await asyncio.gather(*(user(client) for _ in range(concurrency)))
            return done / (time.perf_counter() - started)

    async def open_loop(self, model: str, rate: float, seconds: float, max_requests: int, steps: object = "mixed"):
        """Poisson arrivals at `rate`/s for `seconds` (at most `max_requests`), each sent at its scheduled time."""
        gaps = self.rng.exponential(1.0 / rate, size=max_requests)
        times = np.cumsum(gaps)
        times = times[times < seconds]
        bodies = [self.single(model, steps) for _ in times]
        tasks = []
        async with self.client() as client:
            start = time.perf_counter()
            for at, body in zip(times, bodies, strict=True):
                delay = start + at - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                scheduled = start + at
                tasks.append(asyncio.create_task(send(client, body, scheduled, time.perf_counter() - scheduled)))
            outcomes = await asyncio.gather(*tasks)
            elapsed = max(seconds, time.perf_counter() - start)
        return list(outcomes), elapsed, len(times) / seconds

    async def burst(self, model: str, n: int, inputs: int = 1, steps: object = "mixed") -> tuple[list[Outcome], float]:
        """`n` requests at once; each of one new query at a mixed K, or of `inputs` new queries at `steps`."""
        async with self.client() as client:
            bodies = [
                self.single(model)
                if inputs == 1 and steps == "mixed"
                else query_body(model, self.sentences.take(inputs), steps)
                for _ in range(n)
            ]
            start = time.perf_counter()
            outcomes = await asyncio.gather(*(send(client, b, start) for b in bodies))
            return list(outcomes), time.perf_counter() - start

    async def indexing(self, model: str, clients: int, batch: int, seconds: float) -> tuple[list[Outcome], float]:
        """`clients` indexers, each sending `batch` new documents back to back; a 429 waits its Retry-After."""
        outcomes: list[Outcome] = []
        stop = time.perf_counter() + seconds

        async def indexer(client: aiohttp.ClientSession) -> None:
            while time.perf_counter() < stop:
                body = query_body(model, self.sentences.take(batch), input_type="document")
                started = time.perf_counter()
                reply = await post(client, body)
                latency = time.perf_counter() - started
                if reply.status == "200":
                    outcomes.append(Outcome("200", latency, embeddings=batch))
                else:
                    source = refusal_source(reply.body) if reply.status == "429" else ""
                    outcomes.append(Outcome(reply.status, latency, refused_by=source))
                    await asyncio.sleep(min(reply.retry_after, 10))

        async with self.client() as client:
            start = time.perf_counter()
            await asyncio.gather(*(indexer(client) for _ in range(clients)))
            return outcomes, time.perf_counter() - start

    async def step_range_supported(self) -> str | None:
        """None if the gateway takes `refinement_steps: {min, max}`, else what it answered."""
        async with self.client() as client:
            reply = await post(client, self.single(GIRCSE, STEP_RANGE))
        if reply.status == "200":
            return None
        return f"HTTP {reply.status}: {reply.body}"

    def settle(self, timeout: float = 60) -> None:
        """Wait until the gateway serves no request (its in-flight gauge), so scenarios don't overlap."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                text = httpx.get(f"{self.url}/metrics", timeout=5).text
                match = re.search(r"^genembed_gateway_in_flight_requests (\S+)$", text, re.M)
                if match is None or float(match.group(1)) <= 1:  # the /metrics request itself
                    return
            time.sleep(0.5)


# ---------------------------------------------------------------------------------------------
# The target: 64 concurrent K = 5 queries through the gateway vs the lock-step baseline


async def gateway_concurrent(load: Load, prompts: list[list[int]], concurrency: int, k: int) -> dict[str, object]:
    """Closed loop, `concurrency` in flight, each prompt once as token ids (input_type document: no template,
    the same tokens the lock-step baseline runs)."""
    queue = list(prompts)
    statuses: Counter[str] = Counter()

    async def user(client: aiohttp.ClientSession) -> None:
        while queue:
            ids = queue.pop()
            outcome = await send(client, query_body(GIRCSE, [ids], k, "document"), time.perf_counter())
            statuses[outcome.status] += 1

    async with load.client() as client:
        start = time.perf_counter()
        await asyncio.gather(*(user(client) for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    return {"embeddings_per_s": statuses["200"] / elapsed, "seconds": elapsed, "statuses": dict(statuses)}


def lockstep_target(load: Load, requests: int, concurrency: int = 64, k: int = 5) -> dict[str, object]:
    """The same prompts through the gateway (worker busy) and through bench_engine's lock-step baseline in this
    process (worker idle), the gateway first; the worker's dtype (the spec's default) in both."""
    from model_server.loading import load_model
    from model_server.specs import load_spec

    loaded = load_model(load_spec(GIRCSE, device="cpu"))
    prompts = make_prompts(loaded.tokenizer, requests)
    gateway = asyncio.run(gateway_concurrent(load, prompts, concurrency, k))
    run_lockstep(loaded, [(p, k) for p in prompts[:16]])  # warm-up
    lock_s = run_lockstep(loaded, [(p, k) for p in prompts])
    lock_rate = len(prompts) / lock_s
    # Like for like only when the gateway answered every prompt: with some refused, its rate counts fewer
    # embeddings in a shorter run than the lock-step's, and a ratio of the two measures nothing.
    not_answered = len(prompts) - gateway["statuses"].get("200", 0)
    return {
        "requests": requests,
        "concurrency": concurrency,
        "k": k,
        "dtype": str(loaded.dtype),
        "gateway": gateway,
        "lockstep_embeddings_per_s": lock_rate,
        "not_answered": not_answered,
        "ratio": None if not_answered else gateway["embeddings_per_s"] / lock_rate,
        "target_ratio": 1.5,
    }


# ---------------------------------------------------------------------------------------------


#: serve's workers take this token (it would make its own), so (f)'s second gateway can call them too
WORKER_TOKEN = {"GENEMBED_WORKER_TOKEN": f"load-suite-{os.getpid()}"}


@contextlib.contextmanager
def serve(logs: Path, ready_timeout: float, cpu_split: str) -> Iterator[tuple[str, int]]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = genembed("serve", "--model", GIRCSE, "--model", MINILM, "--port", str(port), "--log-level", "warning")
    cmd += ["--cpu-split", cpu_split]
    with running(cmd, f"{url}/ready", timeout=ready_timeout, env=WORKER_TOKEN, log_path=logs / "serve.log") as proc:
        yield url, proc.pid


def worker_url(gateway: str, model: str) -> str:
    """The address of `model`'s worker behind `gateway`, from the backlog gauge it keeps per worker."""
    text = httpx.get(f"{gateway}/metrics", timeout=10).text
    found = re.search(rf'^genembed_gateway_worker_drain_seconds{{model="{model}",worker="([^"]+)"}}', text, re.M)
    if found is None:
        raise RuntimeError(f"{gateway} reports no worker of {model} (genembed_gateway_worker_drain_seconds)")
    return found.group(1)


@contextlib.contextmanager
def second_gateway(logs: Path, model: str, worker: str) -> Iterator[str]:
    """Another `genembed gateway` in front of `worker` (scenario f), with its own cache and routing state."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = genembed("gateway", "--port", str(port), f"--worker={model}={worker}", "--log-level", "warning")
    with running(cmd, f"{url}/ready", timeout=60, env=WORKER_TOKEN, log_path=logs / "gateway-2.log"):
        yield url


def print_row(r: ScenarioResult) -> None:
    offered = f"{r.offered_per_s:7.2f}" if r.offered_per_s is not None else "      -"
    steps = f"{r.mean_steps_granted:5.2f}" if r.mean_steps_granted is not None else "    -"
    print(
        f"{r.name:<16} {r.model:<15} {offered} {r.goodput_per_s:8.2f} {r.p50_ms:8.0f} {r.p95_ms:8.0f} "
        f"{r.p99_ms:8.0f} {100 * r.share_429:5.1f}% {100 * r.share_503:5.1f}% {100 * r.share_late:5.1f}% "
        f"{100 * r.share_other:5.1f}% {steps} {r.requests:6d}  {r.note}"
    )
    print(f"{'':<16} CPU s: " + ", ".join(f"{label} {seconds:.0f}" for label, seconds in sorted(r.cpu_s.items())))
    if r.refused_by:
        print(f"{'':<16} 429 from: " + ", ".join(f"{source} {n}" for source, n in sorted(r.refused_by.items())))
    if r.estimates and r.estimates["calls"]:
        e = r.estimates
        print(
            f"{'':<16} worker's estimates: {e['calls']:.0f} calls accepted, {100 * e['after_expected']:.1f} % answered "
            f"after their expected time, {100 * e['over_1s_after']:.1f} % more than 1 s after"
        )


HEADER = (
    f"{'scenario':<16} {'model':<15} {'offer/s':>7} {'good/s':>8} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} "
    f"{'429':>6} {'503':>6} {'late':>6} {'other':>6} {'steps':>5} {'reqs':>6}"
)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [ScenarioResult(**r) for r in report["scenarios"]]
    capacity = report["capacity_per_s"][GIRCSE]
    deadline_ms = 1000 * report["deadline_s"]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    (good, lat), (share, rss) = axes
    for prefix, label, marker in (("a ", "fixed K (a)", "o"), ("e ", "steps 1..10 (e)", "s")):
        mine = [r for r in rows if r.name.startswith(prefix) and r.offered_per_s]
        x = [r.offered_per_s / capacity for r in mine]
        good.plot(x, [r.goodput_per_s for r in mine], marker=marker, label=label)
        lat.plot(x, [r.p99_ms for r in mine], marker=marker, label=f"p99 {label}")
        lat.plot(x, [r.p50_ms for r in mine], marker=marker, linestyle=":", label=f"p50 {label}")
    good.axhline(capacity, color="k", linestyle="--", label=f"capacity {capacity:.1f}/s")
    good.set(xlabel="offered load (x capacity)", ylabel="goodput (embeddings/s)", title=f"{GIRCSE}: goodput")
    good.legend()
    lat.axhline(deadline_ms, color="r", linestyle="--", label="deadline")
    lat.set(xlabel="offered load (x capacity)", ylabel="latency of 200s (ms)", yscale="log", title="latency")
    lat.legend(fontsize=7)
    names = [f"{r.name}\n{r.model}" for r in rows]
    x = np.arange(len(rows))
    s429 = np.array([100 * r.share_429 for r in rows])
    s503 = np.array([100 * r.share_503 for r in rows])
    share.bar(x, s429, label="429")
    share.bar(x, s503, bottom=s429, label="503")
    slate = np.array([100 * r.share_late for r in rows])
    share.bar(x, slate, bottom=s429 + s503, label="accepted then late")
    share.bar(x, [100 * r.share_other for r in rows], bottom=s429 + s503 + slate, label="other")
    share.set_xticks(x, names, rotation=90, fontsize=6)
    share.set(ylabel="% of requests", title="refusals and late answers per scenario")
    share.legend()
    labels = sorted({k for r in rows for k in r.rss_peak_mb})
    for label in labels:
        rss.plot(x, [r.rss_peak_mb.get(label, np.nan) for r in rows], marker="o", label=label)
    rss.set_xticks(x, names, rotation=90, fontsize=6)
    rss.set(ylabel="peak RSS (MB)", title="peak RSS per scenario")
    rss.legend(fontsize=7)
    fig.suptitle(f"genembed load suite ({report['mode']}), {report['machine']['cpu']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="~10 s per scenario: a smoke test, not a report")
    parser.add_argument("--out", type=Path, default=None, help="output prefix (default loadtests/results/load-cpu)")
    parser.add_argument("--seconds", type=float, default=None, help="per open-loop scenario (default 60, quick 10)")
    parser.add_argument("--capacity-seconds", type=float, default=None, help="per model (default 20, quick 8)")
    parser.add_argument("--capacity-concurrency", type=int, default=32)
    parser.add_argument(
        "--offer-per-s",
        type=float,
        nargs=2,
        metavar=("GIRCSE", "MINILM"),
        help="offer multiples of these rates instead of the measured capacities (A/B runs at equal offered load)",
    )
    parser.add_argument("--max-requests", type=int, default=20000, help="cap of one open-loop schedule")
    parser.add_argument("--target-requests", type=int, default=None, help="K=5 target check (default 256, quick 64)")
    parser.add_argument("--skip-target", action="store_true", help="skip the lock-step comparison")
    parser.add_argument("--only", default="abcdefg", help="scenarios to run, e.g. 'ae' (default: all)")
    parser.add_argument("--ready-timeout", type=float, default=600)
    parser.add_argument("--cpu-split", choices=["turns", "even", "off"], default="turns", help="serve's --cpu-split")
    args = parser.parse_args()
    # SIGTERM (e.g. `timeout`) unwinds like Ctrl-C, so the served processes are stopped, not orphaned.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    seconds = args.seconds or (10 if args.quick else 60)
    cap_seconds = args.capacity_seconds or (8 if args.quick else 20)
    target_requests = args.target_requests or (64 if args.quick else 256)
    out = args.out or REPO / "loadtests" / "results" / "load-cpu"
    out.parent.mkdir(parents=True, exist_ok=True)
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # thousands of requests may be outstanding at 4x
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    deadline = GatewaySettings().request_timeout_s
    logs = Path(tempfile.mkdtemp(prefix="genembed-load-"))
    report: dict[str, object] = {
        "mode": "quick" if args.quick else "full",
        "scenarios_run": args.only,
        "machine": machine(),
        "load_average_1_5_15m": {"start": load_average()},
        "deadline_s": deadline,
        "seconds_per_scenario": seconds,
        "cpu_split": args.cpu_split,
        "settings_from_environment": {  # what the servers inherit (secrets left out)
            k: v
            for k, v in sorted(os.environ.items())
            if k.startswith("GENEMBED_") and not any(w in k for w in ("TOKEN", "KEY", "PASSWORD", "SECRET", "URL"))
        },
        "server_logs": str(logs),
    }
    results: list[ScenarioResult] = []
    estimates: WorkerEstimates | None = None
    taken: dict[str, dict[str, dict[str, object]]] = {}  # the estimates of the scenario being recorded

    def record(r: ScenarioResult) -> None:
        """Print the row and rewrite the JSON, so a run cut short keeps what it measured."""
        if estimates is not None:
            if r.name not in taken:  # (d) records one row per model: one reading for both
                taken.clear()
                taken[r.name] = estimates.take()
            r.estimates = taken[r.name].get(r.model)
        results.append(r)
        print_row(r)
        partial = {**report, "scenarios": [asdict(x) for x in results]}
        output_path(out, ".json").write_text(json.dumps(partial, indent=2))

    print(f"machine: {report['machine']}, load average {report['load_average_1_5_15m']['start']}")
    with serve(logs, args.ready_timeout, args.cpu_split) as (url, pid):
        sampler = RssSampler(pid)
        report["rss_at_ready_mb"] = sampler.sample()
        sampler.start()
        load = Load(url, deadline, sampler)
        report["other_processes_at_start"] = other_processes({os.getpid(), *sampler.pids()})
        print(f"serving on {url} (logs {logs}); deadline {deadline:g} s; warming up")
        asyncio.run(load.closed_loop(GIRCSE, 4, 5 if args.quick else 15))
        asyncio.run(load.closed_loop(MINILM, 4, 3 if args.quick else 10, steps=None))
        load.settle()
        report["rss_after_warmup_mb"] = {k: round(v, 1) for k, v in sampler.sample().items()}
        report["rss_peak_warmup_mb"] = sampler.take_usage()[0]

        capacity = {
            GIRCSE: asyncio.run(load.closed_loop(GIRCSE, args.capacity_concurrency, cap_seconds)),
            MINILM: asyncio.run(load.closed_loop(MINILM, args.capacity_concurrency, cap_seconds, steps=None)),
        }
        report["capacity_per_s"] = capacity
        report["capacity_method"] = (
            f"closed loop, {args.capacity_concurrency} single queries in flight for {cap_seconds:g} s per model "
            f"(gircse K uniform from {list(MIXED_K)}); 200s per second"
        )
        print(f"capacity: {GIRCSE} {capacity[GIRCSE]:.2f}/s, {MINILM} {capacity[MINILM]:.2f}/s")
        offer = capacity  # the rates the scenarios' factors multiply
        if args.offer_per_s:
            offer = dict(zip((GIRCSE, MINILM), args.offer_per_s, strict=True))
            report["offer_per_s"] = offer
            print(f"offering multiples of {GIRCSE} {offer[GIRCSE]:g}/s, {MINILM} {offer[MINILM]:g}/s (--offer-per-s)")
        sampler.take_usage()
        load.settle()
        estimates = WorkerEstimates({model: worker_url(url, model) for model in (GIRCSE, MINILM)})
        print(HEADER)

        # (c) and (g) first: the server is idle right after the capacity phase settles.
        if "c" in args.only:
            outcomes, elapsed = asyncio.run(load.burst(GIRCSE, 256))
            record(summarise("c burst 256", GIRCSE, outcomes, elapsed, None, sampler.take_usage(), "K mixed"))
            load.settle()
        if "g" in args.only:
            outcomes, elapsed = asyncio.run(load.burst(GIRCSE, 200, inputs=16, steps=20))
            record(summarise("g heavy 200x16", GIRCSE, outcomes, elapsed, None, sampler.take_usage(), "16 inputs K=20"))
            load.settle()

        for factor in (0.5, 0.9, 1.5, 4.0) if "a" in args.only else ():
            outcomes, elapsed, offered = asyncio.run(
                load.open_loop(GIRCSE, factor * offer[GIRCSE], seconds, args.max_requests)
            )
            record(summarise(f"a {factor:g}x", GIRCSE, outcomes, elapsed, offered, sampler.take_usage(), "K mixed"))
            load.settle()

        unsupported = asyncio.run(load.step_range_supported())
        report["step_range_unsupported"] = unsupported
        for factor in (1.5, 4.0) if "e" in args.only else ():
            if unsupported:
                print(f"e {factor:g}x: skipped, the gateway refused refinement_steps {STEP_RANGE}: {unsupported}")
                continue
            outcomes, elapsed, offered = asyncio.run(
                load.open_loop(GIRCSE, factor * offer[GIRCSE], seconds, args.max_requests, STEP_RANGE)
            )
            record(summarise(f"e {factor:g}x", GIRCSE, outcomes, elapsed, offered, sampler.take_usage(), "K 1..10"))
            load.settle()

        async def both() -> list:
            return await asyncio.gather(
                load.open_loop(GIRCSE, 0.9 * offer[GIRCSE], seconds, args.max_requests),
                load.open_loop(MINILM, 0.9 * offer[MINILM], seconds, args.max_requests, steps=None),
            )

        if "d" in args.only:
            (g_out, g_el, g_off), (m_out, m_el, m_off) = asyncio.run(both())
            usage = sampler.take_usage()
            record(summarise("d 0.9x+0.9x", GIRCSE, g_out, g_el, g_off, usage, "with minilm at once"))
            record(summarise("d 0.9x+0.9x", MINILM, m_out, m_el, m_off, usage, "with gircse at once"))
            load.settle()

        if "f" in args.only:
            with second_gateway(logs, GIRCSE, worker_url(url, GIRCSE)) as url_2:
                other = Load(url_2, deadline, sampler, seed=1)
                for factor in (0.9, 2.5):
                    rate = factor * offer[GIRCSE] / 2

                    async def two_gateways(rate: float = rate) -> list:
                        return await asyncio.gather(
                            load.open_loop(GIRCSE, rate, seconds, args.max_requests),
                            other.open_loop(GIRCSE, rate, seconds, args.max_requests),
                        )

                    (one, el_1, off_1), (two, el_2, off_2) = asyncio.run(two_gateways())
                    usage = sampler.take_usage()
                    note = "2 gateways, 1 worker, half each"
                    record(
                        summarise(f"f {factor:g}x 2gw", GIRCSE, one + two, max(el_1, el_2), off_1 + off_2, usage, note)
                    )
                    load.settle()
                    other.settle()

        if "b" in args.only:
            outcomes, elapsed = asyncio.run(load.indexing(MINILM, 8, 128, seconds))
            record(summarise("b index 8x128", MINILM, outcomes, elapsed, None, sampler.take_usage(), "documents"))
            load.settle()

        if not args.skip_target:
            print(f"target: 64 concurrent single queries at K=5 ({target_requests}) vs lock-step, same prompts")
            target = lockstep_target(load, target_requests)
            report["target_64_concurrent_k5"] = target
            ratio = target["ratio"]
            verdict = (
                f"{ratio:.2f}x (target >= 1.5x)"
                if ratio is not None
                else f"no ratio: {target['not_answered']} of {target_requests} not answered 200"
            )
            print(
                f"  gateway {target['gateway']['embeddings_per_s']:.2f}/s {target['gateway']['statuses']}, "
                f"lock-step {target['lockstep_embeddings_per_s']:.2f}/s: {verdict}"
            )
            sampler.take_usage()
        sampler.stop()
        report["other_processes_at_end"] = other_processes({os.getpid(), *sampler.pids()})

    report["load_average_1_5_15m"]["end"] = load_average()
    report["scenarios"] = [asdict(r) for r in results]
    peaks: dict[str, float] = {}
    for r in results:
        for label, mb in r.rss_peak_mb.items():
            peaks[label] = max(peaks.get(label, 0.0), mb)
    base = report["rss_after_warmup_mb"]
    report["rss_peak_mb"] = peaks
    report["rss_growth_after_warmup_mb"] = {k: round(v - base.get(k, 0.0), 1) for k, v in peaks.items()}
    print(f"RSS after warm-up {base}; peak {peaks}; growth {report['rss_growth_after_warmup_mb']}")
    json_path = output_path(out, ".json")
    json_path.write_text(json.dumps(report, indent=2))
    plot(report, output_path(out, ".png"))
    print(f"wrote {json_path} and {output_path(out, '.png')}")


if __name__ == "__main__":
    main()
