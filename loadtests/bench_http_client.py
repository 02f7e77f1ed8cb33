"""What one HTTP call costs the caller's CPU while many others are held open (by hand, not in CI).

    python loadtests/bench_http_client.py                     # loadtests/results/http-client.{json,png}

The gateway holds one connection to a worker per call in flight (HTTP/1.1: a call computing for 20 s keeps
its connection), so at overload it sends quick calls (refusals) beside hundreds of held ones; the load suite's
generator does the same towards the gateway. httpx 0.28's pool (httpcore 1.0) walks every connection, and for
each idle one walks them all again, on every request and every release (encode/httpcore#1035), so a call's cost
grows with the connections held. This measures it: a local uvicorn server (its own process) holds `--held`
calls for the whole run and answers the others at once; each client sends `--calls` quick calls, `--concurrency`
at a time, and its process CPU seconds per quick call are reported. Clients alternate, `--rounds` times each,
and the table gives ratios to httpx within the run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from harness.procs import free_port, running  # noqa: E402
from loadtests.bench_gateway import machine  # noqa: E402
from loadtests.load_suite import output_path  # noqa: E402

SERVER = """
import asyncio
async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    if scope["path"] == "/hold":
        await asyncio.sleep(3600)
    status = 200 if scope["path"] == "/ready" else 429  # a quick call is a refusal, as at overload
    await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": b'{"error": {"message": "overloaded"}}'})
"""

Send = Callable[[str], Awaitable[int]]


@contextlib.asynccontextmanager
async def httpx_family(module_name: str, url: str, connections: int):
    module = __import__(module_name)
    limits = module.Limits(max_connections=connections, keepalive_expiry=4.0)
    async with module.AsyncClient(base_url=url, timeout=module.Timeout(None), limits=limits) as client:

        async def send(path: str) -> int:
            response = await client.post(path, content=b'{"items": []}')
            return response.status_code

        yield send


@contextlib.asynccontextmanager
async def aiohttp_client(url: str, connections: int):
    import aiohttp

    connector = aiohttp.TCPConnector(limit=connections, keepalive_timeout=4.0)
    async with aiohttp.ClientSession(url, connector=connector, timeout=aiohttp.ClientTimeout(total=None)) as session:

        async def send(path: str) -> int:
            async with session.post(path, data=b'{"items": []}') as response:
                await response.read()
                return response.status

        yield send


CLIENTS = {
    "httpx": lambda url, n: httpx_family("httpx", url, n),
    "httpx2": lambda url, n: httpx_family("httpx2", url, n),
    "aiohttp": aiohttp_client,
}


async def one_round(name: str, url: str, held: int, calls: int, concurrency: int) -> dict[str, float]:
    async with CLIENTS[name](url, held + concurrency + 8) as send:
        holders = [asyncio.create_task(send("/hold")) for _ in range(held)]
        await asyncio.sleep(0.5 + held / 500)  # every held call connected and sent
        await send("/quick")  # warm
        queue = list(range(calls))
        statuses: Counter[int] = Counter()

        async def user() -> None:
            while queue:
                queue.pop()
                statuses[await send("/quick")] += 1

        cpu, wall = time.process_time(), time.perf_counter()
        await asyncio.gather(*(user() for _ in range(concurrency)))
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        for task in holders:
            task.cancel()
        await asyncio.gather(*holders, return_exceptions=True)
    if statuses != Counter({429: calls}):
        raise RuntimeError(f"{name}: the quick calls were answered {dict(statuses)}, not {calls} x 429")
    return {"cpu_ms_per_call": 1000 * cpu / calls, "calls_per_s": calls / wall}


@contextlib.contextmanager
def server(tmp: Path) -> Iterator[str]:
    (tmp / "held_server.py").write_text(SERVER)
    port = free_port()
    cmd = [sys.executable, "-m", "uvicorn", "held_server:app", "--port", str(port), "--log-level", "warning"]
    cmd += ["--backlog", "4096", "--app-dir", str(tmp)]
    with running(cmd, f"http://127.0.0.1:{port}/ready", timeout=60, log_path=tmp / "server.log"):
        yield f"http://127.0.0.1:{port}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--held", type=int, nargs="+", default=[0, 128, 512])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--clients", nargs="+", default=list(CLIENTS), choices=list(CLIENTS))
    parser.add_argument("--out", type=Path, default=REPO / "loadtests" / "results" / "http-client")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp, server(Path(tmp)) as url:
        for held in args.held:
            runs: dict[str, list[dict[str, float]]] = {name: [] for name in args.clients}
            for _ in range(args.rounds):
                for name in args.clients:
                    runs[name].append(asyncio.run(one_round(name, url, held, args.calls, args.concurrency)))
            base = min(r["cpu_ms_per_call"] for r in runs[args.clients[0]])
            for name, results in runs.items():
                best = min(results, key=lambda r: r["cpu_ms_per_call"])
                rows.append(
                    {"held": held, "client": name, **best, "cpu_ratio_to_first": best["cpu_ms_per_call"] / base}
                )
                print(
                    f"held {held:5d} {name:<8} {best['cpu_ms_per_call']:7.3f} ms CPU/call "
                    f"{best['calls_per_s']:8.0f} calls/s  {best['cpu_ms_per_call'] / base:5.2f}x of {args.clients[0]}"
                )
    report = {"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}
    output_path(args.out, ".json").write_text(json.dumps(report, indent=2))
    print(f"wrote {output_path(args.out, '.json')}")


if __name__ == "__main__":
    main()
