"""tests/solo.py in a real pytest-xdist run of two processes: a `solo` test runs with no test beside it, and
without the marker the same tests do run side by side (so the check can fail)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from harness.procs import REPO

pytestmark = pytest.mark.solo  # the check is of wall-clock overlap inside it

_BESIDE = """
import json, os, time
import pytest

@pytest.mark.parametrize("n", range(6))
def test_beside(n):
    started = time.time()
    time.sleep(0.5)
    with open(os.environ["SPANS"], "a") as f:
        f.write(json.dumps(["beside", started, time.time()]) + "\\n")
"""

_ALONE = """
import json, os, time
import pytest

solo = pytest.mark.solo if os.environ.get("MARK_SOLO") else (lambda test: test)

def test_first():
    time.sleep(0.25)  # so that a `beside` test is half-way through when test_alone asks for its turn

@solo
def test_alone():
    started = time.time()
    time.sleep(1.0)
    with open(os.environ["SPANS"], "a") as f:
        f.write(json.dumps(["alone", started, time.time()]) + "\\n")
"""


def _overlaps(tmp_path, mark_solo: bool) -> int:
    """Run both files in two xdist processes; how many `beside` tests ran while `alone` did."""
    run = tmp_path / ("solo" if mark_solo else "plain")
    (run / "tmp").mkdir(parents=True)
    (run / "test_beside.py").write_text(_BESIDE)
    (run / "test_alone.py").write_text(_ALONE)
    spans = run / "spans.jsonl"
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "SPANS": str(spans),
        "TMPDIR": str(run / "tmp"),  # where the plugin's lock file is made: it must be gone afterwards
        "MARK_SOLO": "1" if mark_solo else "",
        "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1",  # only xdist and the plugin: the installed ones take seconds to import
    }
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "xdist", "-p", "tests.solo", "-n", "2"]
    done = subprocess.run([*cmd, "--dist", "loadfile", "."], cwd=run, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert not list((run / "tmp").glob("genembed-solo-*")), "the lock file was left behind"
    rows = [json.loads(line) for line in spans.read_text().splitlines()]
    [(_, start, end)] = [r for r in rows if r[0] == "alone"]
    beside = [(s, e) for name, s, e in rows if name == "beside"]
    assert len(beside) == 6
    return sum(1 for s, e in beside if s < end and start < e)


def test_a_solo_test_runs_with_no_other_beside_it(tmp_path):
    assert _overlaps(tmp_path, mark_solo=True) == 0


def test_unmarked_tests_run_side_by_side(tmp_path):
    assert _overlaps(tmp_path, mark_solo=False) >= 1
