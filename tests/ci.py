"""What a test does when a tool it drives is not installed: .ci/run installs every one, so in CI (CI=true) the
test fails instead of skipping unseen; on a developer's machine it skips with the install command."""

from __future__ import annotations

import os
from typing import NoReturn

import pytest


def tool_missing(message: str) -> NoReturn:
    if os.environ.get("CI") == "true":
        pytest.fail(f"{message} (CI installs it: .ci/run)")
    pytest.skip(message)
