"""genembed's CPU attention kernels alone, this checkout against another one (by hand, not in CI).

    python loadtests/bench_attention.py                                   # this checkout's kernels
    git worktree add /tmp/before HEAD~1
    python loadtests/bench_attention.py --tree /tmp/before --rounds 6     # before/after, alternating processes

Shapes are SmolLM2-135M's (3 kv heads of 3 query heads, head_dim 64), bf16 unless told:
- prefill: 32 prompts of 51 tokens packed end to end (bench_peers' pooled work, 1632 rows), 12 of 128 and 4 of 400;
- decode: 16 rows, each over 64 cached positions (o1's thoughts), and 64 rows over 128.
Each checkout runs in a process of its own (the kernels of both cannot load into one: the same op names), with its
own extension build folder; the processes alternate `--rounds` times and each shape's median call time counts,
the best round per checkout. Prints a table and writes JSON (results/attention-<tag>.json).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"
#: (name, prompt lengths) for prefill; (name, rows, cached positions) for decode
PREFILL = [("prefill 32x51", [51] * 32), ("prefill 12x128", [128] * 12), ("prefill 4x400", [400] * 4)]
DECODE = [("decode 16x64", 16, 64), ("decode 64x128", 64, 128)]
N_KV, GROUP, HEAD_DIM = 3, 3, 64


def measure(dtype_name: str, calls: int) -> dict[str, float]:
    """This process's kernels (those of the checkout on sys.path): each shape's median call time in ms."""
    import torch

    from model_server.runners.cpu_kernels import cpu_kernels

    kernels = cpu_kernels()
    if kernels is None:
        raise SystemExit("genembed's CPU kernels do not build here")
    dtype = getattr(torch, dtype_name)
    generator = torch.Generator().manual_seed(0)
    width = (N_KV * GROUP + 2 * N_KV) * HEAD_DIM  # the fused q/k/v projection's row

    def projected(rows: int):
        """q (contiguous) and k, v (views of the fused projection's rows), as the runner hands them over."""
        qkv = torch.randn(rows, width, generator=generator).to(dtype)
        q = qkv[:, : N_KV * GROUP * HEAD_DIM].reshape(rows, N_KV, GROUP, HEAD_DIM).contiguous()
        k = qkv[:, N_KV * GROUP * HEAD_DIM : (N_KV * GROUP + N_KV) * HEAD_DIM].view(rows, N_KV, HEAD_DIM)
        return q, k, qkv[:, (N_KV * GROUP + N_KV) * HEAD_DIM :].view(rows, N_KV, HEAD_DIM)

    def timed(call) -> float:
        for _ in range(5):
            call()
        times = []
        for _ in range(calls):
            began = time.perf_counter()
            call()
            times.append(time.perf_counter() - began)
        return statistics.median(times) * 1e3

    out = {}
    for name, lengths in PREFILL:
        q, k, v = projected(sum(lengths))
        starts = torch.tensor([0, *itertools.accumulate(lengths)])
        out[name] = timed(lambda q=q, k=k, v=v, s=starts: kernels.prefill_attention(q, k, v, s, HEAD_DIM**-0.5))
    for name, rows, cached in DECODE:
        keys = torch.randn(rows, N_KV, cached + 1, HEAD_DIM, generator=generator).to(dtype)
        values = torch.randn(keys.shape, generator=generator).to(dtype)
        q, k, v = projected(rows)
        positions = torch.full((rows,), cached)
        out[name] = timed(
            lambda q=q, k=k, v=v, kk=keys, vv=values, p=positions: kernels.decode_attention(
                q, k, v, kk, vv, p, HEAD_DIM**-0.5
            )
        )
    return out


def run_tree(tree: Path, dtype: str, calls: int) -> dict[str, float]:
    """`measure` in a process of its own over `tree`'s kernels, built in a folder of their own."""
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(Path(tempfile.gettempdir()) / f"bench-attention-{tree.name}")}
    code = (
        f"import sys, json; sys.path.insert(0, {str(tree)!r}); sys.path.insert(1, {str(REPO)!r}); "
        f"from loadtests.bench_attention import measure; print(json.dumps(measure({dtype!r}, {calls})))"
    )
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=tree, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tree", type=Path, default=None, help="another checkout to compare against (before)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--rounds", type=int, default=4, help="alternations of the checkouts' processes")
    parser.add_argument("--calls", type=int, default=50, help="timed calls per shape and round")
    parser.add_argument("--tag", default="cpu")
    args = parser.parse_args()
    trees = {"this": REPO} | ({"before": args.tree.resolve()} if args.tree else {})
    rounds: dict[str, list[dict[str, float]]] = {name: [] for name in trees}
    load = [round(x, 2) for x in os.getloadavg()]
    for _ in range(args.rounds):
        for name, tree in reversed(trees.items()):  # before first in each round
            rounds[name].append(run_tree(tree, args.dtype, args.calls))
    load.extend(round(x, 2) for x in os.getloadavg())
    shapes = list(rounds["this"][0])
    best = {name: {s: min(r[s] for r in runs) for s in shapes} for name, runs in rounds.items()}
    header = " ".join(f"{name + ' ms':>10}" for name in trees)
    print(f"{'shape':<16} {header}" + ("   this/before" if args.tree else ""))
    for shape in shapes:
        cells = " ".join(f"{best[name][shape]:>10.3f}" for name in trees)
        ratio = f"   {best['this'][shape] / best['before'][shape]:.2f}x time" if args.tree else ""
        print(f"{shape:<16} {cells}{ratio}")
    sys.path.insert(0, str(REPO))  # only here: a checkout's process must import its own model_server
    from loadtests.bench_gateway import machine

    path = RESULTS / f"attention-{args.tag}.json"
    record = {"machine": machine(), "dtype": args.dtype, "load_avg_start_end": load}
    record |= {"trees": {n: str(t) for n, t in trees.items()}, "rounds": rounds, "best_ms": best}
    path.write_text(json.dumps(record, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
