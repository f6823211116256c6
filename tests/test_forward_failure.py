"""A forward pass that fails (out of memory, a broken device) fails its callers, not the server."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from harness import serving

from embedserve.service.engine.runner import ThreadCount
from embedserve.v1 import embed_service_pb2


def test_a_failed_forward_fails_its_callers_and_the_server_keeps_serving(
    qwen3_embedding_folder: Path,
) -> None:
    with serving(model=qwen3_embedding_folder, warmup=False) as server:
        engine = server.engines[0]
        runner = engine._runner
        real_run = runner.run
        failures = {"left": 1}

        def failing_run(batch: Sequence[Sequence[int]], threads: ThreadCount = 0) -> np.ndarray:
            if failures["left"]:
                failures["left"] -= 1
                raise RuntimeError("simulated device failure")
            return real_run(batch, threads)

        runner.run = failing_run  # type: ignore[method-assign]
        request = embed_service_pb2.EmbedRequest(inputs=["one", "two"])
        with pytest.raises(grpc.RpcError) as failed:
            server.stubs.embed.Embed(request, timeout=30)
        assert failed.value.code() == grpc.StatusCode.INTERNAL
        assert isinstance(failed.value, grpc.Call)  # the sync stubs raise a call object
        status = rpc_status.from_call(failed.value)
        assert status is not None
        reasons = []
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                reasons.append(info.reason)
        assert reasons == ["FORWARD_FAILED"]
        stats = server.call(lambda: engine.stats)
        assert stats.forward_failures == 1 and stats.sequences_cancelled == 0
        assert server.call(lambda: engine.outstanding) == 0
        reply = server.stubs.embed.Embed(request, timeout=30)
        assert len(reply.embeddings) == 2
