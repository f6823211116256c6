"""--max-calls-in-flight: the server's bound on unary work calls in progress.

The engine is held while a test fills the bound, so which calls are in progress is
decided by the test, not by how fast this machine computes.
"""

from __future__ import annotations

import threading
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from harness import InProcessServer, serving, wait_until
from test_config import parse
from test_deadlines_overload import embed_request, held, rejection_of
from test_telemetry import scrape, value

from embedserve.client.errors import OverloadedError, from_rpc_error
from embedserve.service.api.in_flight import (
    CALLS_PER_CPU_THREAD,
    RETRY_DELAYS_S,
    TARGET_REFUSALS_PER_S,
    RetryPacing,
    default_limit,
)
from embedserve.service.engine.work import Lane
from embedserve.service.server import torch_threads
from embedserve.v1 import embed_service_pb2, info_service_pb2, rerank_service_pb2


def in_flight(server: InProcessServer) -> int:
    limit = server.server.in_flight
    assert limit is not None
    return server.call(lambda: limit.in_flight)


def outstanding(server: InProcessServer) -> int:
    (engine,) = server.engines
    return server.call(lambda: engine.outstanding)


def code_of(future: grpc.Future) -> grpc.StatusCode:  # type: ignore[type-arg]
    error = future.exception()
    if error is None:
        return grpc.StatusCode.OK
    assert isinstance(error, grpc.Call)
    return error.code()


def error_details(error: grpc.RpcError) -> tuple[error_details_pb2.ErrorInfo, float]:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None
    info, retry = error_details_pb2.ErrorInfo(), error_details_pb2.RetryInfo()
    kinds = []
    for detail in status.details:
        for message in (info, retry):
            if detail.Is(message.DESCRIPTOR):
                detail.Unpack(message)
                kinds.append(type(message).__name__)
    assert sorted(kinds) == ["ErrorInfo", "RetryInfo"]
    return info, retry.retry_delay.ToNanoseconds() / 1e9


def test_a_call_past_the_limit_is_refused_before_the_engine_while_the_rest_is_served(
    qwen3_embedding_folder: Path,
) -> None:
    with serving(
        model=qwen3_embedding_folder, warmup=False, metrics_port=0, max_calls_in_flight=2
    ) as server:
        stubs = server.stubs
        with held(server) as engine:
            accepted = [
                stubs.embed.Embed.future(embed_request([f"text {n}"]), timeout=60) for n in range(2)
            ]
            wait_until(lambda: outstanding(server) == 2, what="two calls in the engine")

            refused = rejection_of(stubs.embed.Embed.future(embed_request(["one more"])))
            assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "2 calls in progress" in (refused.details() or "")
            # Trailers-only, so that a proxy can act on it.
            assert isinstance(refused, grpc.Call)
            assert [key for key, _ in refused.initial_metadata() or ()] == []
            info, retry_after = error_details(refused)
            assert (info.reason, info.domain) == ("OVERLOADED", "embedserve")
            assert dict(info.metadata) == {
                "limit": "max_calls_in_flight",
                "max_calls_in_flight": "2",
            }
            assert retry_after == pytest.approx(0.1)
            # The Python client reads the same details.
            client_error = from_rpc_error(refused)
            assert isinstance(client_error, OverloadedError)
            assert (client_error.reason, client_error.domain) == ("OVERLOADED", "embedserve")
            assert client_error.metadata == dict(info.metadata)
            assert client_error.retry_after == pytest.approx(0.1)
            rerank = rejection_of(
                stubs.rerank.Rerank.future(
                    rerank_service_pb2.RerankRequest(query="q", documents=["d"])
                )
            )
            assert rerank.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert server.call(lambda: engine.stats.requests_rejected) == 0

            # Neither the balancer's health check nor server info is counted.
            health = health_pb2_grpc.HealthStub(stubs.channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=10
            )
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            info_reply = stubs.info.GetServerInfo(
                info_service_pb2.GetServerInfoRequest(), timeout=10
            )
            assert info_reply.models
            # ... and tells clients the limit, so that they can size their concurrency.
            assert info_reply.HasField("max_calls_in_flight")
            assert info_reply.max_calls_in_flight == 2
            # Nor is a bulk stream: its item reaches the bulk lane.
            stream = stubs.embed.EmbedStream(
                iter([embed_service_pb2.EmbedStreamRequest(id="s1", request=embed_request(["b"]))]),
                timeout=60,
            )
            wait_until(
                lambda: server.call(lambda: engine.queued_sequences(Lane.BULK)) == 1,
                what="the stream's item to be queued",
            )
            assert in_flight(server) == 2

        assert [len(f.result(timeout=60).embeddings) for f in accepted] == [1, 1]
        assert [item.id for item in stream] == ["s1"]
        assert in_flight(server) == 0
        assert len(stubs.embed.Embed(embed_request(["after"]), timeout=60).embeddings) == 1

        assert server.server.metrics_port is not None
        series = scrape(server.server.metrics_port)
        assert value(series, "embedserve_in_flight_refusals_total") == 2
        assert value(series, "embedserve_calls_in_flight_limit") == 2
        assert value(series, "embedserve_calls_in_flight") == 0
        assert value(series, "embedserve_in_flight_retry_delay_seconds") == pytest.approx(0.1)
        refusals = value(series, "embedserve_requests_total", code="RESOURCE_EXHAUSTED")
        assert refusals == 2


