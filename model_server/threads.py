"""The worker's CPU threading (`GENEMBED_WORKER_OMP`) and niceness, set in its own process before torch loads.

OpenMP reads its variables once, when torch's runtime (libgomp) loads, so `genembed worker` applies them
before its first torch import (cli/main.py). No torch here: this module must be importable before torch.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Literal, get_args

OmpMode = Literal["auto", "off"]
OMP_MODES: tuple[str, ...] = get_args(OmpMode)

#: what `auto` sets: libgomp's threads sleep as soon as a parallel region ends instead of spinning for 300 000
#: rounds. A spinning thread holds a core that the other torch thread, the event loop or a neighbour process
#: needs; on the shared 2-core VM the default made 16-row decode steps 6.6x slower (loadtests/bench_threads.py,
#: docs/benchmarks.md, issue 23).
AUTO: dict[str, str] = {"OMP_WAIT_POLICY": "PASSIVE"}

#: the variables a log line reports (whoever set them: `auto`, the operator, the image)
REPORTED = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_PROC_BIND", "OMP_PLACES", "LD_PRELOAD")


def omp_environment(mode: str, environ: Mapping[str, str]) -> dict[str, str]:
    """The variables `mode` adds to `environ`: `auto`'s that are not set already (an operator's value wins),
    none for `off` (torch's own defaults)."""
    if mode not in OMP_MODES:
        raise ValueError(f"GENEMBED_WORKER_OMP must be one of {', '.join(OMP_MODES)}, not {mode!r}")
    return {} if mode == "off" else {k: v for k, v in AUTO.items() if k not in environ}


def configure(mode: str, nice: str = "0") -> dict[str, str]:
    """Apply `mode` to this process's environment and add `nice` (0-19) to its niceness; returns the variables it
    added. Too late once torch is loaded."""
    if "torch" in sys.modules:
        raise RuntimeError("the worker's threading must be set before torch is imported")
    if not (nice.isdigit() and int(nice) <= 19):
        raise ValueError(f"GENEMBED_WORKER_NICE must be a whole number from 0 to 19, not {nice!r}")
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
