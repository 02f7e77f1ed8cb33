"""The worker's threading setting (GENEMBED_WORKER_OMP) reaches the OpenMP runtime of a real worker process, and its
niceness (GENEMBED_WORKER_NICE) and CPUs (GENEMBED_WORKER_CPUS) every thread of it; the thread that tokenizes calls
runs nicer still (GENEMBED_WORKER_INGRESS_NICE)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch

from harness.procs import genembed_exits, thread_niceness, worker_process
from model_server import threads
from model_server.threads import CpuTurns, in_a_thread_of_its_own


def test_a_mode_adds_what_is_unset_and_off_adds_nothing() -> None:
    assert threads.omp_environment("off", {}) == {}
    assert threads.omp_environment("auto", {}) == {"GOMP_SPINCOUNT": "10000"}
    assert threads.omp_environment("passive", {}) == {"OMP_WAIT_POLICY": "PASSIVE"}
    assert threads.omp_environment("auto", {"GOMP_SPINCOUNT": "operator's"}) == {}  # an operator's value wins
    with pytest.raises(ValueError, match="GENEMBED_WORKER_OMP"):
        threads.omp_environment("fast", {})


def _omp_display(log: str) -> dict[str, str]:
    """libgomp's own report of the settings it runs (OMP_DISPLAY_ENV=VERBOSE), printed when torch loads it."""
    begin, end = log.index("OPENMP DISPLAY ENVIRONMENT BEGIN"), log.index("OPENMP DISPLAY ENVIRONMENT END")
    pairs = (line.strip().split(" = ", 1) for line in log[begin:end].splitlines()[1:] if " = " in line)
    return {k: v.strip("'") for k, v in pairs}


@pytest.mark.parametrize(("mode", "spin_count"), [("auto", "10000"), ("passive", "0"), ("off", "300000")])
def test_the_worker_runs_the_threading_it_was_given(tmp_path, mode: str, spin_count: str) -> None:
    """How long torch's OpenMP threads spin when a parallel region ends, by libgomp's own report."""
    env = {"GENEMBED_WORKER_OMP": mode, "OMP_DISPLAY_ENV": "VERBOSE"}
    with worker_process("minilm-l6", tmp_path, env=env):
        pass
    log = next(tmp_path.glob("worker-*.log")).read_text()
    assert f"threading {mode}:" in log
    assert _omp_display(log)["GOMP_SPINCOUNT"] == spin_count


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"GENEMBED_WORKER_OMP": "fast"}, "GENEMBED_WORKER_OMP must be one of auto, passive, off"),
        ({"GENEMBED_WORKER_NICE": "-5"}, "GENEMBED_WORKER_NICE must be a whole number from 0 to 19, not '-5'"),
        ({"GENEMBED_WORKER_CPUS": "1-0"}, "GENEMBED_WORKER_CPUS must list CPUs like 0,1 or 2-3, not '1-0'"),
        ({"GENEMBED_WORKER_CPUS": "4096"}, "GENEMBED_WORKER_CPUS '4096' names CPUs this process may not use"),
        ({"GENEMBED_WORKER_INGRESS_NICE": "20"}, "ingress_nice\n  Input should be less than or equal to 19"),
    ],
)
def test_a_bad_setting_stops_the_worker_before_it_loads(env: dict[str, str], message: str) -> None:
    done = genembed_exits("worker", "--model", "minilm-l6", env=env)
    assert done.returncode == 2
    assert message in done.stderr


def test_the_worker_runs_every_thread_at_the_niceness_it_was_given(tmp_path) -> None:
    with worker_process("minilm-l6", tmp_path, env={"GENEMBED_WORKER_NICE": "7"}) as (_, proc):
        niceness = thread_niceness(proc.pid)
    # torch's, uvicorn's and the engine's threads alike; the one that tokenizes calls before admission (the
    # warm-up's calls started it) runs 10 nicer, so that the engine's passes go first
    assert len(niceness) > 2 and sorted(set(niceness)) == [7, 17] and niceness.count(17) == 1
    assert ", nice 7" in next(tmp_path.glob("worker-*.log")).read_text()


def test_the_ingress_thread_is_nicer_by_what_it_adds_up_to_the_limit() -> None:
    def own_niceness() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    mine = own_niceness()
    for added, expected in ((0, mine), (3, min(mine + 3, threads.MAX_NICE)), (threads.MAX_NICE, threads.MAX_NICE)):
        with threads.ingress_executor(added) as pool:
            assert pool.submit(own_niceness).result() == expected
    assert own_niceness() == mine  # the caller's thread keeps its own


def test_cpu_lists_are_read_as_linux_writes_them() -> None:
    allowed = sorted(os.sched_getaffinity(0))
    assert threads.parse_cpus(str(allowed[0])) == {allowed[0]}
    assert threads.parse_cpus(f"{allowed[0]}-{allowed[-1]}") == set(range(allowed[0], allowed[-1] + 1))
    assert threads.parse_cpus(f" {allowed[-1]}, {allowed[0]} ") == {allowed[0], allowed[-1]}
    for bad in ("a", "0-", "-1", "0,x"):
        with pytest.raises(ValueError, match="GENEMBED_WORKER_CPUS"):
            threads.parse_cpus(bad)