def test_calls_that_fail_expire_or_are_cancelled_give_their_slot_back(
    qwen3_embedding_folder: Path,
) -> None:
    with serving(model=qwen3_embedding_folder, warmup=False, max_calls_in_flight=1) as server:
        embed = server.stubs.embed.Embed
        with pytest.raises(grpc.RpcError) as invalid:
            embed(embed_request([]), timeout=60)
        assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        # An error's status is sent by context.abort before the handler unwinds, so the
        # client can see it a moment before the slot is counted down: wait, do not race.
        wait_until(lambda: in_flight(server) == 0, what="the failed call's slot")
        with held(server):
            with pytest.raises(grpc.RpcError) as expired:
                embed(embed_request(["too late"]), timeout=0.5)
            assert expired.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            wait_until(lambda: in_flight(server) == 0, what="the expired call's slot")

            cancelled = embed.future(embed_request(["cancel me"]), timeout=60)
            wait_until(lambda: outstanding(server) == 1, what="the call in the engine")
            assert cancelled.cancel()  # type: ignore[no-untyped-call]
            wait_until(lambda: in_flight(server) == 0, what="the cancelled call's slot")
        # The one slot is free again: a call is admitted and computed.
        assert len(embed(embed_request(["admitted"]), timeout=60).embeddings) == 1


def test_the_default_limit_follows_the_cpu_threads() -> None:
    assert default_limit(on_cuda=False, cpu_threads=2) == 2 * CALLS_PER_CPU_THREAD == 64
    assert default_limit(on_cuda=False, cpu_threads=1) == 32
    assert default_limit(on_cuda=False, cpu_threads=0) == 32
    assert default_limit(on_cuda=True, cpu_threads=16) == 0  # not measured on a GPU yet


def test_the_server_resolves_auto_and_zero(qwen3_embedding_folder: Path) -> None:
    with serving(model=qwen3_embedding_folder, warmup=False) as server:
        limit = server.server.in_flight
        assert limit is not None
        # The threads the forward workers share, not the loading thread's one.
        assert limit.limit == CALLS_PER_CPU_THREAD * torch_threads(server.config) == 64
    with serving(model=qwen3_embedding_folder, warmup=False, max_calls_in_flight=0) as server:
        assert server.server.in_flight is None
        info = server.stubs.info.GetServerInfo(info_service_pb2.GetServerInfoRequest(), timeout=10)
        assert not info.HasField("max_calls_in_flight")  # no limit: unset, not 0
        # Without the limit, many held calls are all accepted into the engine.
        with held(server):
            calls = [
                server.stubs.embed.Embed.future(embed_request([f"t{n}"]), timeout=60)
                for n in range(3)
            ]
            wait_until(lambda: outstanding(server) == 3, what="three calls in the engine")
        assert all(len(c.result(timeout=60).embeddings) == 1 for c in calls)


