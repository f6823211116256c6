"""Client subcommands of the ``embedserve`` command: embed, rerank, info, bulk."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import numpy as np
from google.protobuf import json_format

from embedserve.client.bulkfiles import BulkJob, count_inputs
from embedserve.client.errors import EmbedServeError
from embedserve.client.progress import Progress
from embedserve.client.retry import RetryPolicy
from embedserve.client.sync import Client

DEFAULT_TARGET = "127.0.0.1:50051"


def register(commands: Any) -> None:
    """Add the client subcommands to the ``embedserve`` parser."""
    embed = commands.add_parser("embed", help="embed texts", description="Embed texts.")
    _connection(embed)
    embed.add_argument("texts", nargs="+", metavar="TEXT")
    _embedding_options(embed)
    embed.add_argument("--format", choices=("json", "npy"), default="json")
    embed.add_argument("--output", type=Path, help="write here instead of standard output")
    embed.set_defaults(handler=_embed)

    rerank = commands.add_parser("rerank", help="rank documents for a query")
    _connection(rerank)
    rerank.add_argument("--query", required=True)
    rerank.add_argument("documents", nargs="+", metavar="DOC")
    rerank.add_argument("--top-n", type=int)
    rerank.add_argument("--instruction")
    rerank.add_argument("--model", default="")
    rerank.set_defaults(handler=_rerank)

    info = commands.add_parser("info", help="show the server version and its models")
    _connection(info)
    info.set_defaults(handler=_info)

    bulk = commands.add_parser(
        "bulk",
        help="embed a file of texts over a stream",
        description="Embed every text of a .txt (one a line) or .jsonl file into .npy or "
        ".jsonl, with bounded memory; --resume continues an interrupted run.",
    )
    _connection(bulk)
    bulk.add_argument("--input", type=Path, required=True)
    bulk.add_argument("--output", type=Path, required=True)
    bulk.add_argument("--field", default="text", help="the text field of .jsonl input")
    bulk.add_argument("--id-field", default="id", help="the id field of .jsonl input")
    bulk.add_argument("--resume", action="store_true", help="continue an interrupted run")
    bulk.add_argument("--batch-size", type=int, default=64)
    bulk.add_argument("--max-in-flight", type=int, default=8)
    bulk.add_argument(
        "--progress",
        choices=("auto", "always", "never"),
        default="auto",
        help="progress bar on standard error (auto: only on a terminal)",
    )
    _embedding_options(bulk)
    bulk.set_defaults(handler=_bulk)


def _connection(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("connection")
    group.add_argument(
        "--target",
        default=os.environ.get("EMBEDSERVE_TARGET", DEFAULT_TARGET),
        help=f"host:port [env EMBEDSERVE_TARGET; default {DEFAULT_TARGET}]",
    )
    group.add_argument("--timeout", type=float, default=60.0, help="seconds per call")
    group.add_argument("--tls", action="store_true", help="connect with TLS")
    group.add_argument("--root-cert", type=Path, help="PEM roots for TLS")
    group.add_argument(
        "--client-cert",
        type=Path,
        help="PEM client certificate chain, for a server or Envoy that requires one (mutual TLS)",
    )
    group.add_argument("--client-key", type=Path, help="PEM private key of --client-cert")
    group.add_argument(
        "--header",
        action="append",
        default=[],
        metavar="NAME:VALUE",
        help="metadata sent with every call (repeatable), e.g. 'authorization: Bearer KEY'",
    )
    group.add_argument("--retries", type=int, default=8, help="attempts on UNAVAILABLE/overload")


def _embedding_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("embedding options")
    group.add_argument("--model", default="")
    group.add_argument("--instruction", help="embed as queries with this instruction")
    group.add_argument("--dimensions", type=int, help="Matryoshka dimensions")
    group.add_argument("--truncation", choices=("error", "end", "start"))


def _client(args: argparse.Namespace) -> Client:
    metadata: list[tuple[str, str]] = []
    for header in args.header:
        name, sep, value = header.partition(":")
        if not sep:
            raise SystemExit(f"--header {header!r}: expected NAME:VALUE")
        metadata.append((name.strip().lower(), value.strip()))
    if (args.client_cert is None) != (args.client_key is None):
        raise SystemExit("--client-cert and --client-key go together")
    root = args.root_cert.read_bytes() if args.root_cert else None
    return Client(
        args.target,
        timeout=args.timeout,
        tls=args.tls,
        root_certificates=root,
        private_key=args.client_key.read_bytes() if args.client_key else None,
        certificate_chain=args.client_cert.read_bytes() if args.client_cert else None,
        metadata=metadata,
        retry=RetryPolicy(max_attempts=max(1, args.retries), max_backoff=2.0),
    )


def _options(args: argparse.Namespace) -> dict[str, Any]:
    options: dict[str, Any] = {"model": args.model}
    for name in ("instruction", "dimensions", "truncation"):
        value = getattr(args, name)
        if value is not None:
            options[name] = value
    return options


def run(args: argparse.Namespace) -> int:
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except EmbedServeError as exc:
        if exc.violations:
            print(f"embedserve: {exc.code.name}", file=sys.stderr)
            for violation in exc.violations:
                print(f"  {violation.field}: {violation.description}", file=sys.stderr)
        else:
            print(f"embedserve: {exc}", file=sys.stderr)
        if isinstance(exc.__cause__, EmbedServeError):
            print(f"  while retrying after: {exc.__cause__}", file=sys.stderr)
        return 1


def _embed(args: argparse.Namespace) -> int:
    with _client(args) as client:
        result = client.embed(args.texts, **_options(args))
    if args.format == "npy":
        if args.output is None and sys.stdout.isatty():
            raise SystemExit("--format npy writes binary: give --output FILE or redirect stdout")
        if args.output is not None:
            np.save(args.output, result.vectors)
        else:
            np.save(sys.stdout.buffer, result.vectors)
        return 0
    document = {
        "model": result.model,
        "dimensions": result.dimensions,
        "embeddings": result.vectors.tolist(),
        "usage": result.usage.__dict__,
        "timing": result.timing.__dict__,
    }
    _write_json(document, args.output)
    return 0


def _rerank(args: argparse.Namespace) -> int:
    with _client(args) as client:
        ranking = client.rerank(
            args.query,
            args.documents,
            top_n=args.top_n,
            instruction=args.instruction,
            model=args.model,
            return_documents=True,
        )
    _write_json(
        {
            "model": ranking.model,
            "results": [r.__dict__ for r in ranking.results],
            "usage": ranking.usage.__dict__,
        },
        None,
    )
    return 0


def _info(args: argparse.Namespace) -> int:
    with _client(args) as client:
        info = client.info()
    _write_json(json_format.MessageToDict(info, always_print_fields_with_no_presence=True), None)
    return 0


def _write_json(document: Any, output: Path | None) -> None:
    text = json.dumps(document, indent=2, ensure_ascii=False)
    if output is None:
        print(text)
    else:
        output.write_text(text + "\n", encoding="utf-8")


def _bulk(args: argparse.Namespace) -> int:
    job = BulkJob(args.input, args.output, field=args.field, id_field=args.id_field)
    total = count_inputs(args.input)
    start = job.resume_point(total) if args.resume else job.start_fresh(total)
    show = args.progress == "always" or (args.progress == "auto" and sys.stderr.isatty())
    progress = Progress(total, done=start, stream=sys.stderr if show else None)
    with _client(args) as client:
        items = client.embed_bulk_chunks(
            job.texts(skip=start),
            batch_size=args.batch_size,
            max_in_flight=args.max_in_flight,
            raise_on_error=job.output_kind == "npy",
            **_options(args),
        )
        with job.writer(start) as write:
            for chunk in items:
                write(chunk)
                progress.advance(len(chunk))
    progress.finish()
    _report(job, total, start, sys.stderr)
    return 0


def _report(job: BulkJob, total: int, start: int, stream: TextIO) -> None:
    summary = {"output": str(job.output), "items": total, "resumed_at": start}
    print(json.dumps(summary), file=stream)
