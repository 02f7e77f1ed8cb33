"""Threading variants of the worker process, alternated (by hand, not in CI; issue 23).

    python loadtests/bench_threads.py                                  # decode steps of 16 rows, fp32
    python loadtests/bench_threads.py --work engineK5 --variants off auto 1thread
    python loadtests/bench_threads.py --variants off auto passive --busy 1   # beside one busy process
    python loadtests/bench_threads.py --variants off auto --second-pool      # the engine's condition before 2026-12-06

Each variant is a child process started with its own environment (OpenMP's variables and preloads act only
when torch loads). The children load the model together, then take turns: the driver resumes one (SIGCONT),
asks it for one slice of work over a pipe and stops it again (SIGSTOP), so an idle variant's spinning OpenMP
thread cannot take a core from the measured one, and the variants alternate through the machine's conditions.
Per slice: the rate (decode-step tokens/s, or embeddings/s through the engine) and the CPU the process used
per wall second. The table gives each variant's median, its ratio to `off`, and its CPU per 1000 units of work
(the cost a variant puts on a shared machine). Writes results/threads-<tag>.json with the load average.

`--busy N` runs N processes that only spin (plain Python loops) through the rounds: a neighbour that wants a core.
`--second-pool` reproduces the worker before 2026-12-06: a thread that stays alive (asyncio's executor, which loaded
the model) has run torch's parallel code, so its OpenMP pool lives beside the one of the thread that computes (the
engine's), and libgomp, seeing more OpenMP threads than cores, spins only 100 rounds whatever is set. Without the
flag the model loads in a thread that ends, as the worker now does, and the computing thread's pool is the only one.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from model_server.threads import MODES, in_a_thread_of_its_own  # noqa: E402

RESULTS = Path(__file__).parent / "results"
PEERS = Path(os.environ.get("GENEMBED_PEERS_DIR", Path.home() / ".cache" / "genembed" / "peers"))
#: Intel OpenMP: the vLLM peer's copy (scripts/setup-peers.sh), or the `intel-openmp` wheel's
IOMP = os.environ.get("BENCH_IOMP", str(PEERS / "vllm" / "lib" / "libiomp5.so"))
JEMALLOC = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"  # Debian's libjemalloc2
#: environment per variant; `auto` is what GENEMBED_WORKER_OMP=auto gives the worker
VARIANTS: dict[str, dict[str, str]] = {
    "off": {},
    "auto": MODES["auto"],
    "1thread": {"OMP_NUM_THREADS": "1"},
    "active": {"OMP_WAIT_POLICY": "ACTIVE"},
    "passive": MODES["passive"],
    "bind": {"OMP_PROC_BIND": "close", "OMP_PLACES": "cores"},
    "active+bind": {"OMP_WAIT_POLICY": "ACTIVE", "OMP_PROC_BIND": "close", "OMP_PLACES": "cores"},
    "iomp": {"LD_PRELOAD": IOMP, "KMP_BLOCKTIME": "1", "KMP_AFFINITY": "granularity=fine,compact,1,0"},
    "iomp-spin": {"LD_PRELOAD": IOMP, "KMP_BLOCKTIME": "200", "KMP_AFFINITY": "granularity=fine,compact,1,0"},
    "jemalloc": {"LD_PRELOAD": JEMALLOC},
}


def child(work: str, dtype: str, model: str, second_pool: bool) -> None:
    import threading

    import torch

    from model_server.loading import load_model
    from model_server.specs import load_spec

    loaded = in_a_thread_of_its_own(load_model, load_spec(model, dtype=dtype, device="cpu"))  # as the worker loads
    if second_pool:  # a thread that ran torch's parallel code and stays alive, as asyncio's executor did
        threading.Thread(
            target=lambda: (torch.ones(1 << 22).mul_(2).sum(), threading.Event().wait()), daemon=True
        ).start()
    if work.startswith("step"):
        from loadtests.bench_decode_step import time_steps
        from model_server.methods import build_method

        method = build_method(loaded, 64)
        rows = int(work[4:])

        def once() -> dict:
            n = 30
            c0, w0 = time.process_time(), time.perf_counter()
            ms = time_steps(method.runner, method.embeddings, rows, 64, n)
            return {"value": rows / ms * 1e3, "cpu": (time.process_time() - c0) / (time.perf_counter() - w0)}

    else:  # engine K=<k>
        from loadtests.bench_engine import make_prompts, run_engine
        from model_server.engine import EngineLimits
        from model_server.serving import EmbeddingWorker

        worker = EmbeddingWorker(loaded, EngineLimits(max_running_seqs=32, max_batch_tokens=4096))
        worker.engine.start()
        prompts = make_prompts(loaded.tokenizer, 32)
        k = int(work.split("K")[1])
        run_engine(worker, [(p, 1) for p in prompts[:8]], 8)

        def once() -> dict:
            c0 = time.process_time()
            seconds, _ = run_engine(worker, [(p, k) for p in prompts], 32)
            return {"value": len(prompts) / seconds, "cpu": (time.process_time() - c0) / seconds}

    once()  # warm-up
    print(json.dumps({"ready": True, "threads": torch.get_num_threads()}), flush=True)
    for _ in sys.stdin:
        print(json.dumps(once()), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument("--work", default="step16", help="step<rows> (tokens/s) or engineK<k> (embeddings/s)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--model", default="smollm2-gircse")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tag", default=None, help="name of the result file (default: the work)")
    parser.add_argument("--busy", type=int, default=0, help="processes that only spin, beside the measured one")
    parser.add_argument("--second-pool", action="store_true", help="a second OpenMP pool alive (see above)")
    args = parser.parse_args()
    if args.child:
        return child(args.work, args.dtype, args.model, args.second_pool)
    procs = {}
    for name in args.variants:
        env = {**os.environ, **VARIANTS[name]}
        cmd = [sys.executable, __file__, "--child", "--work", args.work, "--dtype", args.dtype, "--model", args.model]
        cmd += ["--second-pool"] if args.second_pool else []
        procs[name] = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    for name, proc in procs.items():  # they load together; each stops once warm
        ready = json.loads(proc.stdout.readline())
        proc.send_signal(signal.SIGSTOP)
        print(f"{name}: ready, {ready['threads']} threads", flush=True)
    samples: dict[str, list[dict]] = {name: [] for name in procs}
    loads = []
    spin = [sys.executable, "-c", "while True: pass"]
    busy = [subprocess.Popen(spin) for _ in range(args.busy)]
    try:
        for r in range(args.rounds):
            loads.append(os.getloadavg()[0])
            order = list(procs) if r % 2 == 0 else list(reversed(procs))
            for name in order:
                proc = procs[name]
                proc.send_signal(signal.SIGCONT)
                proc.stdin.write("go\n")
                proc.stdin.flush()
                samples[name].append(json.loads(proc.stdout.readline()))
                proc.send_signal(signal.SIGSTOP)
            print(f"round {r}: " + ", ".join(f"{n} {s[-1]['value']:.1f}" for n, s in samples.items()), flush=True)
    except KeyboardInterrupt:  # Ctrl-C: the table and JSON of the slices so far
        print("stopped", flush=True)
    finally:
        for proc in [*procs.values(), *busy]:
            proc.send_signal(signal.SIGCONT)
            proc.kill()
    samples = {name: s for name, s in samples.items() if s}
    base = statistics.median(s["value"] for s in samples["off"]) if "off" in samples else None
    unit = "tokens" if args.work.startswith("step") else "embeddings"
    where = ", work in a second thread beside a live pool" if args.second_pool else ""
    print(f"\n{args.work} {args.dtype} {args.model}, {args.busy} busy processes{where}; ", end="")
    print(f"load average {min(loads):.1f}-{max(loads):.1f}")
    print(f"{'variant':12} {unit + '/s':>13} {'best':>9} {'vs off':>7} {'cpu':>5} {'cpu s/1000':>10}")
    table = {}
    for name, s in samples.items():
        med = statistics.median(x["value"] for x in s)
        cpu = statistics.median(x["cpu"] for x in s)
        per_1000 = statistics.median(x["cpu"] / x["value"] * 1000 for x in s)
        table[name] = {"env": VARIANTS[name], "median": med, "cpu": cpu, "cpu_s_per_1000": per_1000, "samples": s}
        ratio = f"{med / base:6.2f}x" if base else ""
        best = max(x["value"] for x in s)
        print(f"{name:12} {med:13.1f} {best:9.1f} {ratio:>7} {cpu:5.2f} {per_1000:10.2f}")
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"threads-{args.tag or args.work}.json"
    report = {"machine": platform.processor() or platform.machine(), "cores": os.cpu_count(), "args": vars(args)}
    path.write_text(json.dumps(report | {"load_average": loads, "variants": table}, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
