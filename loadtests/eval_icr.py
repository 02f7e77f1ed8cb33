"""Quality of an ICR-trained gircse adapter against its untrained backbone and the baselines (by hand, not CI).

    python loadtests/eval_icr.py --adapter runs/icr/adapter --debian data/debian/heldout.jsonl
    python loadtests/eval_icr.py --debian data/debian/heldout.jsonl     # the adapter smollm2-gircse names
    python loadtests/eval_icr.py --ks 1,5 --limit 100 --tag quick         # a quick look

For each K in --ks (default 0, 1, 2, 3, 5, 10, 20):
- LeeSTS: Spearman ρ between the cosine of each pair of the 50 Lee articles (embedded as documents) and
  the human similarity ratings of the 1,225 pairs;
- Lee known-item retrieval: MRR@10 / nDCG@10 of each background article's first sentence (a query) among
  all the articles' rests (documents), one relevant each;
- held-out Debian pairs (`python -m model_server.training.data`): MRR@10 of each synopsis (query) among the
  held-out descriptions (documents).
Systems: the trained adapter, the untrained backbone (its K = 0 is plain mean pooling, reported as its own
system) and all-MiniLM-L6-v2. Queries and documents take the same K, as in GIRCSE. Every vector comes from
the engine in-process (EmbeddingWorker): what the service would serve. Writes results/icr-<tag>.{json,md,png},
the JSON after every row, so an interrupted run keeps what it measured.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.protocol import EmbedItem, EmbedRequest
from evaluation.lee import lee_known_items, lee_sts, mrr10, ndcg10, ranks_of_the_right_document
from model_server.engine import EngineLimits
from model_server.serving import EmbeddingWorker
from model_server.specs import ModelSpec, load_spec
from model_server.training.data import read_jsonl

RESULTS = Path(__file__).parent / "results"
KS = (0, 1, 2, 3, 5, 10, 20)
TARGET_K = 5
TARGETS = {"lee_sts": 0.60, "lee_mrr10": 0.50}  # issue 10, at K = 5
REQUEST_ITEMS = 256  # items per engine request: under the worker's waiting-queue bound


@dataclass
class Row:
    system: str
    k: int
    lee_sts: float
    lee_mrr10: float
    lee_ndcg10: float
    debian_mrr10: float | None
    seconds: float


@dataclass
class Tasks:
    sts_texts: list[str]
    sts_ratings: np.ndarray
    lee_queries: list[str]
    lee_documents: list[str]
    debian_queries: list[str]
    debian_documents: list[str]


def load_tasks(debian: Path | None, limit: int) -> Tasks:
    texts, ratings = lee_sts()
    queries, documents = lee_known_items()
    rows = read_jsonl(debian)[:limit] if debian else []
    if limit:
        queries, documents = queries[:limit], documents[:limit]
    return Tasks(texts, ratings, queries, documents, [r["query"] for r in rows], [r["document"] for r in rows])


def embed(worker: EmbeddingWorker, texts: list[str], input_type: str, k: int) -> np.ndarray:
    out = []
    for start in range(0, len(texts), REQUEST_ITEMS):
        items = [EmbedItem(text=t, input_type=input_type, steps=k) for t in texts[start : start + REQUEST_ITEMS]]  # type: ignore[arg-type]
        response = asyncio.run(worker.embed(EmbedRequest(items=items)))
        errors = [r.error.message for r in response.results if r.error]
        if errors:
            raise RuntimeError(f"{len(errors)} items failed, the first: {errors[0]}")
        out.append(response.vectors)
    return np.concatenate(out)


def measure(worker: EmbeddingWorker, system: str, k: int, tasks: Tasks) -> Row:
    from scipy.stats import spearmanr

    started = time.perf_counter()
    sts = embed(worker, tasks.sts_texts, "document", k)
    cosines = (sts @ sts.T)[np.triu_indices(len(sts), 1)]
    lee = ranks_of_the_right_document(
        embed(worker, tasks.lee_queries, "query", k), embed(worker, tasks.lee_documents, "document", k)
    )
    debian = None
    if tasks.debian_queries:
        debian = mrr10(
            ranks_of_the_right_document(
                embed(worker, tasks.debian_queries, "query", k), embed(worker, tasks.debian_documents, "document", k)
            )
        )
    return Row(
        system=system,
        k=k,
        lee_sts=float(spearmanr(cosines, tasks.sts_ratings).statistic),
        lee_mrr10=mrr10(lee),
        lee_ndcg10=ndcg10(lee),
        debian_mrr10=debian,
        seconds=time.perf_counter() - started,
    )


def systems(args: argparse.Namespace) -> list[tuple[str, ModelSpec, tuple[int, ...]]]:
    """(name, spec, the K values it is measured at)."""
    ks = tuple(int(k) for k in args.ks.split(","))
    adapter = {"adapter": str(args.adapter.resolve())} if args.adapter else {}
    trained = load_spec(args.model, dtype=args.dtype, **adapter)
    if not trained.adapter:
        raise SystemExit(f"{args.model} names no adapter: pass --adapter DIR (a `genembed train` output)")
    base = load_spec(args.model, dtype=args.dtype, adapter=None)
    chosen = [
        ("adapter", trained, ks),
        ("untrained backbone", base, tuple(k for k in ks if k > 0)),
        ("mean pooling", base, (0,)),
        ("all-MiniLM-L6-v2", load_spec("minilm-l6"), (0,)),
    ]
    return [s for s in chosen if s[0] in args.systems and s[2]]


def markdown(rows: list[Row]) -> str:
    lines = [
        "| system | K | LeeSTS ρ | Lee MRR@10 | Lee nDCG@10 | Debian MRR@10 | seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        debian = "–" if r.debian_mrr10 is None else f"{r.debian_mrr10:.3f}"
        lines.append(
            f"| {r.system} | {r.k} | {r.lee_sts:.3f} | {r.lee_mrr10:.3f} | {r.lee_ndcg10:.3f} | {debian} | "
            f"{r.seconds:.0f} |"
        )
    by_k = {r.k: r for r in rows if r.system == "adapter"}
    if TARGET_K in by_k:
        at = by_k[TARGET_K]
        lines.append("")
        for metric, target in TARGETS.items():
            value = getattr(at, metric)
            lines.append(
                f"- adapter K={TARGET_K} {metric}: {value:.3f} (target ≥ {target:.2f}: "
                f"{'met' if value >= target else 'missed'})"
            )
        if 1 in by_k and at.debian_mrr10 is not None and by_k[1].debian_mrr10 is not None:
            better = at.debian_mrr10 > by_k[1].debian_mrr10
            lines.append(
                f"- Debian MRR@10 K={TARGET_K} {at.debian_mrr10:.3f} vs K=1 {by_k[1].debian_mrr10:.3f} "
                f"(test-time scaling: {'yes' if better else 'no'})"
            )
    return "\n".join(lines) + "\n"


def plot(rows: list[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [
        ("lee_sts", "LeeSTS Spearman ρ"),
        ("lee_mrr10", "Lee known-item MRR@10"),
        ("lee_ndcg10", "Lee known-item nDCG@10"),
        ("debian_mrr10", "held-out Debian MRR@10"),
    ]
    metrics = [m for m in metrics if any(getattr(r, m[0]) is not None for r in rows)]
    ks = sorted({r.k for r in rows})
    position = {k: i for i, k in enumerate(ks)}
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.8), squeeze=False)
    styles = {
        "adapter": ("#2f6fb0", "-"),
        "untrained backbone": ("#9aa5b1", "-"),
        "mean pooling": ("#7a5195", "--"),
        "all-MiniLM-L6-v2": ("#b03a2f", ":"),
    }
    for ax, (metric, title) in zip(axes[0], metrics, strict=True):
        for system, (color, style) in styles.items():
            points = [(position[r.k], getattr(r, metric)) for r in rows if r.system == system]
            if not points or points[0][1] is None:
                continue
            if len(points) == 1:  # a single-K system: a reference line
                ax.axhline(points[0][1], color=color, ls=style, lw=1.2, label=system)
            else:
                ax.plot(*zip(*points, strict=True), color=color, ls=style, marker="o", ms=4, label=system)
        ax.set_xticks(range(len(ks)), [str(k) for k in ks])
        ax.set_xlabel("K (refinement steps)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-gircse", help="gircse spec the adapter belongs to")
    parser.add_argument("--adapter", type=Path, help="adapter directory (default: the spec's own)")
    parser.add_argument(
        "--debian", type=Path, help="held-out Debian pairs (heldout.jsonl); without it no Debian column"
    )
    parser.add_argument("--limit", type=int, default=500, help="first N Debian pairs and Lee queries (0: all)")
    parser.add_argument("--ks", default=",".join(map(str, KS)))
    parser.add_argument("--systems", default="adapter,untrained backbone,mean pooling,all-MiniLM-L6-v2")
    parser.add_argument("--dtype", default="float32", help="of the SmolLM2 systems (the service's CPU default)")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--tag", default="cpu", help="results/icr-<tag>.{json,md,png}")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    args.systems = [s.strip() for s in args.systems.split(",")]
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    tasks = load_tasks(args.debian, args.limit)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"icr-{args.tag}"
    report = {
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "python": sys.version},
        "args": {k: str(v) for k, v in vars(args).items()},
        "sizes": {
            "sts_texts": len(tasks.sts_texts),
            "lee_queries": len(tasks.lee_queries),
            "debian_pairs": len(tasks.debian_queries),
        },
        "rows": [],
    }
    rows: list[Row] = []
    for name, spec, ks in systems(args):
        worker = EmbeddingWorker.load(spec, EngineLimits())
        try:
            report["revision"] = {**report.get("revision", {}), name: worker.loaded.revision}
            for k in ks:
                rows.append(measure(worker, name, k, tasks))
                r = rows[-1]
                debian = "" if r.debian_mrr10 is None else f", Debian MRR@10 {r.debian_mrr10:.3f}"
                print(
                    f"{name} K={k}: LeeSTS {r.lee_sts:.3f}, Lee MRR@10 {r.lee_mrr10:.3f}, "
                    f"nDCG@10 {r.lee_ndcg10:.3f}{debian} ({r.seconds:.0f} s)",
                    flush=True,
                )
                report["rows"] = [asdict(x) for x in rows]
                stem.with_suffix(".json").write_text(json.dumps(report, indent=2))
        finally:
            worker.stop()
    table = markdown(rows)
    stem.with_suffix(".md").write_text(table)
    plot(rows, stem.with_suffix(".png"))
    print(table)


if __name__ == "__main__":
    main()