def test_the_flag_takes_auto_or_a_count() -> None:
    assert parse([]).max_calls_in_flight is None
    assert parse(["--max-calls-in-flight", "auto"]).max_calls_in_flight is None
    assert parse(["--max-calls-in-flight", "0"]).max_calls_in_flight == 0
    assert parse([], {"EMBEDSERVE_MAX_CALLS_IN_FLIGHT": "96"}).max_calls_in_flight == 96
    for bad in ("-1", "many"):
        with pytest.raises(SystemExit):
            parse(["--max-calls-in-flight", bad])


def test_concurrent_refusals_never_exceed_the_limit(qwen3_embedding_folder: Path) -> None:
    # A burst from many threads at once: at most the limit is ever admitted while held.
    with serving(model=qwen3_embedding_folder, warmup=False, max_calls_in_flight=3) as server:
        with held(server):
            start = threading.Barrier(12)
            futures: list[grpc.Future] = []  # type: ignore[type-arg]
            lock = threading.Lock()

            def send(n: int) -> None:
                start.wait()
                future = server.stubs.embed.Embed.future(embed_request([f"b{n}"]), timeout=60)
                with lock:
                    futures.append(future)

            threads = [threading.Thread(target=send, args=(n,)) for n in range(12)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            wait_until(lambda: sum(f.done() for f in futures) == 9, what="nine of twelve refused")
            assert outstanding(server) == 3
            codes = {code_of(f) for f in futures if f.done()}
            assert codes == {grpc.StatusCode.RESOURCE_EXHAUSTED}
        for future in futures:
            wait_until(future.done, timeout=60, what="every call to end")
        assert sum(code_of(f) == grpc.StatusCode.OK for f in futures) == 3


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def retry_for(pacing: RetryPacing, clock: FakeClock, callers: int, seconds: float) -> float:
    """``callers`` refused callers, each retrying after the delay it was told, for
    ``seconds``; the delay the last refusal carried."""
    end = clock.now + seconds
    while clock.now < end:
        clock.now += pacing.delay / callers  # the refusal rate the current delay makes
        level = pacing.refused()
    return RETRY_DELAYS_S[level]


def test_the_retry_delay_spreads_waiting_callers_over_the_target_rate() -> None:
    clock = FakeClock()
    pacing = RetryPacing(clock)
    assert pacing.delay == RETRY_DELAYS_S[0] == 0.1  # Envoy's, while few are refused
    # 5 callers every 100 ms: 50 refusals a second, under the target; the delay stays.
    assert retry_for(pacing, clock, 5, 3) == 0.1
    # 192 callers every 100 ms: 1,920 a second. 1.92 s would spread them to the target
    # (100 a second); the first delay at least that long is 3.2 s, and it holds.
    assert TARGET_REFUSALS_PER_S == 100
    assert retry_for(pacing, clock, 192, 10) == 3.2
    # Half of them gone: 96 want 0.96 s, so 1.6 s.
    assert retry_for(pacing, clock, 96, 10) == 1.6
    # A quiet window, then one refusal: back to the first delay.
    clock.now += 10
    assert pacing.refused() == 0


def test_a_refusal_carries_the_paced_delay(qwen3_embedding_folder: Path) -> None:
    with serving(
        model=qwen3_embedding_folder, warmup=False, metrics_port=0, max_calls_in_flight=1
    ) as server:
        limit = server.server.in_flight
        assert limit is not None
        server.call(lambda: setattr(limit.pacing, "level", 3))  # as after a storm of retries
        with held(server):
            accepted = server.stubs.embed.Embed.future(embed_request(["a"]), timeout=60)
            wait_until(lambda: outstanding(server) == 1, what="one call in the engine")
            refused = rejection_of(server.stubs.embed.Embed.future(embed_request(["b"])))
            _, retry_after = error_details(refused)
            assert retry_after == pytest.approx(RETRY_DELAYS_S[3])
            assert from_rpc_error(refused).retry_after == pytest.approx(0.8)
            assert server.server.metrics_port is not None
            series = scrape(server.server.metrics_port)
            assert value(series, "embedserve_in_flight_retry_delay_seconds") == pytest.approx(0.8)
        assert len(accepted.result(timeout=60).embeddings) == 1
