"""The worker's threading setting (GENEMBED_WORKER_OMP) reaches the OpenMP runtime of a real worker process, and its
niceness (GENEMBED_WORKER_NICE) every thread of it."""

from __future__ import annotations

import pytest

from harness.procs import genembed_exits, thread_niceness, worker_process
from model_server import threads


def test_auto_adds_what_is_unset_and_off_adds_nothing() -> None:
    assert threads.omp_environment("off", {}) == {}
    assert threads.omp_environment("auto", {}) == threads.AUTO
    name = next(iter(threads.AUTO))
    assert name not in threads.omp_environment("auto", {name: "operator's"})  # an operator's value wins
    with pytest.raises(ValueError, match="GENEMBED_WORKER_OMP"):
        threads.omp_environment("fast", {})


def _omp_display(log: str) -> dict[str, str]:
    """libgomp's own report of the settings it runs (OMP_DISPLAY_ENV=VERBOSE), printed when torch loads it."""
    begin, end = log.index("OPENMP DISPLAY ENVIRONMENT BEGIN"), log.index("OPENMP DISPLAY ENVIRONMENT END")
    pairs = (line.strip().split(" = ", 1) for line in log[begin:end].splitlines()[1:] if " = " in line)
    return {k: v.strip("'") for k, v in pairs}


@pytest.mark.parametrize(("mode", "spin_count"), [("auto", "0"), ("off", "300000")])
def test_the_worker_runs_the_threading_it_was_given(tmp_path, mode: str, spin_count: str) -> None:
    """auto: torch's OpenMP threads sleep when a parallel region ends; off: libgomp's default spin."""
    env = {"GENEMBED_WORKER_OMP": mode, "OMP_DISPLAY_ENV": "VERBOSE"}
    with worker_process("minilm-l6", tmp_path, env=env):
        pass
    log = next(tmp_path.glob("worker-*.log")).read_text()
    assert f"threading {mode}:" in log
    assert _omp_display(log)["GOMP_SPINCOUNT"] == spin_count


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"GENEMBED_WORKER_OMP": "fast"}, "GENEMBED_WORKER_OMP must be one of auto, off"),
        ({"GENEMBED_WORKER_NICE": "-5"}, "GENEMBED_WORKER_NICE must be a whole number from 0 to 19, not '-5'"),
    ],
)
def test_a_bad_setting_stops_the_worker_before_it_loads(env: dict[str, str], message: str) -> None:
    done = genembed_exits("worker", "--model", "minilm-l6", env=env)
    assert done.returncode == 2
    assert message in done.stderr


def test_the_worker_runs_every_thread_at_the_niceness_it_was_given(tmp_path) -> None:
    with worker_process("minilm-l6", tmp_path, env={"GENEMBED_WORKER_NICE": "7"}) as (_, proc):
        niceness = thread_niceness(proc.pid)
    assert len(niceness) > 1 and set(niceness) == {7}  # torch's, uvicorn's and the engine's threads alike
    assert ", nice 7" in next(tmp_path.glob("worker-*.log")).read_text()
