"""The startup freeze of the cycle collector: done by a real server before SERVING, and off
by flag."""

from __future__ import annotations

import gc
import subprocess
import sys
import textwrap
from pathlib import Path

from harness import ServerProcess, stubs_for

from embedserve.v1 import embed_service_pb2


def _frozen_line(server: ServerProcess) -> dict[str, object] | None:
    return next((e for e in server.logs if e.get("message") == "startup objects frozen"), None)


def test_a_server_freezes_its_startup_objects_before_serving(qwen3_embedding_folder: Path) -> None:
    server = ServerProcess("--model", str(qwen3_embedding_folder), "--warmup", "true")
    try:
        port = server.wait_serving()
        messages = [entry.get("message") for entry in server.logs]
        assert messages.index("startup objects frozen") < messages.index("serving")
        line = _frozen_line(server)
        assert line is not None
        # torch and transformers alone bring a six-figure count of objects.
        assert int(str(line["objects"])) > 100_000
        # The collection that follows the freeze scans only what was made after it.
        before = float(str(line["full_collection_ms_before"]))
        after = float(str(line["full_collection_ms_after"]))
        assert after < before
        stubs = stubs_for(port)
        try:
            reply = stubs.embed.Embed(
                embed_service_pb2.EmbedRequest(inputs=["still serving"]), timeout=60
            )
        finally:
            stubs.channel.close()
        assert len(reply.embeddings) == 1
    finally:
        server.kill()


def test_the_flag_turns_it_off(qwen3_embedding_folder: Path) -> None:
    server = ServerProcess(
        "--model", str(qwen3_embedding_folder), "--warmup", "false", "--gc-freeze", "false"
    )
    try:
        server.wait_serving()
        assert _frozen_line(server) is None
    finally:
        server.kill()


def test_what_is_frozen_is_out_of_the_collectors_reach() -> None:
    # In a child: a freeze here would pin this test process's objects for good.
    script = textwrap.dedent(
        """
        import gc
        from embedserve.service.python_gc import freeze_startup_objects
        kept = [[i] for i in range(50_000)]
        frozen = freeze_startup_objects()
        tracked = len(gc.get_objects())
        print(frozen, tracked)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    frozen, tracked = (int(x) for x in done.stdout.split())
    assert frozen > 50_000  # the lists above, and the interpreter's own objects
    assert tracked < 1_000  # what the collector still sees: only what came after
    assert gc.get_freeze_count() == 0  # this process was left alone
