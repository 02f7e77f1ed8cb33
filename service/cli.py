"""The `genembed` command: `worker` now; `gateway` and `serve` join it with the gateway."""

from __future__ import annotations

import argparse
import logging
import sys


def _add_worker(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("worker", help="run one model worker (GENEMBED_WORKER_* variables set defaults)")
    p.add_argument("--model", help="built-in model id or a spec file (default smollm2-gircse)")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16", "float64"])
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: the spec's, else cuda when available)")
    p.add_argument("--max-running-seqs", type=int)
    p.add_argument("--max-prefill-tokens", type=int)
    p.add_argument("--max-kv-tokens", type=int)
    p.add_argument("--max-waiting-seqs", type=int)
    p.add_argument("--log-level")
    p.set_defaults(run=run_worker)


def run_worker(args: argparse.Namespace) -> int:
    import uvicorn

    from model_server.app import create_app
    from model_server.settings import WorkerSettings

    flags = {k: v for k, v in vars(args).items() if k not in ("run", "command") and v is not None}
    settings = WorkerSettings(**flags)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
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
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level)
    server = uvicorn.Server(config)
    server.run()
    if failed:
        print(f"genembed worker: {failed[0]}", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="genembed", description="Serve generative text embeddings.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_worker(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
