"""Engine throughput vs a lock-step baseline vs the machine's FLOP limit (by hand, not in CI).

    python loadtests/bench_engine.py                      # default model, fp32 and bf16, this machine
    python loadtests/bench_engine.py --dtypes bfloat16 --device cuda   # on a GPU
    python loadtests/bench_engine.py --variants eager fast            # the step kernels against their fallback

For each dtype and load (K=0, K=5, K=20, mixed K from {0,1,3,5,10,20}), the same ~60-token prompts go
through (a) the engine, closed-loop with `--concurrency` requests in flight, and (b) a lock-step
baseline written the way GIRCSE's own encode serves: batches of 8 padded to the longest, every
request running its batch's largest K with `model(..., output_hidden_states=True, use_cache=True)`.
The FLOP-limited rate uses a large GEMM's measured rate (the better of before and after the loads) and FLOPs
per embedding = 2·(non-embedding params)·(prompt tokens + K) + 4·vocab·hidden·K. Drift: cosine between each input's
vector under load and the same input embedded alone. Writes a table, JSON and a PNG.

Variants (`--variants`, each its own worker and model copy, run alternately on every load, `--rounds` times
each, the best round counting, so their ratio comes from one run): `fast` is the worker's defaults (CPU:
projections packed for a GEMM, oneDNN's or genembed's own on AVX2-only CPUs; CUDA: decode steps replayed from CUDA
graphs), `eager` turns both off (torch's
F.linear, every kernel launched from Python). The lock-step baseline runs on a copy of the first variant's model,
packed alike (`--no-lockstep` leaves it out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import DynamicCache

from model_server.engine import EngineLimits
from model_server.hf_compat import cache_kwarg
from model_server.loading import LoadedModel, load_model
from model_server.runners.cpu_kernels import cpu_kernels
from model_server.runners.packed import PackedLinear, pack_for_serving, packing_available
from model_server.sequence import Input
from model_server.serving import EmbeddingWorker
from model_server.specs import load_spec
from model_server.threads import in_a_thread_of_its_own

RESULTS = Path(__file__).parent / "results"
MIXED_K = (0, 1, 3, 5, 10, 20)
#: spec overrides per engine variant (see the module docstring)
VARIANTS: dict[str, dict[str, object]] = {"fast": {}, "eager": {"linear": "eager", "cuda_graphs": False}}
WORDS = (
    "the of and to in is was for on that with as by at from his an were are which this be or has had "
    "not but it its their also first one new after who they have been two more when there into other "
    "city river music government system between during year team school company world state war time "
    "history population people area university album series family film part known called made"
).split()


@dataclass
class Row:
    dtype: str
    load: str
    system: str  # "engine", "engine-<variant>" when several variants ran, or "lockstep-8"
    embeddings_per_s: float
    seconds: float
    flop_limited_per_s: float
    fraction_of_flop_limit: float
    speedup_vs_lockstep: float | None = None
    drift_min_cos: float | None = None
    drift_mean_1mcos: float | None = None


def make_prompts(tokenizer, n: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    prompts = []
    for _ in range(n):
        ids = tokenizer(" ".join(rng.choice(WORDS, 80)), add_special_tokens=False)["input_ids"]
        prompts.append(ids[: int(rng.integers(50, 71))])
    return prompts


def gemm_flops(dtype: torch.dtype, device: torch.device, n: int = 2048) -> float:
    """The fastest of an n³ GEMM as `a @ b` and, where the engine packs its weights, as oneDNN's packed linear and
    genembed's own GEMM (`own_gemm`): on the 2-core AMD EPYC `a @ b` (MKL) measured 228 GFLOP/s while the engine's
    packed GEMMs ran faster, which put the engine at 150 % of a "limit"."""
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    products = [lambda: a @ b]
    if packing_available(device, dtype):
        packed = PackedLinear(b, None)
        products.append(lambda: packed(a))
        if (kernels := cpu_kernels()) is not None:
            own = PackedLinear(b, None, gemm=kernels)
            products.append(lambda: own(a))
    best = float("inf")
    with torch.inference_mode():
        for product in products:
            for _ in range(5):
                _sync(device)
                t = time.perf_counter()
                product()
                _sync(device)
                best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@dataclass(frozen=True)
class FlopModel:
    """What an embedding's FLOPs follow from, counted before the worker packs any weight (a packed weight
    is no parameter)."""

    non_embedding: int
    vocab: int
    hidden: int

    @classmethod
    def of(cls, loaded: LoadedModel) -> FlopModel:
        model = loaded.model
        params = sum(p.numel() for p in model.parameters())
        vocab, hidden = model.get_input_embeddings().weight.shape
        return cls(params - vocab * hidden, vocab, hidden)  # tied head: counted once as the embedding

    def per_embedding(self, prompt_tokens: int, k: int) -> float:
        return 2 * self.non_embedding * (prompt_tokens + k) + 4 * self.vocab * self.hidden * k


def run_engine(worker: EmbeddingWorker, cases: list[tuple[list[int], int]], concurrency: int):
    """Closed loop: `concurrency` requests in flight; a finished one is replaced at once."""
    slots = threading.Semaphore(concurrency)
    results: list[np.ndarray | None] = [None] * len(cases)
    done = threading.Event()
    remaining = [len(cases)]
    lock = threading.Lock()

    def finished(index: int, future) -> None:
        results[index] = future.result().vector
        slots.release()
        with lock:
            remaining[0] -= 1
            if remaining[0] == 0:
                done.set()

    start = time.perf_counter()
    for index, (ids, k) in enumerate(cases):
        slots.acquire()
        future = worker.engine.submit([Input(ids, k)])[0]
        future.add_done_callback(lambda f, i=index: finished(i, f))
    done.wait()
    return time.perf_counter() - start, np.stack(results)


def packed_copy(spec) -> LoadedModel:
    """The lock-step baseline's model: its linear layers packed as serving packs them, its own forward untouched."""
    loaded = load_model(spec)
    pack_for_serving(loaded)
    return loaded


