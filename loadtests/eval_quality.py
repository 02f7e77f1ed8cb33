"""The test-time-scaling curve of every served model (by hand, not CI): quality and latency against K.

    genembed serve --model smollm2-gircse --model minilm-l6 &
    python loadtests/eval_quality.py --url http://127.0.0.1:8000                      # every served model, full data
    python loadtests/eval_quality.py --models minilm-l6,smollm2-gircse --limit 20 --tag quick

For each model (default: all that GET /v1/models lists) and each K in --ks (default 0, 1, 2, 3, 5, 10, 20, auto),
through `evaluation.mteb_model.GenembedEncoder` and mteb's own evaluators on the offline Lee tasks
(`evaluation/tasks.py`):
- LeeSTS: cosine Spearman ρ of the 50 articles' pairs against the human ratings (articles embedded as documents);
- Lee known-item retrieval: nDCG@10 and MRR@10 of each background article's first sentence among the rests;
- latency: p50 / mean of single-query requests (a nonce in front of each Lee query, so the cache never answers),
  and the wall time of the two tasks (the gateway's cache answers texts an earlier run embedded at that K);
- `auto`: `refinement_steps: "auto"` (with --tolerance, else the gateway's default); the steps each input ran are
  averaged. A K outside the model's range (`/v1/models`) is n/a, as is `auto` where the gateway refuses it.
Queries and documents take the same K. Writes results/quality-<tag>.json after every row, then the PNG.
Large K on a small CPU: keep --batch-size x --concurrency small or raise the gateway's GENEMBED_REQUEST_TIMEOUT_S,
or requests end in 504 (that row is then reported as failed and the sweep goes on).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import mteb

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evaluation.lee import lee_known_items
from evaluation.mteb_model import GenembedEncoder, RefinementSteps
from evaluation.tasks import LeeKnownItemRetrieval, LeeSTS

RESULTS = Path(__file__).parent / "results"
KS: tuple[RefinementSteps, ...] = (0, 1, 2, 3, 5, 10, 20, "auto")


@dataclass
class Row:
    model: str
    k: RefinementSteps
    status: str  # "ok", or why it is n/a
    lee_sts: float | None = None
    ndcg10: float | None = None
    mrr10: float | None = None
    mean_steps_ran: float | None = None  # auto: what the inputs actually ran
    query_p50_ms: float | None = None
    query_mean_ms: float | None = None
    tasks_s: float | None = None


def query_latency(model: GenembedEncoder, samples: int) -> list[float]:
    """Milliseconds of single-query requests the cache cannot answer."""
    nonce = uuid.uuid4().hex[:8]
    queries = lee_known_items()[0][:samples]
    out = []
    for i, query in enumerate(queries):
        started = time.perf_counter()
        model.embed([f"[{nonce}-{i}] {query}"], "query")
        out.append((time.perf_counter() - started) * 1000)
    return out


def measure(args: argparse.Namespace, name: str, k: RefinementSteps) -> Row:
    tolerance = args.tolerance if k == "auto" else None
    model = GenembedEncoder(
        name,
        base_url=args.url,
        api_key=args.api_key,
        refinement_steps=k,
        refinement_tolerance=tolerance,
        batch_size=args.batch_size,
        concurrency=args.concurrency,
    )
    try:
        try:
            latencies = query_latency(model, args.latency_samples)
        except RuntimeError as exc:  # the gateway refused this K (e.g. auto before it exists, or for this method)
            return Row(name, k, f"n/a: {str(exc)[:200]}")
        model.steps_ran.clear()
        limit = args.limit or None
        started = time.perf_counter()
        try:
            result = mteb.evaluate(
                model, [LeeSTS(limit=limit), LeeKnownItemRetrieval(limit=limit)], cache=None, show_progress_bar=False
            )
        except RuntimeError as exc:  # e.g. a 504: the rest of the sweep still runs
            return Row(name, k, f"failed: {str(exc)[:200]}", query_p50_ms=statistics.median(latencies))
        elapsed = time.perf_counter() - started
        scores = {r.task_name: r.scores["test"][0] for r in result.task_results}
        return Row(
            name,
            k,
            "ok",
            lee_sts=scores["LeeSTS"]["cosine_spearman"],
            ndcg10=scores["LeeKnownItemRetrieval"]["ndcg_at_10"],
            mrr10=scores["LeeKnownItemRetrieval"]["mrr_at_10"],
            mean_steps_ran=statistics.fmean(model.steps_ran) if model.steps_ran else None,
            query_p50_ms=statistics.median(latencies),
            query_mean_ms=statistics.fmean(latencies),
            tasks_s=elapsed,
        )
    finally:
        model.close()


def fmt(value: float | None, spec: str = ".3f") -> str:
    return "n/a" if value is None else format(value, spec)


def markdown(rows: list[Row]) -> str:
    lines = [
        "| model | K | LeeSTS ρ | Lee nDCG@10 | Lee MRR@10 | steps ran | query p50 ms | query mean ms | tasks s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.model} | {r.k} | {fmt(r.lee_sts)} | {fmt(r.ndcg10)} | {fmt(r.mrr10)} "
            f"| {fmt(r.mean_steps_ran, '.2f')} | {fmt(r.query_p50_ms, '.1f')} | {fmt(r.query_mean_ms, '.1f')} "
            f"| {fmt(r.tasks_s, '.0f')} |"
        )
    notes = [f"- {r.model} K={r.k}: {r.status}" for r in rows if r.status != "ok"]
    return "\n".join(lines + (["", *notes] if notes else [])) + "\n"


def plot(rows: list[Row], path: Path) -> None:
    """Each metric against K, one line per model; `auto` is a star at the mean steps it ran."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("lee_sts", "LeeSTS Spearman ρ"),
        ("ndcg10", "Lee known-item nDCG@10"),
        ("mrr10", "Lee known-item MRR@10"),
        ("query_p50_ms", "one query, p50 ms"),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8))
    for ax, (metric, title) in zip(axes, panels, strict=True):
        for i, model in enumerate(dict.fromkeys(r.model for r in rows)):
            color = f"C{i}"
            fixed = [(r.k, getattr(r, metric)) for r in rows if r.model == model and r.status == "ok" and r.k != "auto"]
            if len(fixed) == 1:  # a single-K model (pooled): a reference line
                ax.axhline(fixed[0][1], color=color, ls=":", lw=1.2, label=f"{model} (K={fixed[0][0]})")
            elif fixed:
                ax.plot(*zip(*fixed, strict=True), color=color, marker="o", ms=4, label=model)
            for r in rows:
                if r.model == model and r.k == "auto" and r.status == "ok" and r.mean_steps_ran is not None:
                    ax.plot(r.mean_steps_ran, getattr(r, metric), color=color, marker="*", ms=12, ls="none")
        ax.set_xlabel("K (refinement steps; ★ auto at the mean steps it ran)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def served_models(args: argparse.Namespace) -> dict[str, dict]:
    headers = {"authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    cards = httpx.get(f"{args.url}/v1/models", headers=headers, timeout=30).raise_for_status().json()["data"]
    by_id = {c["id"]: c for c in cards}
    names = [m.strip() for m in args.models.split(",")] if args.models else list(by_id)
    missing = [m for m in names if m not in by_id]
    if missing:
        raise SystemExit(f"not served by {args.url}: {missing} (served: {sorted(by_id)})")
    return {m: by_id[m] for m in names}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the gateway")
    parser.add_argument("--models", help="comma-separated (default: every model the gateway serves)")
    parser.add_argument("--api-key", default=os.environ.get("GENEMBED_API_KEY"))
    parser.add_argument("--ks", default=",".join(map(str, KS)), help="integers and/or auto")
    parser.add_argument("--tolerance", type=float, help="refinement_tolerance for auto (default: the gateway's)")
    parser.add_argument("--limit", type=int, default=0, help="first N Lee articles per task (0: all)")
    parser.add_argument("--latency-samples", type=int, default=10, help="single queries timed per K")
    parser.add_argument("--batch-size", type=int, default=8, help="inputs per request")
    parser.add_argument("--concurrency", type=int, default=2, help="requests in flight")
    parser.add_argument("--tag", default="cpu", help="results/quality-<tag>.{json,md,png}")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    ks: list[RefinementSteps] = [k if k == "auto" else int(k) for k in args.ks.split(",")]

    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"quality-{args.tag}"
    report: dict = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpus": os.cpu_count(),
            "loadavg_start": os.getloadavg(),
            "python": sys.version,
            "mteb": mteb.__version__,
        },
        "args": {k: str(v) for k, v in vars(args).items() if k != "api_key"},
        "models": {},
        "rows": [],
    }
    rows: list[Row] = []
    for name, card in served_models(args).items():
        report["models"][name] = card
        low, high = card.get("min_refinement_steps"), card.get("max_refinement_steps")
        for k in ks:
            if k != "auto" and low is not None and high is not None and not low <= k <= high:
                rows.append(Row(name, k, f"n/a: the model accepts K in {low}..{high}"))
            else:
                rows.append(measure(args, name, k))
            r = rows[-1]
            measured = (
                f"LeeSTS {fmt(r.lee_sts)}, nDCG@10 {fmt(r.ndcg10)}, MRR@10 {fmt(r.mrr10)}, "
                f"query p50 {fmt(r.query_p50_ms, '.1f')} ms, tasks {fmt(r.tasks_s, '.0f')} s"
            )
            print(f"{name} K={k}: {measured if r.status == 'ok' else r.status}", flush=True)
            report["rows"] = [asdict(x) for x in rows]
            stem.with_suffix(".json").write_text(json.dumps(report, indent=2))
    report["machine"]["loadavg_end"] = os.getloadavg()
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2))
    table = markdown(rows)
    stem.with_suffix(".md").write_text(table)
    plot(rows, stem.with_suffix(".png"))
    print(table)


if __name__ == "__main__":
    main()
