"""The worker's CPU threading (`GENEMBED_WORKER_OMP`), niceness and CPUs, set in its own process before torch loads.

OpenMP reads its variables once, when torch's runtime (libgomp) loads, so `genembed worker` applies them
before its first torch import (cli/main.py). No torch here: this module must be importable before torch.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import fcntl
import itertools
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import astuple, dataclass
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

#: what the ingress thread adds to the worker's niceness by default (`GENEMBED_WORKER_INGRESS_NICE`)
INGRESS_NICE = 10

#: the variables a log line reports (whoever set them: `auto`, the operator, the image)
REPORTED = (
    "OMP_NUM_THREADS",
    "OMP_WAIT_POLICY",
    "GOMP_SPINCOUNT",
    "OMP_PROC_BIND",
    "OMP_PLACES",
    "LD_PRELOAD",
    "GENEMBED_WORKER_CPU_TURNS",
)


def omp_environment(mode: str, environ: Mapping[str, str]) -> dict[str, str]:
    """The variables `mode` adds to `environ`: those of `MODES[mode]` that are not set already (an operator's value
    wins)."""
    if mode not in OMP_MODES:
        raise ValueError(f"GENEMBED_WORKER_OMP must be one of {', '.join(OMP_MODES)}, not {mode!r}")
    return {k: v for k, v in MODES[mode].items() if k not in environ}


def configure(mode: str, nice: str = "0", cpus: str = "") -> dict[str, str]:
    """Apply `mode` to this process's environment, add `nice` (0-19) to its niceness and keep it on `cpus` (a list
    such as "0,1" or "2-3"; empty: wherever the OS puts it); returns the variables it added. Too late once torch is
    loaded."""
    if "torch" in sys.modules:
        raise RuntimeError("the worker's threading must be set before torch is imported")
    if not (nice.isdigit() and int(nice) <= MAX_NICE):
        raise ValueError(f"GENEMBED_WORKER_NICE must be a whole number from 0 to {MAX_NICE}, not {nice!r}")
    pinned = parse_cpus(cpus) if cpus else set()
    added = omp_environment(mode, os.environ)
    if pinned and "OMP_NUM_THREADS" not in os.environ:  # one OpenMP thread per CPU it may use
        added["OMP_NUM_THREADS"] = str(len(pinned))
    os.environ.update(added)
    for tid in _threads():
        os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + int(nice))
        if pinned:
            os.sched_setaffinity(tid, pinned)
    return added


def parse_cpus(cpus: str) -> set[int]:
    """`GENEMBED_WORKER_CPUS`: "0,1", "2-3", "0,2-3" (empty: none)."""
    if not hasattr(os, "sched_setaffinity"):
        raise ValueError("GENEMBED_WORKER_CPUS needs Linux (sched_setaffinity)")
    found: set[int] = set()
    for part in filter(None, (p.strip() for p in cpus.split(","))):
        low, dash, high = part.partition("-")
        if not (low.isdigit() and (high.isdigit() or not dash)) or int(high or low) < int(low):
            raise ValueError(f"GENEMBED_WORKER_CPUS must list CPUs like 0,1 or 2-3, not {cpus!r}")
        found.update(range(int(low), int(high or low) + 1))
    if found and not found <= os.sched_getaffinity(0):
        raise ValueError(f"GENEMBED_WORKER_CPUS {cpus!r} names CPUs this process may not use: {sorted(found)}")
    return found


def _threads() -> list[int]:
    """Every thread of this process: Linux keeps a niceness and a CPU mask per thread, a new thread inherits its
    creator's, and some start at import (numpy's OpenBLAS pool, before `configure` can run)."""
    tasks = Path("/proc/self/task")
    return [int(task.name) for task in tasks.iterdir()] if tasks.is_dir() else [0]


def describe(mode: str) -> str:
    """One line for the worker's log: what threading it runs (call after torch is loaded)."""
    import torch

    variables = ", ".join(f"{k}={os.environ[k]}" for k in REPORTED if k in os.environ) or "no OpenMP variables"
    cpus = ",".join(map(str, sorted(os.sched_getaffinity(0)))) if hasattr(os, "sched_getaffinity") else "any"
    return f"threading {mode}: {torch.get_num_threads()} torch threads, {variables}, nice {os.nice(0)}, CPUs {cpus}"


def in_a_thread_of_its_own(fn: Callable[..., T], *args: object) -> T:
    """`fn(*args)` in a thread that ends with it. Torch's parallel code leaves an OpenMP pool in every thread that
    ran it, and with a second pool alive beside the computing thread's (more OpenMP threads than cores) libgomp spins
    100 rounds instead of GOMP_SPINCOUNT at the end of each parallel region: a model loaded in asyncio's executor,
    whose thread stays, made the engine thread's decode steps 2x slower (docs/benchmarks.md). Loading here leaves the
    engine's thread the only one whose pool lives."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="genembed-load") as pool:
        return pool.submit(fn, *args).result()


def ingress_executor(added_nice: int) -> concurrent.futures.ThreadPoolExecutor:
    """The one thread that prepares calls (tokenizes them) before admission, `added_nice` nicer than the worker (at
    most MAX_NICE). Admission prices engine passes, not this work: on a CPU device a burst's tokenization in
    asyncio's executor (several threads, at the engine's priority) ran beside the engine's first pass and made it
    6-14x longer than priced, late for every call admitted meanwhile (CI's overload test: 504s for accepted calls).
    One nicer thread yields the cores to the engine: a call waits for its tokens before admission, where its
    deadline's clock already runs and the wait is seen, instead of slowing the passes admission promised."""

    def lower() -> None:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(MAX_NICE, os.getpriority(os.PRIO_PROCESS, tid) + added_nice))

    return concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="genembed-ingress", initializer=lower)