@torch.inference_mode()
def run_lockstep(loaded: LoadedModel, cases: list[tuple[list[int], int]], batch: int = 8) -> float:
    model, device = loaded.model, loaded.device
    embed = model.get_input_embeddings().weight
    start = time.perf_counter()
    for first in range(0, len(cases), batch):
        chunk = cases[first : first + batch]
        width = max(len(ids) for ids, _ in chunk)
        steps = max(k for _, k in chunk)
        ids = torch.full((len(chunk), width), 0, dtype=torch.long, device=device)
        mask = torch.zeros((len(chunk), width), dtype=torch.long, device=device)
        for row, (tokens, _) in enumerate(chunk):  # left padding, as GIRCSE's tokenizer setup does
            ids[row, width - len(tokens) :] = torch.tensor(tokens, device=device)
            mask[row, width - len(tokens) :] = 1
        cache = cache_kwarg(model, DynamicCache(config=model.config))
        out = model(inputs_embeds=embed[ids], attention_mask=mask, output_hidden_states=True, use_cache=True, **cache)
        states = []
        for _ in range(steps):
            probs = torch.softmax(out.logits[:, -1].float(), dim=-1).to(embed.dtype)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            out = model(
                inputs_embeds=(probs @ embed)[:, None],
                attention_mask=mask,
                output_hidden_states=True,
                use_cache=True,
                **cache,
            )
            states.append(out.hidden_states[-1][:, -1])
        if steps == 0:
            hidden = out.hidden_states[-1]
            pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        else:
            pooled = torch.stack(states).mean(0)
        torch.nn.functional.normalize(pooled.float(), dim=-1).cpu()
    _sync(device)
    return time.perf_counter() - start


