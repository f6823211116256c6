"""InfoService: the server version and what each served model accepts."""

from __future__ import annotations

from embedserve.service import __version__
from embedserve.service.api.accounting import duration
from embedserve.service.api.calls import Context
from embedserve.service.engine.engine import Engine
from embedserve.service.inference import Reranker
from embedserve.service.models.base import RerankMethod
from embedserve.service.models.tokenization import Truncation
from embedserve.service.registry import ModelRegistry
from embedserve.v1 import common_pb2, info_service_pb2, info_service_pb2_grpc

_TRUNCATION: dict[Truncation, common_pb2.TruncationPolicy.ValueType] = {
    Truncation.ERROR: common_pb2.TRUNCATION_POLICY_ERROR,
    Truncation.END: common_pb2.TRUNCATION_POLICY_END,
    Truncation.START: common_pb2.TRUNCATION_POLICY_START,
}
_RERANK_METHOD = {
    RerankMethod.CROSS_ENCODER: info_service_pb2.RERANK_METHOD_CROSS_ENCODER,
    RerankMethod.YES_NO_LOGITS: info_service_pb2.RERANK_METHOD_YES_NO_LOGITS,
    RerankMethod.EMBEDDING_SIMILARITY: info_service_pb2.RERANK_METHOD_EMBEDDING_SIMILARITY,
}


def _batching(engine: Engine) -> info_service_pb2.BatchingLimits:
    limits = engine.limits
    return info_service_pb2.BatchingLimits(
        max_batch_tokens=limits.max_batch_tokens,
        max_batch_size=limits.max_batch_size,
        max_inputs_per_request=limits.max_inputs_per_request,
        max_queue_tokens=limits.max_queue_tokens,
        stream_window=limits.stream_window,
        max_queue_delay=duration(limits.max_queue_delay_s) if limits.max_queue_delay_s else None,
        forward_workers=engine.workers.count,
    )


def describe(
    registry: ModelRegistry,
    default_truncation: Truncation,
    max_calls_in_flight: int | None = None,
) -> info_service_pb2.GetServerInfoResponse:
    truncation = _TRUNCATION[default_truncation]
    models = []
    for name, embedder in registry.embedders.items():
        adapter = embedder.adapter
        models.append(
            info_service_pb2.ModelInfo(
                name=name,
                kind=info_service_pb2.MODEL_KIND_EMBEDDING,
                is_default=name == registry.default_embedder,
                family=adapter.family,
                embedding_dimensions=adapter.dimensions,
                min_dimensions=adapter.min_dimensions,
                max_dimensions=adapter.dimensions,
                max_input_tokens=adapter.max_input_tokens,
                default_instruction=adapter.default_instruction,
                default_truncation=truncation,
                batching=_batching(embedder.engine),
                pooling=adapter.pooling,
                padding_free=adapter.padding_free,
                device=str(adapter.device.device),
                dtype=adapter.device.dtype_name,
            )
        )
    for name, reranker in registry.rerankers.items():
        models.append(_describe_reranker(name, reranker, registry, truncation))
    return info_service_pb2.GetServerInfoResponse(
        server_version=__version__, models=models, max_calls_in_flight=max_calls_in_flight
    )


def _describe_reranker(
    name: str,
    reranker: Reranker,
    registry: ModelRegistry,
    truncation: common_pb2.TruncationPolicy.ValueType,
) -> info_service_pb2.ModelInfo:
    adapter = reranker.engine.adapter
    similarity = reranker.method is RerankMethod.EMBEDDING_SIMILARITY
    return info_service_pb2.ModelInfo(
        name=name,
        kind=info_service_pb2.MODEL_KIND_RERANKER,
        is_default=name == registry.default_reranker,
        family=reranker.family,
        rerank_method=_RERANK_METHOD[reranker.method],
        embedding_model=adapter.name if similarity else "",
        max_input_tokens=adapter.max_input_tokens,
        default_instruction=reranker.default_instruction,
        default_truncation=truncation,
        batching=_batching(reranker.engine),
        padding_free=adapter.padding_free,
        device=str(adapter.device.device),
        dtype=adapter.device.dtype_name,
    )


class InfoServicer(info_service_pb2_grpc.InfoServiceServicer):
    def __init__(self, info: info_service_pb2.GetServerInfoResponse) -> None:
        self._info = info

    async def GetServerInfo(  # noqa: N802 - the gRPC method name
        self,
        request: info_service_pb2.GetServerInfoRequest,
        context: Context,
    ) -> info_service_pb2.GetServerInfoResponse:
        return self._info
