"""Shared fixtures: real workers on the bundled models, started once per test session."""

from __future__ import annotations

import pytest

from harness.procs import worker_process


@pytest.fixture(scope="session")
def gircse_worker(tmp_path_factory) -> str:
    """Base URL of a `genembed worker --model smollm2-gircse` (fp32, CPU)."""
    with worker_process("smollm2-gircse", tmp_path_factory.mktemp("gircse")) as (url, _):
        yield url


@pytest.fixture(scope="session")
def minilm_worker(tmp_path_factory) -> str:
    """Base URL of a `genembed worker --model minilm-l6`."""
    with worker_process("minilm-l6", tmp_path_factory.mktemp("minilm")) as (url, _):
        yield url


pytest_plugins = ("tests.gateway_fixtures",)