def drift(worker: EmbeddingWorker, cases, loaded_vectors: np.ndarray, sample: int = 12) -> tuple[float, float]:
    """Cosine of each sampled input's vector under load vs embedded alone."""
    cosines = []
    for index in range(0, len(cases), max(1, len(cases) // sample)):
        ids, k = cases[index]
        alone = worker.engine.submit([Input(ids, k)])[0].result().vector
        cosines.append(float(np.dot(alone, loaded_vectors[index])))
    cos = np.array(cosines)
    return float(cos.min()), float(np.mean(1 - cos))


def bench_dtype(dtype: str, args, variants: tuple[str, ...] = ("fast",)) -> list[Row]:
    workers: dict[str, EmbeddingWorker] = {}
    flop_model = None
    for variant in variants:
        spec = load_spec(args.model, dtype=dtype, device=args.device, **VARIANTS[variant])
        # Nothing computes on this thread, so the engine thread's OpenMP pool is the only one (with two variants
        # two engine threads hold pools, and both run as throttled as the worker once did: compare ratios only).
        loaded = in_a_thread_of_its_own(load_model, spec)
        flop_model = flop_model or FlopModel.of(loaded)
        limits = EngineLimits(max_running_seqs=args.concurrency, max_batch_tokens=args.batch_tokens)
        workers[variant] = EmbeddingWorker(loaded, limits)
        workers[variant].engine.start()
    # Its own copy, packed as the worker packs it: the worker's runner fused the served model's q, k and v into one
    # GEMM, which the model's own forward then runs whole for each of the three (`runners.fast.FusedPart`).
    lockstep_model = in_a_thread_of_its_own(packed_copy, workers[variants[0]].loaded.spec)
    rng = np.random.default_rng(1)
    prompts = make_prompts(lockstep_model.tokenizer, args.requests)
    mean_prompt = float(np.mean([len(p) for p in prompts]))
    ceiling = in_a_thread_of_its_own(gemm_flops, lockstep_model.dtype, lockstep_model.device)
    loads = {"K=0": [0] * args.requests, "K=5": [5] * args.requests, "K=20": [20] * args.requests}
    loads["mixed"] = rng.choice(MIXED_K, args.requests).tolist()
    rows = []
    try:
        for worker in workers.values():
            run_engine(worker, [(p, 1) for p in prompts[:16]], 16)  # warm-up
        for name, ks in loads.items():
            cases = list(zip(prompts, ks, strict=True))
            flops = sum(flop_model.per_embedding(len(p), k) for p, k in cases) / len(cases)
            limit = ceiling / flops
            engine_s: dict[str, float] = {}
            vectors: dict[str, np.ndarray] = {}
            for _ in range(args.rounds):  # alternating rounds, each variant's best: load spikes hit both alike
                for variant, worker in workers.items():
                    seconds, vectors[variant] = run_engine(worker, cases, args.concurrency)
                    engine_s[variant] = min(seconds, engine_s.get(variant, seconds))
            for variant, worker in workers.items():
                min_cos, mean_gap = drift(worker, cases, vectors[variant])
                rows.append(
                    Row(
                        dtype=dtype,
                        load=name,
                        system="engine" if len(workers) == 1 else f"engine-{variant}",
                        embeddings_per_s=len(cases) / engine_s[variant],
                        seconds=engine_s[variant],
                        flop_limited_per_s=limit,
                        fraction_of_flop_limit=len(cases) / engine_s[variant] / limit,
                        drift_min_cos=min_cos,
                        drift_mean_1mcos=mean_gap,
                    )
                )
            rates = ", ".join(f"{v} {len(cases) / t:.2f}/s" for v, t in engine_s.items())
            if args.lockstep:
                lock_s = in_a_thread_of_its_own(run_lockstep, lockstep_model, cases)
                for row in rows[-len(workers) :]:
                    row.speedup_vs_lockstep = lock_s / row.seconds
                rows.append(
                    Row(dtype, name, "lockstep-8", len(cases) / lock_s, lock_s, limit, len(cases) / lock_s / limit)
                )
                rates += f", lock-step {len(cases) / lock_s:.2f}/s"
            print(f"  {dtype} {name}: engine {rates}", flush=True)
        # The ceiling again after the loads, the larger counting: a busy moment must not lower the limit.
        final = in_a_thread_of_its_own(gemm_flops, lockstep_model.dtype, lockstep_model.device)
        if final > ceiling:
            for row in rows:
                row.flop_limited_per_s *= final / ceiling
                row.fraction_of_flop_limit *= ceiling / final
            ceiling = final
    finally:
        for worker in workers.values():
            worker.stop()
    print(f"  {dtype}: GEMM ceiling {ceiling / 1e9:.1f} GFLOP/s, mean prompt {mean_prompt:.1f} tokens")
    return rows


def plot(rows: list[Row], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dtypes = sorted({r.dtype for r in rows})
    fig, axes = plt.subplots(1, len(dtypes), figsize=(6 * len(dtypes), 4), squeeze=False)
    for ax, dtype in zip(axes[0], dtypes, strict=True):
        mine = [r for r in rows if r.dtype == dtype]
        loads = list(dict.fromkeys(r.load for r in mine))
        x = np.arange(len(loads))
        systems = list(dict.fromkeys(r.system for r in mine))
        width = 0.8 / len(systems)
        for i, system in enumerate(systems):
            values = [next(r.embeddings_per_s for r in mine if r.load == ld and r.system == system) for ld in loads]
            ax.bar(x + (i - (len(systems) - 1) / 2) * width, values, width, label=system)
        limits = [next(r.flop_limited_per_s for r in mine if r.load == ld) for ld in loads]
        ax.plot(x, limits, "k_", markersize=30, label="FLOP limit")
        ax.set_xticks(x, loads)
        ax.set_yscale("log")
        ax.set_ylabel("embeddings / s")
        ax.set_title(f"{dtype}")
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-gircse")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--requests", type=int, default=128)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--batch-tokens", type=int, default=4096)
    parser.add_argument("--variants", nargs="+", default=["fast"], choices=sorted(VARIANTS))
    parser.add_argument("--rounds", type=int, default=1, help="engine runs per load and variant (the best counts)")
    parser.add_argument("--no-lockstep", dest="lockstep", action="store_false", help="engine rows only")
    parser.add_argument("--tag", default=None, help="name of the result files (default: the device)")
    args = parser.parse_args()
    machine = _machine(args.device)
    print(f"machine: {machine}")
    rows = [row for dtype in args.dtypes for row in bench_dtype(dtype, args, tuple(args.variants))]
    print(
        f"{'dtype':9} {'load':6} {'system':12} {'emb/s':>8} {'FLOP-lim':>9} {'%limit':>7} {'speedup':>8} "
        f"{'drift min cos':>14}"
    )
    for r in rows:
        speed = f"{r.speedup_vs_lockstep:.2f}x" if r.speedup_vs_lockstep else ""
        cos = f"{r.drift_min_cos:.6f}" if r.drift_min_cos is not None else ""
        print(
            f"{r.dtype:9} {r.load:6} {r.system:12} {r.embeddings_per_s:8.2f} {r.flop_limited_per_s:9.2f} "
            f"{100 * r.fraction_of_flop_limit:6.1f}% {speed:>8} {cos:>14}"
        )
    if len(args.variants) > 1:
        base = args.variants[-1]
        for r in rows:
            if r.system.startswith("engine-") and r.system != f"engine-{base}":
                ref = next(b for b in rows if (b.dtype, b.load, b.system) == (r.dtype, r.load, f"engine-{base}"))
                print(
                    f"{r.dtype:9} {r.load:6} {r.system} / engine-{base}: {r.seconds and ref.seconds / r.seconds:.2f}x"
                )
    RESULTS.mkdir(exist_ok=True)
    tag = args.tag or args.device
    payload = {
        "machine": machine,
        "args": {k: str(v) for k, v in vars(args).items()},
        "rows": [asdict(r) for r in rows],
    }
    (RESULTS / f"engine-{tag}.json").write_text(json.dumps(payload, indent=2))
    plot(rows, RESULTS / f"engine-{tag}.png", f"genembed engine vs lock-step, {machine}")
    print(f"wrote {RESULTS / f'engine-{tag}.json'} and .png")


def _machine(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    return f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores (torch {torch.__version__})"


if __name__ == "__main__":
    main()
