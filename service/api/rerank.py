"""RerankService."""

from __future__ import annotations

import time

import numpy as np

from embedserve.service.api import calls
from embedserve.service.api.accounting import timing, usage
from embedserve.service.api.calls import Context
from embedserve.service.api.embed import ApiSettings
from embedserve.service.api.validation import rerank_options
from embedserve.service.inference import Scheduling
from embedserve.service.lifecycle import Lifecycle
from embedserve.service.models.tokenization import InputTooLongError
from embedserve.service.registry import ModelRegistry
from embedserve.v1 import rerank_service_pb2, rerank_service_pb2_grpc


class RerankServicer(rerank_service_pb2_grpc.RerankServiceServicer):
    def __init__(
        self, registry: ModelRegistry, lifecycle: Lifecycle, settings: ApiSettings
    ) -> None:
        self._registry = registry
        self._lifecycle = lifecycle
        self._settings = settings

    async def Rerank(  # noqa: N802 - the gRPC method name
        self,
        request: rerank_service_pb2.RerankRequest,
        context: Context,
    ) -> rerank_service_pb2.RerankResponse:
        deadline = calls.absolute_deadline(context)
        return await calls.unary(self._lifecycle, context, lambda: self._rerank(request, deadline))

    async def _rerank(
        self, request: rerank_service_pb2.RerankRequest, deadline: float | None
    ) -> rerank_service_pb2.RerankResponse:
        started = time.perf_counter()
        model = self._registry.reranker(request.model)
        options = rerank_options(
            request,
            model,
            default_truncation=self._settings.default_truncation,
            max_inputs=model.engine.limits.max_inputs_per_request,
        )
        try:
            outcome = await model.rerank(
                request.query,
                request.documents,
                options.instruction,
                options.truncation,
                Scheduling(options.lane, deadline),
            )
        except InputTooLongError as exc:
            raise calls.too_long(exc, "documents", "query") from exc
        scores = outcome.values.reshape(-1)
        # Stable, so that equal scores keep their input order.
        order = np.argsort(-scores, kind="stable")
        if options.top_n is not None:
            order = order[: options.top_n]
        results = [
            rerank_service_pb2.RerankResult(
                index=int(i),
                score=float(scores[i]),
                document=request.documents[i] if request.return_documents else None,
            )
            for i in order
        ]
        return rerank_service_pb2.RerankResponse(
            model=model.name,
            results=results,
            usage=usage(outcome, len(request.documents)),
            timing=timing(outcome, started),
        )
