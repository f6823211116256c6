"""Faults a client can cause: streams that never read, and disconnects mid-stream."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
from harness import ServerProcess, serving, wait_until

from embedserve.service.engine.work import Lane
from embedserve.v1 import embed_service_pb2, embed_service_pb2_grpc


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_a_thousand_streams_that_never_read_stay_bounded(qwen3_embedding_folder: Path) -> None:
    """1000 streams keep sending and never read: the server stops reading each at its
    window, memory stays bounded, and other callers are still served."""
    server = ServerProcess(
        "--model", str(qwen3_embedding_folder), "--warmup", "false", "--stream-window", "4"
    )
    try:
        port = server.wait_serving()
        target = f"127.0.0.1:{port}"
        before = rss_mib(server.process.pid)

        async def scenario() -> tuple[float, int]:
            item = embed_service_pb2.EmbedStreamRequest(
                id="x", request=embed_service_pb2.EmbedRequest(inputs=["never read " * 20])
            )
            sent = 0

            async def endless(
                stream_no: int,
            ) -> AsyncIterator[embed_service_pb2.EmbedStreamRequest]:
                nonlocal sent
                for n in range(10_000):
                    sent += 1
                    yield embed_service_pb2.EmbedStreamRequest(
                        id=f"{stream_no}-{n}", request=item.request
                    )
                    await asyncio.sleep(0)

            channels = [grpc.aio.insecure_channel(target) for _ in range(10)]
            calls = []
            for i in range(1000):
                stub = embed_service_pb2_grpc.EmbedServiceStub(channels[i % 10])
                calls.append(stub.EmbedStream(endless(i)))  # never read
            # Let the flood pile up, then measure while it is still going on.
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and sent < 200_000:  # noqa: ASYNC110 - a bounded load phase
                await asyncio.sleep(0.5)
            interactive = embed_service_pb2_grpc.EmbedServiceStub(channels[0])
            reply = await interactive.Embed(
                embed_service_pb2.EmbedRequest(inputs=["still served?"]), timeout=30
            )
            assert len(reply.embeddings) == 1
            peak = rss_mib(server.process.pid)
            for call in calls:
                call.cancel()
            for channel in channels:
                await channel.close(grace=None)
            return peak, sent

        peak, sent = asyncio.run(scenario())
        print(f"offered {sent} items; RSS {before:.0f} -> {peak:.0f} MiB")
        # Requests the server read are bounded by 1000 streams x the window; far fewer
        # than were offered, and memory grows by a bounded amount.
        assert sent > 4 * 1000
        assert peak - before < 600, f"RSS grew from {before:.0f} to {peak:.0f} MiB"
        # It still serves normally once the flood is gone.
        channel = grpc.insecure_channel(target)
        stub = embed_service_pb2_grpc.EmbedServiceStub(channel)
        assert (
            len(stub.Embed(embed_service_pb2.EmbedRequest(inputs=["after"]), timeout=60).embeddings)
            == 1
        )
        channel.close()
    finally:
        server.kill()


def test_a_client_that_disconnects_mid_stream_has_its_work_dropped(
    qwen3_embedding_folder: Path,
) -> None:
    with serving(model=qwen3_embedding_folder, warmup=False, stream_window=8) as server:
        engine = server.engines[0]
        server.call(engine.hold)
        try:
            items = [
                embed_service_pb2.EmbedStreamRequest(
                    id=str(i), request=embed_service_pb2.EmbedRequest(inputs=[f"item {i}", "more"])
                )
                for i in range(8)
            ]
            call = server.stubs.embed.EmbedStream(iter(items))
            wait_until(lambda: engine.queued_sequences(Lane.BULK) == 16, what="the window queued")
            computed = server.call(lambda: engine.stats.sequences_computed)
            cancelled = server.call(lambda: engine.stats.sequences_cancelled)
            call.cancel()  # type: ignore[no-untyped-call]  # the client goes away
            wait_until(
                lambda: server.call(lambda: engine.stats.sequences_cancelled) == cancelled + 16,
                what="the stream's queued work dropped",
            )
            assert engine.queued_sequences(Lane.BULK) == 0
        finally:
            server.call(engine.release)
        reply = server.stubs.embed.Embed(
            embed_service_pb2.EmbedRequest(inputs=["next"]), timeout=30
        )
        assert len(reply.embeddings) == 1
        # Only the follow-up call was computed: the dropped stream work never ran.
        assert server.call(lambda: engine.stats.sequences_computed) == computed + 1
