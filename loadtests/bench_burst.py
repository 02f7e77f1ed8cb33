"""An idle burst at overload, through a real gateway and worker: what CI's overload test does, measured per variant.

    python loadtests/bench_burst.py --variant ingress_nice=0 --variant ingress_nice=10 --out loadtests/results/x.json
    git worktree add /tmp/before c6672b4
    taskset -c 0 python loadtests/bench_burst.py --variant tree=/tmp/before --variant ingress_nice=10

`calls` requests of `inputs` MiniLM inputs each arrive at once, after `idle_s` of quiet, at a gateway whose request
timeout is `deadline_s` (as tests/test_gateway_resilience.py sends them). A variant is worker settings
(`name=value` for `GENEMBED_WORKER_NAME`) and optionally `tree=PATH`, a checkout whose worker runs instead (another
revision, for a before/after). Each variant has its own worker and gateway; rounds alternate between variants.
`taskset -c 0` in front puts client, gateway and worker on one CPU: a slower, busier machine than this one.

Per variant: answers by status (a 504 is an accepted call answered past its deadline: there should be none), the
slowest 200 against the deadline, and how fast a 429 comes back (median and slowest).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from harness.procs import worker_process  # noqa: E402
from loadtests.bench_gateway import load_average, machine  # noqa: E402
from tests.gateway_fixtures import gateway_process  # noqa: E402


@dataclass
class Variant:
    name: str
    env: dict[str, str]
    tree: Path
    statuses: Counter = field(default_factory=Counter)
    slowest_ok_s: list[float] = field(default_factory=list)  # per round
    refusal_s: list[float] = field(default_factory=list)  # every 429's latency

    @classmethod
    def parse(cls, text: str) -> Variant:
        pairs = dict(part.split("=", 1) for part in text.split(",") if part)
        tree = Path(pairs.pop("tree", REPO))
        env = {f"GENEMBED_WORKER_{k.upper()}": v for k, v in pairs.items()}
        return cls(text, env, tree)

    def row(self, deadline_s: float) -> dict[str, object]:
        refusals = sorted(self.refusal_s)
        return {
            "variant": self.name,
            "200": self.statuses[200],
            "429": self.statuses[429],
            "504": self.statuses[504],
            "other": sum(n for s, n in self.statuses.items() if s not in (200, 429, 504)),
            "slowest 200 / deadline": round(max(self.slowest_ok_s, default=0.0) / deadline_s, 3),
            "429 median s": round(statistics.median(refusals), 3) if refusals else None,
            "429 slowest s": round(refusals[-1], 3) if refusals else None,
        }


async def burst(url: str, calls: int, inputs: int, salt: int) -> list[tuple[int, float]]:
    bodies = [
        {"model": "minilm-l6", "input": [f"request {salt}-{r} sentence {i} about load shedding" for i in range(inputs)]}
        for r in range(calls)
    ]
    limits = httpx.Limits(max_connections=calls + 20)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:

        async def one(body: dict) -> tuple[int, float]:
            started = time.monotonic()
            response = await client.post("/v1/embeddings", json=body)
            return response.status_code, time.monotonic() - started

        return await asyncio.gather(*(one(b) for b in bodies))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", action="append", required=True, help="name=value,... (tree=PATH: that checkout)")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--calls", type=int, default=80)
    parser.add_argument("--inputs", type=int, default=64)
    parser.add_argument("--deadline-s", type=float, default=5.0)
    parser.add_argument("--idle-s", type=float, default=3.0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    variants = [Variant.parse(v) for v in args.variant]
    started, load_before = time.strftime("%Y-%m-%d %H:%M:%S"), load_average()
    gateway_env = {"GENEMBED_REQUEST_TIMEOUT_S": str(args.deadline_s), "GENEMBED_CACHE_MAX_MB": "0"}
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        urls = []
        for v in variants:
            worker, _ = stack.enter_context(worker_process("minilm-l6", Path(tmp), env=v.env, tree=v.tree))
            url, _ = stack.enter_context(gateway_process(Path(tmp), {"minilm-l6": worker}, gateway_env))
            urls.append(url)
        for r in range(args.rounds):
            for v, url in zip(variants, urls, strict=True):
                time.sleep(args.idle_s)
                answers = asyncio.run(burst(url, args.calls, args.inputs, r))
                v.statuses.update(s for s, _ in answers)
                v.slowest_ok_s.append(max((t for s, t in answers if s == 200), default=0.0))
                v.refusal_s.extend(t for s, t in answers if s == 429)
                print(f"round {r} {v.name}: {dict(Counter(s for s, _ in answers))}", flush=True)
    rows = [v.row(args.deadline_s) for v in variants]
    header = list(rows[0])
    print(" | ".join(header))
    for row in rows:
        print(" | ".join(str(row[h]) for h in header))
    if args.out:
        report = {
            "started": started,
            "machine": machine() | {"cpus_allowed": sorted(os.sched_getaffinity(0))},  # taskset shows here
            "load_average": {"before": load_before, "after": load_average()},
            "settings": {k: v for k, v in vars(args).items() if k not in ("out", "variant")},
            "rows": rows,
            "per_round_slowest_200_s": {v.name: [round(x, 3) for x in v.slowest_ok_s] for v in variants},
            "variants": {v.name: {"env": v.env, "tree": str(v.tree)} for v in variants},
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
