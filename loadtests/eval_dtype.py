"""Whether bf16 may be the CPU default of a generative method (by hand): its outputs against fp32's.

    python loadtests/eval_dtype.py                # o1 greedy thoughts at K = 128, gircse vectors at K = 1, 5, 20

- o1 (smollm2-o1, greedy: thought temperature 0): the thought tokens each dtype writes for the same query, through
  the method's own steps (every query in one batch, as the engine runs them); agreement = identical thoughts,
  plus where the first differing token sits and the cosine of the two `<emb>` vectors.
- gircse (smollm2-gircse): the cosine of each query's bf16 vector to its fp32 vector per K.
Queries: the first sentences of the Lee background articles (gensim's test data). Both dtypes run the worker's
default step kernels (on the CPU: packed projections). Prints a table and writes JSON (results/dtype-<tag>.json).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common.protocol import EmbedItem  # noqa: E402
from evaluation.lee import lee_known_items  # noqa: E402
from loadtests.bench_engine import _machine, run_engine  # noqa: E402
from model_server.engine import EngineLimits  # noqa: E402
from model_server.loading import load_model  # noqa: E402
from model_server.methods import build_method  # noqa: E402
from model_server.sequence import Iteration, Joining, as_input  # noqa: E402
from model_server.serving import EmbeddingWorker  # noqa: E402
from model_server.specs import load_spec  # noqa: E402

RESULTS = Path(__file__).parent / "results"
DTYPES = ("float32", "bfloat16")


@torch.inference_mode()
def o1_thoughts(dtype: str, queries: list[str], steps: int) -> tuple[list[list[int]], np.ndarray]:
    """Greedy thoughts and vectors of `queries`, all in one batch, stepped as the engine steps them."""
    loaded = load_model(load_spec("smollm2-o1", dtype=dtype, device="cpu", thought_temperature=0.0))
    method = build_method(loaded, len(queries))
    items = [method.prompts.prepare(EmbedItem(text=q, input_type="query", steps=steps)) for q in queries]
    iteration = Iteration([], [Joining(i, as_input(p)) for i, p in enumerate(items)])
    thoughts, vectors = {}, {}
    while iteration.decode or iteration.join:  # as the engine steps them: all in one batch until each finishes
        finished = method.step(iteration).finished
        thoughts.update(method.states)  # a thought is forgotten when it finishes: keep it
        vectors.update(finished)
        iteration = Iteration(list(method.states), [])
    return [thoughts[i].tokens for i in range(len(queries))], np.stack([vectors[i].vector for i in range(len(queries))])


def gircse_vectors(dtype: str, queries: list[str], ks: tuple[int, ...]) -> np.ndarray:
    """[len(ks), queries, D] through the engine, 64 in flight."""
    loaded = load_model(load_spec("smollm2-gircse", dtype=dtype, device="cpu"))
    worker = EmbeddingWorker(loaded, EngineLimits(max_running_seqs=64))
    worker.engine.start()
    try:
        prompts = [worker.method.prompts.prepare(EmbedItem(text=q, input_type="query")).token_ids for q in queries]
        _, vectors = run_engine(worker, [(p, k) for k in ks for p in prompts], 64)
    finally:
        worker.stop()
    return vectors.reshape(len(ks), len(queries), -1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries", type=int, default=32)
    parser.add_argument("--steps", type=int, default=128, help="o1: thought tokens at most")
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 5, 20], help="gircse: refinement steps")
    parser.add_argument("--tag", default="cpu")
    args = parser.parse_args()
    queries = lee_known_items()[0][: args.queries]
    machine = _machine("cpu")
    print(f"machine: {machine}; {len(queries)} queries")

    thoughts, o1_vectors = {}, {}
    for dtype in DTYPES:
        thoughts[dtype], o1_vectors[dtype] = o1_thoughts(dtype, queries, args.steps)
    pairs = list(zip(thoughts["float32"], thoughts["bfloat16"], strict=True))
    identical = [a == b for a, b in pairs]
    first_diff = [
        next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))) for a, b in pairs
    ]
    o1_cos = np.sum(o1_vectors["float32"] * o1_vectors["bfloat16"], axis=1)
    o1 = {
        "steps": args.steps,
        "identical_thoughts": int(sum(identical)),
        "queries": len(queries),
        "agreement": float(np.mean(identical)),
        "mean_thought_tokens": {d: float(np.mean([len(t) for t in thoughts[d]])) for d in DTYPES},
        "first_difference_of_differing": [f for f, same in zip(first_diff, identical, strict=True) if not same],
        "vector_cos_min": float(o1_cos.min()),
        "vector_cos_mean": float(o1_cos.mean()),
    }
    print(
        f"o1 K={args.steps} greedy: {o1['identical_thoughts']}/{len(queries)} thoughts identical in bf16 and fp32; "
        f"differing thoughts part at tokens {o1['first_difference_of_differing']}; <emb> cosine min "
        f"{o1['vector_cos_min']:.5f}, mean {o1['vector_cos_mean']:.5f}"
    )

    ks = tuple(args.ks)
    vectors = {dtype: gircse_vectors(dtype, queries, ks) for dtype in DTYPES}
    cos = np.sum(vectors["float32"] * vectors["bfloat16"], axis=2)
    gircse = {
        str(k): {"min_cos": float(row.min()), "mean_cos": float(row.mean())} for k, row in zip(ks, cos, strict=True)
    }
    for k, row in gircse.items():
        print(f"gircse K={k:>2}: bf16 vs fp32 cosine min {row['min_cos']:.6f}, mean {row['mean_cos']:.6f}")

    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"dtype-{args.tag}.json"
    payload = {"machine": machine, "queries": len(queries), "o1": o1, "gircse": gircse}
    path.write_text(json.dumps(payload, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
