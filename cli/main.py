"""The `genembed` command: `worker` (one model), `gateway` (the API in front of workers), and
`serve` (both on one machine: a worker child process per model, then the gateway)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import secrets
import shutil
import signal
import sys
import tempfile

from pydantic import SecretStr

from cli.supervisor import Supervisor, Worker, free_port, wait_ready
from common.logs import configure_logging
from model_server.specs import DEFAULT_MODEL
from service.settings import GatewaySettings

#: the niceness `serve` gives its workers unless GENEMBED_WORKER_NICE says otherwise: on cores they share with the
#: gateway, a busy worker must not leave the gateway's event loop (every request's parsing and answer) behind:
#: in load scenario (d) a starved gateway answered minilm requests 25 s after they came (docs/benchmarks.md)
SERVE_WORKER_NICE = 5


def _add_worker(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("worker", help="run one model worker (GENEMBED_WORKER_* variables set defaults)")
    p.add_argument("--model", help="built-in model id or a spec file (default smollm2-gircse)")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16", "float64"])
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: the spec's, else cuda when available)")
    p.add_argument("--max-running-seqs", type=int)
    p.add_argument("--max-batch-tokens", type=int)
    p.add_argument("--max-kv-tokens", type=int)
    p.add_argument("--max-waiting-seqs", type=int)
    p.add_argument("--log-level")
    p.add_argument("--log-format", choices=["text", "json"], help="json: one object per line (default text)")
    p.set_defaults(run=run_worker)


def run_worker(args: argparse.Namespace) -> int:
    from model_server import threads

    # OpenMP reads its variables when torch loads, and a thread inherits its niceness when it starts (Linux keeps
    # one per thread; importing torch starts one): both are set before the imports below.
    try:
        threads.configure(
            os.environ.get("GENEMBED_WORKER_OMP", "auto"),
            os.environ.get("GENEMBED_WORKER_NICE", "0"),
            os.environ.get("GENEMBED_WORKER_CPUS", ""),
        )
    except ValueError as exc:
        print(f"genembed worker: {exc}", file=sys.stderr)
        return 2

    import uvicorn

    from common.drain import DrainingServer
    from model_server.app import create_app
    from model_server.settings import WorkerSettings

    flags = {k: v for k, v in vars(args).items() if k not in ("run", "command") and v is not None}
    try:
        settings = WorkerSettings(**flags)
    except ValueError as exc:  # pydantic's ValidationError names the setting and what it allows
        print(f"genembed worker: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format)
    logging.getLogger("genembed.worker").info(threads.describe(settings.omp))
    server: uvicorn.Server | None = None
    failed: list[BaseException] = []

    def on_fatal(exc: BaseException) -> None:
        failed.append(exc)
        if server is not None:
            server.should_exit = True

    try:
        app = create_app(settings, on_fatal=on_fatal)
    except ValueError as exc:  # a bad spec name or file
        print(f"genembed worker: {exc}", file=sys.stderr)
        return 2
    # log_config=None: uvicorn's loggers use ours (the format, the request id); /embed logs its own lines.
    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, log_level=settings.log_level, log_config=None, access_log=False
    )
    server = DrainingServer(config, app.state.drain)  # SIGTERM: /ready false, in-flight /embed calls finish
    server.run()
    if failed:
        print(f"genembed worker: {failed[0]}", file=sys.stderr)
        return 1
    return 0


def _add_gateway_flags(p: argparse.ArgumentParser) -> None:
    """Flags shared by `gateway` and `serve`; every other setting is a GENEMBED_* variable."""
    p.add_argument("--host", help="default 127.0.0.1")
    p.add_argument("--port", type=int, help="default 8000")
    p.add_argument("--redis-url", help="cache in Redis (redis://, rediss://); default: in memory")
    p.add_argument("--api-keys-file", help="accepted API keys, one per line")
    p.add_argument("--request-timeout-s", type=float, help="deadline of one request (default 30)")
    p.add_argument("--log-level")
    p.add_argument("--log-format", choices=["text", "json"], help="json: one object per line (default text)")


def _add_gateway(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("gateway", help="run the OpenAI-compatible gateway in front of running workers")
    p.add_argument(
        "--worker",
        dest="workers",
        action="append",
        metavar="MODEL=URL",
        help="repeatable; MODEL is the name clients send",
    )
    _add_gateway_flags(p)
    p.set_defaults(run=run_gateway)


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="start a worker per --model and the gateway in front of them")
    p.add_argument(
        "--model", dest="models", action="append", metavar="SPEC", help=f"repeatable (default {DEFAULT_MODEL})"
    )
    p.add_argument(
        "--replicas", type=int, default=1, metavar="N", help="workers per --model, each on its own port (default 1)"
    )
    p.add_argument("--ready-timeout", type=float, default=600, help="seconds to wait for the workers to load")
    p.add_argument(
        "--cpu-split",
        choices=["turns", "even", "off"],
        default="turns",
        help="how several CPU workers share this machine's CPUs (docs/gateway.md). turns: each keeps every CPU and "
        "they take turns, one engine pass at a time (GENEMBED_WORKER_CPU_TURNS); even: with at least as many CPUs "
        "as workers, each gets an equal share to itself (GENEMBED_WORKER_CPUS), so a worker alone uses only its "
        "share; off: they compute at once. even is ignored when GENEMBED_WORKER_CPUS or OMP_NUM_THREADS is set "
        "(default turns)",
    )
    _add_gateway_flags(p)
    p.set_defaults(run=run_serve)


def split_cpus(cpus: list[int], workers: int) -> list[str] | None:
    """Each worker's share of `cpus` as GENEMBED_WORKER_CPUS, in equal contiguous parts (the remainder to the first
    ones); None when there are fewer CPUs than workers or one worker. Workers whose OpenMP threads share cores slow
    each other's steps by more than their share (one waits at each parallel region's end for a thread the other
    preempted), and each admits by its own measured step times, which a neighbour's burst changes after the fact:
    in load scenario (d) that was most of the accepted-then-late answers."""
    if workers < 2 or len(cpus) < workers:
        return None
    size, extra = divmod(len(cpus), workers)
    parts, start = [], 0
    for i in range(workers):
        end = start + size + (i < extra)
        parts.append(",".join(map(str, cpus[start:end])))
        start = end
    return parts


def _gateway_settings(args: argparse.Namespace, **extra: object) -> GatewaySettings:
    skip = ("run", "command", "models", "ready_timeout", "replicas", "cpu_split")
    flags = {k: v for k, v in vars(args).items() if k not in skip and v is not None}
    return GatewaySettings(**flags, **extra)


def _run_gateway(settings: GatewaySettings) -> int:
    import uvicorn

    from common.drain import DrainingServer
    from service.app import create_app
    from service.cache import check_redis

    configure_logging(settings.log_level, settings.log_format)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per worker call and probe
    try:
        asyncio.run(check_redis(settings))  # credentials Redis refuses: no start
        app = create_app(settings)
    except (ValueError, OSError) as exc:  # bad --worker entries, unreadable keys file, Redis refused us
        print(f"genembed gateway: {exc}", file=sys.stderr)
        return 2
    # log_config=None: uvicorn's loggers use ours; the app writes one access line per request, with its id.
    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, log_level=settings.log_level, log_config=None, access_log=False
    )
    DrainingServer(config, app.state.drain).run()  # SIGTERM: /ready false, 503 for new requests, in-flight finish
    return 0


def run_gateway(args: argparse.Namespace) -> int:
    try:
        settings = _gateway_settings(args)
    except ValueError as exc:  # pydantic's ValidationError: the settings name what is wrong
        print(f"genembed gateway: {exc}", file=sys.stderr)
        return 2
    return _run_gateway(settings)


def run_serve(args: argparse.Namespace) -> int:
    """Workers first, then the gateway in the foreground. On SIGTERM the gateway drains first (its in-flight
    requests finish on the workers), then the workers are stopped: the order that drops nothing."""

    def interrupted(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, interrupted)  # uvicorn takes it over while serving, then re-raises it
    if args.replicas < 1:
        print("genembed serve: --replicas must be at least 1", file=sys.stderr)
        return 2
    supervisor = Supervisor()
    turns_dir = None  # holds the lock file and ledger of workers that take turns at shared CPUs (threads.CpuTurns)
    try:
        # The workers answer only this gateway: the configured token, else one made for this run (in the
        # environment, not on a command line other users can read).
        settings = _gateway_settings(args)
        settings.worker_token = token = settings.worker_token or SecretStr(secrets.token_urlsafe(32))
        env = {**os.environ, "GENEMBED_WORKER_TOKEN": token.get_secret_value()}
        env.setdefault("GENEMBED_WORKER_NICE", str(SERVE_WORKER_NICE))
        models = [m for m in args.models or [DEFAULT_MODEL] for _ in range(args.replicas)]
        shares: list[str | None] = [None] * len(models)
        if args.cpu_split == "even" and not {"GENEMBED_WORKER_CPUS", "OMP_NUM_THREADS"} & env.keys():
            shares = split_cpus(sorted(os.sched_getaffinity(0)), len(models)) or shares
        shared = len(models) > 1 and shares[0] is None and "GENEMBED_WORKER_CPUS" not in env
        if shared and args.cpu_split != "off" and "GENEMBED_WORKER_CPU_TURNS" not in env:
            turns_dir = tempfile.mkdtemp(prefix="genembed-cpu-turns-")
            env["GENEMBED_WORKER_CPU_TURNS"] = os.path.join(turns_dir, "turns")
        for model, cpus in zip(models, shares, strict=True):
            cmd = [sys.executable, "-m", "cli.main", "worker", "--model", model, "--host", "127.0.0.1"]
            cmd += ["--log-format", args.log_format] if args.log_format else []
            cmd += ["--log-level", args.log_level] if args.log_level else []  # serve's level is its workers' too
            own = env if cpus is None else {**env, "GENEMBED_WORKER_CPUS": cpus}
            supervisor.workers.append(Worker(cmd, free_port(), own))
        headers = settings.worker_headers()
        named = [f"{wait_ready(w.url, w.proc, args.ready_timeout, headers)}={w.url}" for w in supervisor.workers]
        supervisor.watch()
        return _run_gateway(_gateway_settings(args, workers=named, worker_token=token))
    except ValueError as exc:  # pydantic's ValidationError: the settings name what is wrong
        print(f"genembed serve: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        print(f"genembed serve: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        supervisor.stop()
        if turns_dir:
            shutil.rmtree(turns_dir)


def _add_train(sub: argparse._SubParsersAction) -> None:
    from model_server.training.config import add_train_arguments

    p = sub.add_parser("train", help="train a gircse LoRA adapter with ICR (docs/training.md)")
    add_train_arguments(p)
    p.set_defaults(run=run_train)


def run_train(args: argparse.Namespace) -> int:
    from model_server.loading import ModelLoadError
    from model_server.training.config import config_from_args
    from model_server.training.icr import train

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        adapter = train(config_from_args(args))
    except (ValueError, ModelLoadError) as exc:  # bad settings, a run that cannot resume, missing weights
        print(f"genembed train: {exc}", file=sys.stderr)
        return 2
    print(f'adapter: {adapter}  (a spec loads it with adapter = "{adapter}")')
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="genembed", description="Serve generative text embeddings.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_worker(sub)
    _add_gateway(sub)
    _add_serve(sub)
    _add_train(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
