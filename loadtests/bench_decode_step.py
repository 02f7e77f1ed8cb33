"""One decode step and its projections, eager against the engine's fast path (by hand, not in CI).

    python loadtests/bench_decode_step.py                                  # CPU: fp32 and bf16, default model
    python loadtests/bench_decode_step.py --device cuda --dtypes bfloat16  # a GPU: eager vs CUDA graphs

1. projections (CPU): each of the model's linear shapes (q, k/v, o, gate/up, down, the LM head) and gircse's
   soft-token mix `probs @ E` at decode's row counts, eager (`F.linear`, the matmul) against the weight packed
   once for oneDNN (`model_server.runners.packed.PackedLinear`) and for genembed's own GEMM (`cpu_kernels.linear`,
   which packed projections use where torch runs at AVX2; where the kernels build); best of `--repeats` rounds,
   the variants alternating.
2. the decode step: the runner's `forward` for `rows` running sequences of `--context` cached positions each,
   built through the serving path (`build_method`) per variant: CPU `eager` vs `packed` projections (oneDNN's;
   both with torch's ops around them) vs `kernels` (packed, decode attention, RMSNorm and rotary in
   `runners/cpu_kernels`, and its GEMM where torch runs at AVX2: the default), CUDA `eager` vs `graphs` (replayed
   from CUDA graphs). Median step time over `--steps` steps after a warm-up, the
   variants alternating twice per batch size (each one's best counts).
Prints a table and writes JSON (results/decode-step-<tag>.json).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from loadtests.bench_engine import _machine, _sync  # noqa: E402
from model_server.loading import load_model  # noqa: E402
from model_server.methods import build_method  # noqa: E402
from model_server.runners import Prefill  # noqa: E402
from model_server.runners.cpu_kernels import cpu_kernels  # noqa: E402
from model_server.runners.packed import PackedLinear  # noqa: E402
from model_server.specs import load_spec  # noqa: E402

RESULTS = Path(__file__).parent / "results"
#: spec overrides of the step variants per device type: the fallback first
STEP_VARIANTS: dict[str, dict[str, dict[str, object]]] = {
    "cpu": {
        "eager": {"linear": "eager", "kernels": "torch"},
        "packed": {"linear": "packed", "kernels": "torch"},
        # and decode attention, RMSNorm and rotary in runners/cpu_kernels (and its GEMM where torch runs at AVX2)
        "kernels": {"linear": "packed"},
    },
    "cuda": {"eager": {"cuda_graphs": False}, "graphs": {"cuda_graphs": True}},
}


@dataclass
class LinearRow:
    dtype: str
    name: str
    in_features: int
    out_features: int
    rows: int
    eager_us: float
    packed_us: float  # oneDNN's
    speedup: float  # eager ÷ oneDNN's
    own_us: float | None = None  # genembed's GEMM, where the kernels build


@dataclass
class StepRow:
    dtype: str
    variant: str
    rows: int
    context: int
    step_ms: float
    tokens_per_s: float
    speedup_vs_eager: float | None = None


def _best_us(fn, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def projections(model: torch.nn.Module) -> dict[str, tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]]:
    """The distinct products of a decode step: name -> (the weight [out, in] that gets packed, the eager call).
    A decoder layer's linear shapes, the LM head, and gircse's soft-token mix `probs @ E`."""
    layer = model.get_decoder().layers[0]
    named = {
        "q_proj": layer.self_attn.q_proj,
        "k_proj/v_proj": layer.self_attn.k_proj,
        "o_proj": layer.self_attn.o_proj,
        "gate_proj/up_proj": layer.mlp.gate_proj,
        "down_proj": layer.mlp.down_proj,
        "lm_head": model.get_output_embeddings(),
    }
    out = {name: (m.weight, m) for name, m in named.items() if type(m) is torch.nn.Linear}
    embedding = model.get_input_embeddings().weight
    out["probs @ E"] = (embedding.t().contiguous(), lambda probs: probs @ embedding)
    return out


@torch.inference_mode()
def bench_linears(model_name: str, dtype: str, rows_list: list[int], repeats: int) -> list[LinearRow]:
    loaded = load_model(load_spec(model_name, dtype=dtype, device="cpu", linear="eager"))
    kernels = cpu_kernels()
    out = []
    for name, (weight, eager_call) in projections(loaded.model).items():
        calls_of = {"eager": eager_call, "packed": PackedLinear(weight)}
        if kernels is not None:
            calls_of["own"] = PackedLinear(weight, gemm=kernels)
        n_out, n_in = weight.shape
        calls = 3 if max(n_out, n_in) > 10_000 else 30
        for rows in rows_list:
            x = torch.randn(rows, n_in, dtype=loaded.dtype)
            times: dict[str, list[float]] = {variant: [] for variant in calls_of}
            for _ in range(repeats):
                for variant, call in calls_of.items():
                    times[variant].append(_best_us(lambda x=x, f=call: f(x), calls))
            best = {variant: min(values) for variant, values in times.items()}
            eager, fast, own = best["eager"], best["packed"], best.get("own")
            out.append(LinearRow(dtype, name, n_in, n_out, rows, eager, fast, eager / fast, own))
            mine = "" if own is None else f", genembed's {own:9.1f} µs"
            print(f"  {dtype} {name:18} {rows:3} rows: eager {eager:9.1f} µs, oneDNN {fast:9.1f} µs{mine}", flush=True)
    return out


@torch.inference_mode()
def time_steps(runner, embeddings: torch.nn.Module, rows: int, context: int, steps: int) -> float:
    """Median ms of a decode step of `rows` sequences holding `context` positions (random token prompts)."""
    device = embeddings.weight.device
    generator = torch.Generator().manual_seed(rows)
    vocab = embeddings.weight.shape[0]
    runner.clear()
    prompts = [embeddings(torch.randint(vocab, (context,), generator=generator).to(device)) for _ in range(rows)]
    runner.forward(None, [Prefill(i, p, context + steps + 8) for i, p in enumerate(prompts)])
    inputs = embeddings(torch.randint(vocab, (rows,), generator=generator).to(device))
    for _ in range(3):  # warm-up (a graph is captured here)
        runner.forward(inputs, [])
    times = []
    for _ in range(steps):
        _sync(device)
        start = time.perf_counter()
        runner.forward(inputs, [])
        _sync(device)
        times.append(time.perf_counter() - start)
    runner.clear()
    return statistics.median(times) * 1e3


def bench_steps(
    model_name: str, device: str, dtype: str, rows_list: list[int], context: int, steps: int, rounds: int = 2
) -> list[StepRow]:
    """The decode step per variant (the device type's `STEP_VARIANTS`), each on its own model copy, the variants
    alternating `rounds` times per batch size (each one's best round counts)."""
    variants = STEP_VARIANTS["cuda" if device.startswith("cuda") else "cpu"]
    methods = {}
    for variant, overrides in variants.items():
        loaded = load_model(load_spec(model_name, dtype=dtype, device=device, **overrides))
        methods[variant] = build_method(loaded, max(rows_list))
    out: list[StepRow] = []
    for rows in rows_list:
        best: dict[str, float] = {}
        for _ in range(rounds):
            for variant, method in methods.items():
                ms = time_steps(method.runner, method.embeddings, rows, context, steps)
                best[variant] = min(ms, best.get(variant, ms))
        for variant, ms in best.items():
            out.append(StepRow(dtype, variant, rows, context, ms, rows / ms * 1e3, best["eager"] / ms))
            print(f"  {dtype} {variant:7} {rows:3} rows: {ms:8.2f} ms/step", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-gircse")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--context", type=int, default=64, help="cached positions per sequence")
    parser.add_argument("--steps", type=int, default=20, help="timed decode steps per batch size")
    parser.add_argument("--repeats", type=int, default=5, help="alternating rounds per projection shape")
    parser.add_argument("--threads", type=int, default=None, help="torch's CPU threads (default: its own choice)")
    parser.add_argument("--tag", default=None, help="name of the result file (default: the device)")
    parser.add_argument("--skip-linears", action="store_true", help="the decode steps only")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    machine = f"{_machine(args.device)}, {torch.get_num_threads()} torch threads"
    print(f"machine: {machine}")
    linears: list[LinearRow] = []
    step_rows: list[StepRow] = []
    for dtype in args.dtypes:
        if not args.device.startswith("cuda") and not args.skip_linears:
            linears += bench_linears(args.model, dtype, args.rows, args.repeats)
        step_rows += bench_steps(args.model, args.device, dtype, args.rows, args.context, args.steps)
    if linears:
        print(
            f"\n{'dtype':9} {'projection':18} {'in→out':>12} {'rows':>4} {'eager µs':>10} {'oneDNN µs':>10} {'x':>6} "
            f"{'genembed µs':>11} {'÷ oneDNN':>8}"
        )
        for r in linears:
            shape = f"{r.in_features}→{r.out_features}"
            print(
                f"{r.dtype:9} {r.name:18} {shape:>12} {r.rows:4} {r.eager_us:10.1f} {r.packed_us:10.1f} "
                f"{r.speedup:5.2f}x " + ("" if r.own_us is None else f"{r.own_us:11.1f} {r.packed_us / r.own_us:7.2f}x")
            )
    print(f"\n{'dtype':9} {'variant':8} {'rows':>4} {'ms/step':>8} {'tokens/s':>9} {'vs eager':>9}")
    for r in step_rows:
        print(f"{r.dtype:9} {r.variant:8} {r.rows:4} {r.step_ms:8.2f} {r.tokens_per_s:9.1f} {r.speedup_vs_eager:8.2f}x")
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"decode-step-{args.tag or args.device}.json"
    payload = {
        "machine": machine,
        "args": {k: str(v) for k, v in vars(args).items()},
        "projections": [asdict(r) for r in linears],
        "steps": [asdict(r) for r in step_rows],
    }
    path.write_text(json.dumps(payload, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
