"""`genembed serve`'s process supervisor: worker child processes on fixed loopback ports, restarted with a
backoff when they exit, stopped (each draining) after the gateway."""

from __future__ import annotations

import contextlib
import logging
import socket
import subprocess
import threading
import time

log = logging.getLogger("genembed.serve")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, timeout: float, headers: dict[str, str]) -> str:
    """Poll the worker's /ready; returns the served model id from /info. Raises RuntimeError."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the worker for {url} exited with status {proc.returncode}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return httpx.get(f"{url}/info", headers=headers, timeout=5).raise_for_status().json()["id"]
        time.sleep(0.25)
    raise RuntimeError(f"the worker at {url} was not ready after {timeout:g} s")


class Worker:
    """One `genembed worker` child of `serve`, on a fixed port (the gateway's URL for it never changes)."""

    def __init__(self, cmd: list[str], port: int, env: dict[str, str]) -> None:
        self.cmd = [*cmd, "--port", str(port)]
        self.env = env
        self.url = f"http://127.0.0.1:{port}"
        self.backoff_s = 0.0
        self.restart_at: float | None = None
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(self.cmd, env=self.env)  # GENEMBED_WORKER_* pass through
        self.started_at = time.monotonic()


class Supervisor:
    """Keeps `serve`'s workers running: one that exits is started again on its port after a backoff that
    doubles with each quick failure (1 s up to 60 s; back to 1 s once a worker has run 60 s). The gateway's
    probe takes it back when it is ready; nothing else restarts."""

    BACKOFF_MIN_S, BACKOFF_MAX_S, STABLE_S, POLL_S = 1.0, 60.0, 60.0, 0.5

    def __init__(self) -> None:
        self.workers: list[Worker] = []
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="genembed-supervisor", daemon=True)

    def watch(self) -> None:
        self._thread.start()

    def _watch(self) -> None:
        while not self._stopping.wait(self.POLL_S):
            now = time.monotonic()
            for worker in self.workers:
                if worker.proc.poll() is None:
                    continue
                if worker.restart_at is None:
                    quick = now - worker.started_at < self.STABLE_S and worker.backoff_s > 0
                    worker.backoff_s = min(worker.backoff_s * 2, self.BACKOFF_MAX_S) if quick else self.BACKOFF_MIN_S
                    worker.restart_at = now + worker.backoff_s
                    log.warning(
                        "worker %s exited with status %s after %.0f s; restarting it in %g s",
                        worker.url,
                        worker.proc.returncode,
                        now - worker.started_at,
                        worker.backoff_s,
                    )
                elif now >= worker.restart_at:
                    worker.restart_at = None
                    worker.start()
                    log.warning("worker %s restarted (pid %d)", worker.url, worker.proc.pid)

    def stop(self) -> None:
        """No more restarts; then SIGTERM every worker (each drains what it still has) and wait for them."""
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join()
        procs = [w.proc for w in self.workers]
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
