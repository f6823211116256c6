"""The served models, by kind and name, built once at start-up."""

from __future__ import annotations

from dataclasses import dataclass, field

from embedserve.service.engine.engine import Engine
from embedserve.service.inference import EmbeddingModel, Reranker


class UnknownModel(LookupError):
    def __init__(self, kind: str, name: str, served: list[str]) -> None:
        self.kind = kind
        self.name = name
        listing = ", ".join(served) if served else "none"
        super().__init__(f"{kind} model {name!r} is not served (served: {listing})")


@dataclass
class ModelRegistry:
    embedders: dict[str, EmbeddingModel] = field(default_factory=dict)
    rerankers: dict[str, Reranker] = field(default_factory=dict)
    default_embedder: str = ""
    default_reranker: str = ""

    def embedder(self, name: str) -> EmbeddingModel:
        model = self.embedders.get(name or self.default_embedder)
        if model is None:
            raise UnknownModel("embedding", name, list(self.embedders))
        return model

    def reranker(self, name: str) -> Reranker:
        model = self.rerankers.get(name or self.default_reranker)
        if model is None:
            raise UnknownModel("reranker", name, list(self.rerankers))
        return model

    def engines(self) -> list[Engine]:
        engines = [m.engine for m in self.embedders.values()]
        engines += [m.engine for m in self.rerankers.values()]
        return list({id(engine): engine for engine in engines}.values())
