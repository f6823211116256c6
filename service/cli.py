"""The ``embedserve`` command."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from embedserve.service import __version__
from embedserve.service.config import ServerConfig, add_arguments, from_namespace

if TYPE_CHECKING:
    from embedserve.service.server import Server

log = logging.getLogger("embedserve")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="embedserve", description="Embedding and reranking over gRPC."
    )
    parser.add_argument("--version", action="version", version=f"embedserve {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser(
        "serve",
        help="run the gRPC server",
        description="Run the gRPC server. Every flag also reads an EMBEDSERVE_* "
        "environment variable.",
    )
    add_arguments(serve)
    hash_key = commands.add_parser(
        "hash-key",
        help="print an API key file line",
        description="Read an API key from standard input (never from the command line, "
        "where other users could see it) and print its line for the --api-keys file.",
    )
    hash_key.add_argument("--name", default="", help="a label for the key (logged on reload)")
    hash_key.add_argument(
        "--generate", action="store_true", help="make a new random key; print it, then its line"
    )
    from embedserve.client.cli import register

    register(commands)
    from embedserve.service import cluster

    cluster.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return serve(from_namespace(args))
    if args.command == "hash-key":
        return _hash_key(args.name, args.generate)
    if args.command == "cluster":
        from embedserve.service.cluster import run as run_cluster

        return run_cluster(args)
    from embedserve.client.cli import run

    return run(args)


def _hash_key(name: str, generate: bool) -> int:
    import secrets

    from embedserve.service.security.api_keys import hash_line

    if generate:
        key = secrets.token_urlsafe(32)
        print(key)
    else:
        key = sys.stdin.readline().strip()
        if not key:
            print("embedserve hash-key: no key on standard input", file=sys.stderr)
            return 2
    print(hash_line(key, name))
    return 0


def serve(config: ServerConfig) -> int:
    from embedserve.service import logs

    logs.configure(config.log_level)
    # Imported after logging is configured: loading torch and transformers is slow and chatty.
    from embedserve.service.models.base import ModelLoadError
    from embedserve.service.server import Server, build_registry
    from embedserve.service.telemetry.setup import Telemetry

    try:
        telemetry = Telemetry.create(metrics=config.metrics_port is not None)
        registry = build_registry(config, telemetry)
    except (ModelLoadError, ValueError, OSError) as exc:
        log.error("cannot start: %s", exc, extra={"error": type(exc).__name__})
        return 2
    return asyncio.run(_serve(lambda: Server(config, registry, telemetry)))


async def _serve(make_server: Callable[[], Server]) -> int:
    # Built inside the running loop: the server's asyncio primitives belong to it.
    try:
        server = make_server()
    except (OSError, ValueError) as exc:
        log.error("cannot start: %s", exc, extra={"error": type(exc).__name__})
        return 2
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, server.request_shutdown)
    try:
        await server.start()
    except OSError as exc:
        log.error("cannot start: %s", exc, extra={"error": type(exc).__name__})
        return 2
    await server.wait_stopped()
    return 0


if __name__ == "__main__":
    sys.exit(main())
