"""The worker's threading setting (GENEMBED_WORKER_OMP) reaches the OpenMP runtime of a real worker process."""

from __future__ import annotations

import pytest

from harness.procs import genembed_exits, worker_process
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


def test_an_unknown_mode_stops_the_worker_before_it_loads() -> None:
    done = genembed_exits("worker", "--model", "minilm-l6", env={"GENEMBED_WORKER_OMP": "fast"})
    assert done.returncode == 2
    assert "GENEMBED_WORKER_OMP must be one of auto, off" in done.stderr
