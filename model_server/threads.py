"""The worker's CPU threading (`GENEMBED_WORKER_OMP`) and niceness, set in its own process before torch loads.

OpenMP reads its variables once, when torch's runtime (libgomp) loads, so `genembed worker` applies them
before its first torch import (cli/main.py). No torch here: this module must be importable before torch.
"""

from __future__ import annotations

import concurrent.futures
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Literal, TypeVar, get_args

T = TypeVar("T")

OmpMode = Literal["auto", "passive", "off"]
OMP_MODES: tuple[str, ...] = get_args(OmpMode)

#: what each mode sets (`off`: nothing, libgomp's default spin of 300 000 rounds at the end of a parallel region).
#: A decode step is hundreds of parallel regions back to back: torch's threads that sleep between them (`passive`)
#: made 16-row steps 2x slower on the 2-core Xeon; threads that spin hold a core that a neighbour process needs,
#: and beside one busy process a step took 2.4-13x longer than on free cores (runs vary). `auto`'s 10 000 rounds
#: measured as fast as the full 300 000 on free cores; `passive` is 1.5-2.5x faster beside a busy process: the
#: setting for workers that share their cores with other busy processes. (docs/benchmarks.md)
MODES: dict[str, dict[str, str]] = {
    "auto": {"GOMP_SPINCOUNT": "10000"},
    "passive": {"OMP_WAIT_POLICY": "PASSIVE"},
    "off": {},
}

#: the largest niceness a worker may add (Linux's range ends at 19)
MAX_NICE = 19

#: the variables a log line reports (whoever set them: `auto`, the operator, the image)
REPORTED = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_PROC_BIND", "OMP_PLACES", "LD_PRELOAD")


def omp_environment(mode: str, environ: Mapping[str, str]) -> dict[str, str]:
    """The variables `mode` adds to `environ`: those of `MODES[mode]` that are not set already (an operator's value
    wins)."""
    if mode not in OMP_MODES:
        raise ValueError(f"GENEMBED_WORKER_OMP must be one of {', '.join(OMP_MODES)}, not {mode!r}")
    return {k: v for k, v in MODES[mode].items() if k not in environ}


def configure(mode: str, nice: str = "0") -> dict[str, str]:
    """Apply `mode` to this process's environment and add `nice` (0-19) to its niceness; returns the variables it
    added. Too late once torch is loaded."""
    if "torch" in sys.modules:
        raise RuntimeError("the worker's threading must be set before torch is imported")
    if not (nice.isdigit() and int(nice) <= MAX_NICE):
        raise ValueError(f"GENEMBED_WORKER_NICE must be a whole number from 0 to {MAX_NICE}, not {nice!r}")
    added = omp_environment(mode, os.environ)
    os.environ.update(added)
    _renice(int(nice))
    return added


def _renice(increment: int) -> None:
    """Add `increment` to the niceness of every thread of this process: Linux keeps one per thread, a new thread
    inherits its creator's, and some start at import (numpy's OpenBLAS pool, before `configure` can run)."""
    tasks = Path("/proc/self/task")
    if not tasks.is_dir():  # not Linux: niceness is the process's
        os.nice(increment)
        return
    for tid in (int(task.name) for task in tasks.iterdir()):
        os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + increment)


def describe(mode: str) -> str:
    """One line for the worker's log: what threading it runs (call after torch is loaded)."""
    import torch

    variables = ", ".join(f"{k}={os.environ[k]}" for k in REPORTED if k in os.environ) or "no OpenMP variables"
    return f"threading {mode}: {torch.get_num_threads()} torch threads, {variables}, nice {os.nice(0)}"


def in_a_thread_of_its_own(fn: Callable[..., T], *args: object) -> T:
    """`fn(*args)` in a thread that ends with it. Torch's parallel code leaves an OpenMP pool in every thread that
    ran it, and with a second pool alive beside the computing thread's (more OpenMP threads than cores) libgomp spins
    100 rounds instead of GOMP_SPINCOUNT at the end of each parallel region: a model loaded in asyncio's executor,
    whose thread stays, made the engine thread's decode steps 2x slower (docs/benchmarks.md). Loading here leaves the
    engine's thread the only one whose pool lives."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="genembed-load") as pool:
        return pool.submit(fn, *args).result()
