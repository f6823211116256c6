"""Profiling a running server with py-spy, and a plain-text summary of the profile.

``record`` samples a process (every thread, Python frames, optionally native ones) into a
speedscope JSON file; ``summarise`` reads it back and reports, per thread, how busy it was,
and over all threads the top frames by self time and by inclusive time, plus a breakdown by
component (model forward, tokenizer, gRPC, protobuf, the asyncio loop, embedserve's own
code). ``python -m bench.profile FILE.speedscope.json`` prints the summary of a file.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

# First match wins, tested on a frame's file path (inclusive: any frame of the sample).
COMPONENTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("model forward (torch/transformers)", ("/transformers/", "/torch/")),
    ("tokenizer", ("models/tokenization.py", "/tokenizers/")),
    ("output encoding (numpy -> protobuf)", ("api/encoding.py",)),
    ("telemetry", ("/opentelemetry/", "service/telemetry/")),
    ("gRPC (grpc.aio, cygrpc)", ("/grpc/", "grpc._cython", "cygrpc")),
    ("protobuf", ("/google/protobuf/",)),
    ("embedserve engine (scheduler, batching)", ("service/engine/",)),
    ("embedserve api/inference", ("service/api/", "service/inference.py")),
    ("asyncio event loop", ("/asyncio/",)),
)


def py_spy() -> str | None:
    found = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    return found if Path(found).exists() else None


def record(
    pid: int, seconds: float, out: Path, *, native: bool = False, rate: int = 100
) -> subprocess.Popen[bytes]:
    """Start sampling ``pid`` for ``seconds`` into ``out`` (speedscope); wait on the result."""
    binary = py_spy()
    if binary is None:
        raise FileNotFoundError("py-spy is not installed: .venv/bin/pip install py-spy")
    command = [
        binary,
        "record",
        "--pid",
        str(pid),
        "--duration",
        str(int(seconds)),
        "--rate",
        str(rate),
        "--format",
        "speedscope",
        "--output",
        str(out),
        "--nonblocking",
    ]
    if native:
        command.append("--native")
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def dump(pid: int) -> str:
    binary = py_spy()
    if binary is None:
        return ""
    done = subprocess.run(
        [binary, "dump", "--pid", str(pid), "--nonblocking"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return done.stdout or done.stderr


def _frame_label(frame: dict[str, Any]) -> str:
    file = str(frame.get("file", ""))
    for marker in ("site-packages/", "/work/main/", "python3.11/"):
        if marker in file:
            file = file.split(marker, 1)[1]
            break
    line = frame.get("line")
    return f"{frame.get('name', '?')} ({file}{':' + str(line) if line else ''})"


def _component(files: list[str]) -> str:
    for name, markers in COMPONENTS:
        if any(marker in f for f in files for marker in markers):
            return name
    return "other"


def _most(counts: dict[str, float], top: int) -> list[tuple[str, float]]:
    return sorted(counts.items(), key=lambda kv: -kv[1])[:top]


def summarise(path: Path, top: int = 15) -> dict[str, Any]:
    data = json.loads(path.read_text())
    frames = data["shared"]["frames"]
    labels = [_frame_label(f) for f in frames]
    files = [str(f.get("file", "")) for f in frames]
    self_counts: dict[str, float] = {}
    inclusive: dict[str, float] = {}
    components: dict[str, float] = {}
    threads: dict[str, float] = {}
    total = 0.0
    samples = 0
    for profile in data["profiles"]:
        stacks = profile.get("samples", [])
        # py-spy writes weights in seconds (one sample = 1 / rate).
        weights = profile.get("weights", [1.0] * len(stacks))
        busy = 0.0
        for stack, weight in zip(stacks, weights, strict=False):
            if not stack:
                continue
            w = float(weight)
            busy += w
            samples += 1
            leaf = labels[stack[-1]]  # speedscope stacks run root -> leaf
            self_counts[leaf] = self_counts.get(leaf, 0.0) + w
            for label in {labels[i] for i in stack}:
                inclusive[label] = inclusive.get(label, 0.0) + w
            # Deepest match first: a tokenizer call under the asyncio loop is the tokenizer.
            part = _component([files[i] for i in reversed(stack)])
            components[part] = components.get(part, 0.0) + w
        threads[str(profile.get("name", "?"))] = busy
        total += busy
    if not total:
        return {"samples": 0}

    def share(n: float) -> float:
        return round(100.0 * n / total, 1)

    return {
        "samples": samples,
        "busy_seconds": round(total, 2),
        "threads_busy_s": {
            name: round(n, 2) for name, n in sorted(threads.items(), key=lambda kv: -kv[1])
        },
        "threads": {name: share(n) for name, n in sorted(threads.items(), key=lambda kv: -kv[1])},
        "components_pct": {name: share(n) for name, n in _most(components, len(components))},
        "top_self_pct": [[label, share(n)] for label, n in _most(self_counts, top)],
        "top_inclusive_pct": [[label, share(n)] for label, n in _most(inclusive, top)],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    parser.add_argument("speedscope", type=Path)
    parser.add_argument("--top", type=int, default=20)
    args = parser.parse_args(argv)
    print(json.dumps(summarise(args.speedscope, args.top), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
