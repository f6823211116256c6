"""Server configuration: one table of options gives the flags, the environment
variables, their defaults and the README's configuration table."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

ENV_PREFIX = "EMBEDSERVE_"


@dataclass(frozen=True)
class ServerConfig:
    model: Path | None = None
    model_name: str | None = None
    reranker: Path | None = None
    reranker_name: str | None = None
    host: str = "127.0.0.1"
    port: int = 50051
    device: str = "auto"
    dtype: str = "auto"
    threads: int = 0
    forward_workers: int = 0  # 0: auto, from the device and the threads
    cuda_graph_tokens: int = 0
    forward_nice: int = 0
    memory_trim_interval_ms: int = 200
    max_batch_tokens: int = 8192
    max_batch_size: int = 64
    max_inputs: int = 512
    max_queue_tokens: int = 65536
    max_queue_delay_ms: int = 500
    max_calls_in_flight: int | None = None  # None: auto, from the device and the threads
    max_concurrent_rpcs: int = 1024
    max_pending_calls: int = 256
    stream_window: int = 16
    bulk_aging_ms: int = 1000
    cache_bytes: int = 0
    cache_redis_url: str | None = None
    cache_redis_ttl_s: int = 86400
    cache_redis_timeout_ms: int = 50
    max_input_tokens: int | None = None
    min_dimensions: int | None = None
    default_instruction: str | None = None
    pooling: str | None = None
    padding_free: bool = True
    truncation: str = "end"
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    api_keys: Path | None = None
    auth_exempt: str = "grpc.health.v1.Health"
    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = None
    max_message_mb: int = 16
    grace_period_s: float = 30.0
    drain_delay_s: float = 0.0
    warmup: bool = True
    gc_freeze: bool = True
    log_level: str = "info"


def _bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {value}")
    return value


def _count_or_auto(text: str) -> int | None:
    if text.strip().lower() == "auto":
        return None
    try:
        return _non_negative_int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"expected auto or a count (0 for no limit), got {text!r}"
        ) from exc


def _nice(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 19:
        raise argparse.ArgumentTypeError(f"must be from 0 to 19, got {value}")
    return value


_BYTE_UNITS = {
    "": 1,
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
}


def _byte_size(text: str) -> int:
    """Bytes: a plain integer, or with a unit (256MiB, 1GiB, 500MB)."""
    raw = text.strip().lower().replace(" ", "")
    number = raw.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = raw[len(number) :]
    if unit not in _BYTE_UNITS or not number.isdigit():
        raise argparse.ArgumentTypeError(f"expected bytes (268435456, 256MiB), got {text!r}")
    return int(number) * _BYTE_UNITS[unit]


def _non_negative_float(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {value}")
    return value


@dataclass(frozen=True)
class Option:
    name: str  # the ServerConfig field
    help: str
    parse: Callable[[str], Any] = str
    choices: Sequence[str] | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()


OPTIONS: tuple[Option, ...] = (
    Option(
        "model",
        "Embedding model folder (sentence-transformers or Qwen3-Embedding). "
        "Default: the packaged all-MiniLM-L6-v2.",
        Path,
    ),
    Option("model_name", "Name clients use for the embedding model. Default: the folder's name."),
    Option(
        "reranker",
        "Reranker folder (Qwen3-Reranker or a cross-encoder). Default: none; "
        "Rerank then uses embedding similarity.",
        Path,
    ),
    Option("reranker_name", "Name clients use for the reranker. Default: the folder's name."),
    Option("host", "Address to listen on."),
    Option("port", "Port to listen on; 0 picks a free one (logged at start).", _non_negative_int),
    Option("device", "auto, cpu, cuda or cuda:N. auto takes the GPU when there is one."),
    Option(
        "dtype",
        "Weights precision. auto: float32 on the CPU (exact), bfloat16 (or float16) on CUDA. On "
        "a CPU that multiplies bfloat16 in hardware (AMX-BF16 or AVX512-BF16; logged at start), "
        "bfloat16 served 1.65x (Intel, AMX) and 2.06x (AMD EPYC, AVX512-BF16) the calls of "
        "float32 here, at a cosine of 0.9999 to its vectors (docs/benchmarks.md). int8 (CPU "
        "only, for CPUs without bfloat16 hardware): every linear layer multiplies in int8, "
        "with a scale per token, so a text's vector does not depend on its batch; 1.9x the "
        "calls of float32 here, at a cosine of 0.990 and 91 percent of the 10 nearest "
        "documents kept.",
        choices=("auto", "float32", "float16", "bfloat16", "int8"),
    ),
    Option(
        "threads",
        "Torch intra-op threads on the CPU; 0 uses every CPU this process may use (affinity, "
        "capped by a cgroup CPU quota).",
        _non_negative_int,
    ),
    Option(
        "forward_workers",
        "Batches that may run at once, sharing the torch threads (a batch alone gets them "
        "all). 0: 2 on a CPU with 2 or more threads, else 1. More than 1 is for the CPU only.",
        _non_negative_int,
    ),
    Option(
        "cuda_graph_tokens",
        "On CUDA, replay Qwen3 batches of up to this many padded tokens from CUDA graphs "
        "captured at start (about 90 shapes up to 8192; seconds at start), instead of "
        "dispatching each kernel from Python: on an H200 a batch-1 forward of the 0.6B model "
        "took 4.7 ms replayed against 29 ms eager. Experimental: the capture is measured, the "
        "server with it not yet (docs/benchmarks.md). 0: off.",
        _non_negative_int,
    ),
    Option(
        "forward_nice",
        "Run the forward pass (and torch's worker threads) this much nicer than the event "
        "loop, so that a saturated CPU still answers and refuses calls promptly. 0 to 19.",
        _nice,
    ),
    Option(
        "memory_trim_interval_ms",
        "On the CPU, give the host memory that forward passes freed back to the system "
        "(glibc malloc_trim) once the resident set has grown since the last time by the "
        "working set of the batches running lately (a full batch's, measured by the warm-up, "
        "scaled by their tokens, and at least 0.4 of it), at most this often. Keeps the "
        "resident set flat under long bulk runs: without it, two workers' malloc arenas grew "
        "it by nearly a third over minutes here (docs/benchmarks.md). 0: off.",
        _non_negative_int,
    ),
    Option(
        "max_batch_tokens", "Token budget of one forward pass, padding included.", _positive_int
    ),
    Option("max_batch_size", "Most sequences in one forward pass.", _positive_int),
    Option(
        "max_inputs",
        "Most inputs (texts or documents) in one request or stream item.",
        _positive_int,
    ),
    Option(
        "max_queue_tokens",
        "Tokens each lane may queue; interactive calls past it get "
        "RESOURCE_EXHAUSTED, streams wait.",
        _positive_int,
    ),
    Option(
        "max_queue_delay_ms",
        "Longest expected queue wait an interactive call is admitted into (the work ahead "
        "of it, at the throughput measured on full batches); past it, RESOURCE_EXHAUSTED at "
        "once. A call whose own work is longer than a third of this may wait 3 times its own "
        "work, so that a few concurrent large calls (reranks of 100 documents) queue instead "
        "of being refused. 0: off.",
        _non_negative_int,
    ),
    Option(
        "max_calls_in_flight",
        "Unary Embed and Rerank calls in progress at once; one more is refused at once with "
        "RESOURCE_EXHAUSTED (ErrorInfo OVERLOADED, RetryInfo 100 ms) before it is handled, "
        "so a flood cannot take the CPU from the calls in progress. Streams, health checks "
        "and server info are not counted. Default (auto): 32 per torch thread on the CPU "
        "(64 on 2 cores), no limit on CUDA. 0: no limit.",
        _count_or_auto,
    ),
    Option(
        "max_concurrent_rpcs",
        "Calls (streams included) in progress at once; gRPC refuses more with "
        "RESOURCE_EXHAUSTED before any Python runs, so a flood cannot stall the server. "
        "0: no limit.",
        _non_negative_int,
    ),
    Option(
        "max_pending_calls",
        "Calls gRPC may hold for the event loop to pick up. Past half of it, gRPC's core "
        "cancels new calls at random (more as it fills), and past all of it every new call, "
        "without any Python: a flood cannot queue seconds of calls in front of the loop. "
        "Such a call fails with CANCELLED, which the Python client retries like "
        "RESOURCE_EXHAUSTED. 0: gRPC's defaults (1000 and 3000).",
        _non_negative_int,
    ),
    Option(
        "stream_window",
        "Items one stream may have in flight before the server stops reading it.",
        _positive_int,
    ),
    Option(
        "bulk_aging_ms",
        "Interactive work goes first, but bulk work gets a batch at least this often "
        "while it has work queued, so it never starves.",
        _non_negative_int,
    ),
    Option(
        "cache_bytes",
        "In-process embedding cache size in bytes (e.g. 268435456 or 256MiB); 0 turns it off. "
        "Exact matches of model, instruction, truncation and text; see 'Embedding cache'.",
        _byte_size,
    ),
    Option(
        "cache_redis_url",
        "Redis shared by replicas as a second cache tier (redis://host:6379/0, rediss://, "
        "unix://). Default: none.",
    ),
    Option("cache_redis_ttl_s", "Lifetime of a Redis cache entry in seconds.", _positive_int),
    Option(
        "cache_redis_timeout_ms",
        "Time limit of a Redis connect or reply; past it the cache is skipped, never the call.",
        _positive_int,
    ),
    Option(
        "max_input_tokens",
        "Lower the models' max input tokens. Default: each model's own.",
        _positive_int,
    ),
    Option(
        "min_dimensions",
        "Smallest MRL dimension the embedding model serves. Default: 32 "
        "for Qwen3-Embedding, the full dimension otherwise.",
        _positive_int,
    ),
    Option(
        "default_instruction",
        "Query instruction when a request gives none. Default: the "
        "model's (Qwen3's web-search task; sentence-transformers' query prompt).",
    ),
    Option("pooling", "Override the embedding pooling.", choices=("mean", "cls", "last_token")),
    Option(
        "padding_free",
        "Run models on the real tokens of a batch only, not on its padding (same vectors to "
        "about 1e-6): BERT embedders, and Qwen3 embedders and rerankers on the CPU. Here "
        "MiniLM's forward of 32 short texts of unequal lengths ran 1.3x faster and a "
        "Qwen3-0.6B-shaped one's 1.37x (2.2x on 16-512 tokens); a Qwen3 server at 64 callers "
        "served 1.66x the calls. Other models run padded.",
        _bool,
    ),
    Option(
        "truncation",
        "Truncation policy for requests that leave it unspecified.",
        choices=("error", "end", "start"),
    ),
    Option("tls_cert", "PEM certificate chain: serve TLS (with --tls-key).", Path),
    Option("tls_key", "PEM private key of --tls-cert.", Path),
    Option(
        "tls_client_ca",
        "PEM CA bundle: require client certificates it signed (mutual TLS).",
        Path,
    ),
    Option(
        "api_keys",
        "File of hashed API keys ([name=]sha256:HEX a line, see `embedserve hash-key`); calls "
        "then need 'authorization: Bearer KEY'. Re-read when it changes.",
        Path,
    ),
    Option(
        "auth_exempt",
        "Comma-separated gRPC services callable without a key (e.g. "
        "grpc.health.v1.Health,grpc.reflection.v1alpha.ServerReflection).",
    ),
    Option("metrics_host", "Address of the Prometheus /metrics endpoint."),
    Option(
        "metrics_port",
        "Port of the Prometheus /metrics endpoint; 0 picks a free one. Default: no endpoint.",
        _non_negative_int,
    ),
    Option("max_message_mb", "Largest request or response message, in MiB.", _positive_int),
    Option(
        "grace_period_s",
        "On SIGTERM, how long accepted work may take to finish.",
        _non_negative_float,
    ),
    Option(
        "drain_delay_s",
        "On SIGTERM, how long to keep accepting calls after health turns "
        "NOT_SERVING, so that balancers move away first.",
        _non_negative_float,
    ),
    Option("warmup", "Run a full-size batch before reporting SERVING.", _bool),
    Option(
        "gc_freeze",
        "Before reporting SERVING, put every object alive (the model, torch, transformers: "
        "about 400,000) out of the cycle collector's reach, so that a full collection scans "
        "only what serving created. Otherwise a full collection stops the event loop for "
        "about 190 ms on 2 cores. Frozen objects are never freed by the cycle collector.",
        _bool,
    ),
    Option("log_level", "Log level.", choices=("debug", "info", "warning", "error")),
)

_DEFAULTS = ServerConfig()


def add_arguments(
    parser: argparse.ArgumentParser, environ: Mapping[str, str] | None = None
) -> None:
    """Every option as a flag whose default comes from its environment variable."""
    environ = os.environ if environ is None else environ
    for option in OPTIONS:
        default = getattr(_DEFAULTS, option.name)
        raw = environ.get(option.env)
        if raw is not None:
            try:
                default = option.parse(raw)
            except (ValueError, argparse.ArgumentTypeError) as exc:
                parser.error(f"{option.env}={raw!r}: {exc}")
            if option.choices is not None and default not in option.choices:
                parser.error(f"{option.env}={raw!r}: choose from {', '.join(option.choices)}")
        parser.add_argument(
            option.flag,
            dest=option.name,
            type=option.parse,
            choices=option.choices,
            default=default,
            help=f"{option.help} [env {option.env}; default {getattr(_DEFAULTS, option.name)}]",
        )


def from_namespace(namespace: argparse.Namespace) -> ServerConfig:
    return ServerConfig(**{f.name: getattr(namespace, f.name) for f in fields(ServerConfig)})


def markdown_table() -> str:
    """The README's configuration table (kept true by a test)."""
    rows = ["| Flag | Environment variable | Default | Meaning |", "|---|---|---|---|"]
    for option in OPTIONS:
        default = getattr(_DEFAULTS, option.name)
        if default is None:
            shown = "—"
        elif isinstance(default, bool):
            shown = f"`{str(default).lower()}`"
        else:
            shown = f"`{default}`"
        meaning = option.help + (f" One of {', '.join(option.choices)}." if option.choices else "")
        rows.append(f"| `{option.flag}` | `{option.env}` | {shown} | {meaning} |")
    return "\n".join(rows)
