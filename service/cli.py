"""The ``embedserve`` command."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence

from embedserve.service import __version__
from embedserve.service.config import ServerConfig, add_arguments, from_namespace

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
    from embedserve.client.cli import register

    register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return serve(from_namespace(args))
    from embedserve.client.cli import run

    return run(args)


def serve(config: ServerConfig) -> int:
    from embedserve.service import logs

    logs.configure(config.log_level)
    # Imported after logging is configured: loading torch and transformers is slow and chatty.
    from embedserve.service.models.base import ModelLoadError
    from embedserve.service.server import Server, build_registry

    try:
        registry = build_registry(config)
    except (ModelLoadError, ValueError, OSError) as exc:
        log.error("cannot start: %s", exc, extra={"error": type(exc).__name__})
        return 2
    return asyncio.run(_serve(config, registry, Server))


async def _serve(config: ServerConfig, registry: object, server_class: type) -> int:
    server = server_class(config, registry)
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