class CpuTurns:
    """Workers that share their CPUs take turns at them: one engine pass at a time among the processes given the same
    lock file (`GENEMBED_WORKER_CPU_TURNS`; `genembed serve` gives its workers one unless they have CPUs of their
    own). Two workers whose OpenMP teams compute at once on the same cores each wait at every parallel region's end
    for a thread the other preempted, so both run far slower than their share; in turns each pass runs on every core
    at full speed, and the time a worker waits for its turn is in its measured iteration times, where admission sees
    it. The turn is an `flock`: the kernel releases it with its holder, so a worker that dies never blocks the others.

    Turns are shared by time, not by passes: a minilm pass of 64 sequences held the CPUs for a second while a gircse
    decode step took a tenth of that, so one pass each gave gircse a tenth of the time, and calls it had admitted
    were late (docs/benchmarks.md). A ledger beside the lock file (`<path>.ledger`) keeps the seconds each worker has
    held the turn; a worker that has held it `lead_s` longer than one that waits lets that one go first. A worker back
    from idle starts at most `CATCH_UP_S` behind the busy neighbour that has held the turn least, so time it did not
    ask for is not owed to it."""

    #: by default, how far ahead of a waiting neighbour a worker may be and still take the turn
    LEAD_S = 0.02
    #: how far behind its recently busy neighbours a worker coming back from idle may start
    CATCH_UP_S = 0.5
    #: how long after a neighbour's pass ends it may still be behind and coming back for the next
    GRACE_S = 0.02
    #: a neighbour that held or asked for the turn this recently counts as busy
    RECENT_S = 1.0
    #: a wait older than this is a worker that went away without leaving the ledger (another PID namespace)
    STALE_S = 30.0
    #: how long a worker that let a neighbour go first sleeps before it asks again (the neighbour, blocked in
    #: `flock`, takes the turn within microseconds)
    YIELD_S = 0.001

    _instances = itertools.count()

    def __init__(self, path: str, lead_s: float = LEAD_S) -> None:
        self.path = path
        self.lead_s = lead_s
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        self._ledger = os.open(path + ".ledger", os.O_RDWR | os.O_CREAT, 0o600)
        self.name = f"{os.getpid()}.{next(self._instances)}"  # two engines in one process are two entries
        self._started = 0.0

    def __enter__(self) -> CpuTurns:
        with self._book() as book:
            me = book[self.name]
            now = time.monotonic()
            busy = [e.used_s for n, e in book.items() if n != self.name and e.busy(now, self.RECENT_S)]
            if busy:
                me.used_s = max(me.used_s, min(busy) - self.CATCH_UP_S)
            me.state, me.since = "waiting", now
        try:
            while True:
                fcntl.flock(self._fd, fcntl.LOCK_EX)
                with self._book() as book:
                    me = book[self.name]
                    if not self._behind_me(book, me.used_s):
                        me.state, me.since = "holding", time.monotonic()
                        break
                fcntl.flock(self._fd, fcntl.LOCK_UN)
                time.sleep(self.YIELD_S)
        except BaseException:
            with self._book() as book:
                book[self.name].state = "idle"
            raise
        self._started = time.perf_counter()
        return self

    def __exit__(self, *_: object) -> None:
        with self._book() as book:
            me = book[self.name]
            me.used_s += time.perf_counter() - self._started
            me.state, me.since = "idle", time.monotonic()
        fcntl.flock(self._fd, fcntl.LOCK_UN)

    def _behind_me(self, book: dict[str, _Entry], used_s: float) -> bool:
        """Whether a neighbour that has held the turn for `lead_s` less than this worker waits for it, or has just
        ended a pass (between two passes a busy worker is idle for the engine's bookkeeping: taking the turn then
        gives one pass each again)."""
        now = time.monotonic()
        return any(
            e.used_s < used_s - self.lead_s and now - e.since < (self.STALE_S if e.state == "waiting" else self.GRACE_S)
            for n, e in book.items()
            if n != self.name and e.state != "holding"
        )

    @contextlib.contextmanager
    def _book(self) -> Iterator[dict[str, _Entry]]:
        """The ledger, read and written back under its own lock (held for microseconds, never during a pass); the
        entries of processes that ended are left out, this worker's is always in. One that cannot be read (a writer
        killed mid-write) starts afresh: turns then go by passes until the ledger fills again, never stop."""
        fcntl.flock(self._ledger, fcntl.LOCK_EX)
        try:
            raw = os.pread(self._ledger, 1 << 20, 0)
            try:
                book = {n: _Entry(*e) for n, e in json.loads(raw).items() if _alive(n)} if raw else {}
            except (ValueError, TypeError, AttributeError):
                book = {}
            book.setdefault(self.name, _Entry())  # this worker's own entry: absent at first, or after a reset
            yield book
            data = json.dumps({n: astuple(e) for n, e in book.items()}).encode()
            os.ftruncate(self._ledger, 0)
            os.pwrite(self._ledger, data, 0)
        finally:
            fcntl.flock(self._ledger, fcntl.LOCK_UN)


@dataclass
class _Entry:
    """One worker's line in the turns ledger."""

    used_s: float = 0.0  # seconds it has held the turn
    state: Literal["idle", "waiting", "holding"] = "idle"
    since: float = 0.0  # time.monotonic() (one clock for every process on the host) of its last change of state

    def busy(self, now: float, recent_s: float) -> bool:
        return self.state != "idle" or now - self.since < recent_s


def _alive(name: str) -> bool:
    """Whether the process of a ledger entry (`<pid>.<n>`) still runs (one of another user counts)."""
    try:
        os.kill(int(name.split(".")[0]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
