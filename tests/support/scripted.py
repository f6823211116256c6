"""A real gRPC server whose Embed fails on script, for the clients' retry and error paths."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager

import grpc
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2, status_pb2

from embedserve.v1 import embed_service_pb2, embed_service_pb2_grpc


class ScriptedEmbedServicer(embed_service_pb2_grpc.EmbedServiceServicer):
    """A real gRPC server whose Embed fails with a chosen code, counting attempts."""

    def __init__(
        self,
        code: grpc.StatusCode,
        retry_delay_s: float | None = None,
        stall_from_attempt: int | None = None,
    ) -> None:
        self.code = code
        self.retry_delay_s = retry_delay_s
        self.stall_from_attempt = stall_from_attempt
        self.attempts = 0
        self.lock = threading.Lock()

    def Embed(  # noqa: N802
        self, request: embed_service_pb2.EmbedRequest, context: grpc.ServicerContext
    ) -> embed_service_pb2.EmbedResponse:
        with self.lock:
            self.attempts += 1
            attempt = self.attempts
        if self.stall_from_attempt is not None and attempt >= self.stall_from_attempt:
            # Hold the call until the client's deadline cancels it.
            while context.is_active():
                time.sleep(0.01)
            context.abort(grpc.StatusCode.CANCELLED, "stalled")
        status = status_pb2.Status(code=self.code.value[0], message="scripted failure")
        if self.retry_delay_s is not None:
            delay = duration_pb2.Duration()
            delay.FromNanoseconds(int(self.retry_delay_s * 1e9))
            status.details.add().Pack(error_details_pb2.RetryInfo(retry_delay=delay))
        context.abort_with_status(RpcStatus(status))
        raise AssertionError("unreachable: abort raises")

    def EmbedStream(  # noqa: N802
        self,
        request_iterator: Iterator[embed_service_pb2.EmbedStreamRequest],
        context: grpc.ServicerContext,
    ) -> Iterator[embed_service_pb2.EmbedStreamResponse]:
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "not scripted")
        raise AssertionError("unreachable: abort raises")


class RpcStatus(grpc.Status):
    def __init__(self, status: status_pb2.Status) -> None:
        self.code = {c.value[0]: c for c in grpc.StatusCode}[status.code]
        self.details = status.message
        self.trailing_metadata = (("grpc-status-details-bin", status.SerializeToString()),)


@contextmanager
def scripted_server(servicer: ScriptedEmbedServicer) -> Iterator[int]:
    """Serve ``servicer`` on a loopback port for the ``with`` block; yields the port."""
    server = grpc.server(futures.ThreadPoolExecutor(4), options=[("grpc.so_reuseport", 0)])
    embed_service_pb2_grpc.add_EmbedServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield port
    finally:
        server.stop(None)
