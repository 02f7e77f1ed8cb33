"""The layering contracts in pyproject.toml ([tool.importlinter]): the gateway imports no torch stack and no
worker code beyond the shared layer, the worker never imports the gateway, serving imports no training or
evaluation code."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from harness.procs import REPO
from tests.ci import tool_missing


def test_import_contracts_hold() -> None:
    lint_imports = Path(sys.executable).parent / "lint-imports"
    if not lint_imports.exists():
        tool_missing("import-linter is not installed: bash scripts/setup-tests.sh")
    done = subprocess.run(
        [str(lint_imports), "--no-cache", "--config", str(REPO / "pyproject.toml")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
