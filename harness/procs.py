"""Start real servers (workers, gateways, redis) as child processes on free loopback ports."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def children(pid: int) -> list[int]:
    """Child processes of `pid`, whichever of its threads started them."""
    tasks = Path(f"/proc/{pid}/task").iterdir()
    return sorted(int(child) for task in tasks for child in (task / "children").read_text().split())


def thread_niceness(pid: int) -> list[int]:
    """The niceness of each thread of `pid` (Linux keeps one per thread): field 19 of its stat line."""
    stats = (task / "stat" for task in Path(f"/proc/{pid}/task").iterdir())
    return [int(stat.read_text().rsplit(")", 1)[1].split()[16]) for stat in stats]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    """Poll `url` until it answers 200; fail early if `proc` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} was ready")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code == 200:
                return
        time.sleep(0.2)
    raise TimeoutError(f"{url} not ready after {timeout}s")


@contextlib.contextmanager
def running(
    cmd: list[str],
    ready_url: str,
    timeout: float = 180,
    env: dict[str, str] | None = None,
    log_path: Path | None = None,
    cwd: Path = REPO,
) -> Iterator[subprocess.Popen]:
    """Run `cmd` in `cwd` until the block ends; its output goes to `log_path` (kept for failure reports)."""
    log = open(log_path, "wb") if log_path else subprocess.DEVNULL  # noqa: SIM115
    proc = subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, cwd=cwd, start_new_session=True
    )
    try:
        wait_http(ready_url, timeout, proc)
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if log_path:
            log.close()


def genembed(*args: str) -> list[str]:
    return [sys.executable, "-m", "cli.main", *args]


def genembed_exits(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """A `genembed` command that is expected to stop by itself (a refusal at start); its exit code and output."""
    return subprocess.run(
        genembed(*args), cwd=REPO, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=timeout
    )


@contextlib.contextmanager
def worker_process(
    model: str, tmp_dir: Path, *extra: str, env: dict[str, str] | None = None, tree: Path = REPO
) -> Iterator[tuple[str, subprocess.Popen]]:
    """A `genembed worker` (the one in checkout `tree`) on a free port; yields (base URL, process)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = genembed("worker", "--model", model, "--port", str(port), *extra)
    log_path = tmp_dir / f"worker-{model.replace('/', '_')}-{port}.log"
    with running(cmd, f"{url}/ready", env=env, log_path=log_path, cwd=tree) as p:
        yield url, p


@contextlib.contextmanager
def app_in_thread(app, force_exit: bool = False) -> Iterator[str]:
    """A scripted ASGI app served by uvicorn on a free port in a thread; yields its base URL.
    `force_exit`: on the way out, don't wait for calls the app keeps hanging."""
    import threading

    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        server.force_exit = force_exit
        thread.join(5)


def api_error(response: httpx.Response, status: int) -> dict:
    """The body of an OpenAI-shaped error response with this status."""
    assert response.status_code == status, response.text
    body = response.json()["error"]
    assert set(body) == {"message", "type", "param", "code"}
    return body