def test_the_worker_runs_every_thread_on_the_cpus_it_was_given(tmp_path) -> None:
    """One CPU: every thread of the worker is kept on it, and torch runs one OpenMP thread there."""
    cpu = max(os.sched_getaffinity(0))
    with worker_process("minilm-l6", tmp_path, env={"GENEMBED_WORKER_CPUS": str(cpu)}) as (_, proc):
        masks = [os.sched_getaffinity(int(task.name)) for task in Path(f"/proc/{proc.pid}/task").iterdir()]
    assert len(masks) > 1 and all(mask == {cpu} for mask in masks)
    log = next(tmp_path.glob("worker-*.log")).read_text()
    assert "threading auto: 1 torch threads" in log and f"CPUs {cpu}" in log


def test_the_model_loads_in_a_thread_that_leaves_no_openmp_threads_behind() -> None:
    """OpenMP keeps a pool of threads for each thread that ran torch's parallel code; one left beside the engine's
    means more OpenMP threads than cores, where libgomp stops spinning and decode steps ran 2x slower."""
    tasks = Path("/proc/self/task")
    before = {t.name for t in tasks.iterdir()}

    def parallel_work() -> str:
        torch.ones(1 << 22).mul_(2).sum()  # large enough for torch's parallel loops
        return threading.current_thread().name

    assert in_a_thread_of_its_own(parallel_work).startswith("genembed-load")
    deadline = time.monotonic() + 5
    while {t.name for t in tasks.iterdir()} - before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not {t.name for t in tasks.iterdir()} - before


def _take_turns(path: str, pass_s: float, until: float, held: list[float], lead_s: float = CpuTurns.LEAD_S) -> None:
    """A worker whose every pass holds the turn for `pass_s` (asleep: the share is of the turn, not of the cores)."""
    turns = CpuTurns(path, lead_s)
    while time.monotonic() < until:
        with turns:
            started = time.monotonic()
            time.sleep(pass_s)
            held.append(time.monotonic() - started)


def _shares(path: str, passes_s: tuple[float, ...], seconds: float, lead_s: float) -> list[float]:
    until = time.monotonic() + seconds
    held: list[list[float]] = [[] for _ in passes_s]
    pairs = zip(passes_s, held, strict=True)
    workers = [threading.Thread(target=_take_turns, args=(path, p, until, h, lead_s)) for p, h in pairs]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return [sum(h) / sum(map(sum, held)) for h in held]


@pytest.mark.parametrize("by_time", [True, False])
@pytest.mark.solo  # shares of wall time
def test_turns_are_shared_by_time_not_by_passes(tmp_path, by_time: bool) -> None:
    """A worker with 0.2 s passes beside one with 0.02 s passes: turns by time give each about half of the time;
    with the lead unlimited (one pass each, as before) the short passes get about a tenth, so the check can fail."""
    lead_s = CpuTurns.LEAD_S if by_time else math.inf
    _, short = _shares(str(tmp_path / "turns"), (0.2, 0.02), seconds=3.0, lead_s=lead_s)
    if by_time:
        assert 0.3 < short < 0.7
    else:
        assert short < 0.2


@pytest.mark.solo  # shares of wall time
def test_a_worker_back_from_idle_is_owed_no_more_than_the_catch_up(tmp_path) -> None:
    """A worker that held the turn alone for 2 s, then a second one arrives: the newcomer goes first for about
    `CATCH_UP_S`, then they share; it is not owed the 2 s it did not ask for."""
    path = str(tmp_path / "turns")
    early: list[float] = []
    first = threading.Thread(target=_take_turns, args=(path, 0.02, time.monotonic() + 3.5, early))
    first.start()
    time.sleep(2.0)
    arrived, late = len(early), []
    _take_turns(path, 0.02, time.monotonic() + 1.5, late)
    first.join()
    alongside = sum(early[arrived:])
    assert sum(late) > CpuTurns.CATCH_UP_S  # it went first for its catch-up, then shared
    assert alongside > 0.25  # without the catch-up bound the first would have waited through all 1.5 s


def test_a_neighbour_that_went_away_while_waiting_blocks_no_one(tmp_path) -> None:
    """Ledger entries of an ended process, or of a wait too old to be real (a process in another PID namespace),
    are not waited for, even though they have held the turn for less."""
    path = str(tmp_path / "turns")
    ended = subprocess.Popen(["true"])
    ended.wait()
    ledger = {
        f"{ended.pid}.0": [0.0, "waiting", time.monotonic()],
        f"{os.getpid()}.999": [0.0, "waiting", time.monotonic() - 2 * CpuTurns.STALE_S],
    }
    Path(path + ".ledger").write_text(json.dumps(ledger))
    held: list[float] = []
    # a lead of -1 s: any waiter that counts would go first
    worker = threading.Thread(target=_take_turns, args=(path, 0.0, time.monotonic() + 0.2, held, -1.0))
    worker.start()
    worker.join(timeout=10)
    assert not worker.is_alive() and held
    assert f"{ended.pid}.0" not in json.loads(Path(path + ".ledger").read_text())


def test_a_ledger_that_cannot_be_read_starts_afresh(tmp_path) -> None:
    """A writer killed mid-write leaves half a ledger: turns go on, and the ledger is whole again after a pass."""
    path = str(tmp_path / "turns")
    Path(path + ".ledger").write_text('{"1.0": [0.0, "wait')
    held: list[float] = []
    _take_turns(path, 0.0, time.monotonic() + 0.1, held)
    assert held
    [name] = json.loads(Path(path + ".ledger").read_text())
    assert name.startswith(f"{os.getpid()}.")
