"""The embedserve Python client: ``Client`` (sync) and ``AsyncClient`` (asyncio).

from embedserve.client import Client

with Client("127.0.0.1:50051") as client:
    vectors = client.embed(["hello", "world"]).vectors      # float32 (2, d)
    ranking = client.rerank("query", ["doc a", "doc b"], top_n=1)
    for item in client.embed_bulk(open("corpus.txt")):       # bounded memory, in order
        ...
"""

from embedserve.client.aio import AsyncClient, BulkItem, EmbedOptions
from embedserve.client.errors import (
    BulkItemError,
    DeadlineExceededError,
    EmbedServeError,
    FieldViolation,
    InvalidArgumentError,
    NotFoundError,
    OverloadedError,
    ServerError,
    UnauthenticatedError,
    UnavailableError,
)
from embedserve.client.results import Embeddings, RankedDocument, Ranking, Timing, Usage
from embedserve.client.retry import NO_RETRY, RetryPolicy
from embedserve.client.sync import Client

__all__ = [
    "NO_RETRY",
    "AsyncClient",
    "BulkItem",
    "BulkItemError",
    "Client",
    "DeadlineExceededError",
    "EmbedOptions",
    "EmbedServeError",
    "Embeddings",
    "FieldViolation",
    "InvalidArgumentError",
    "NotFoundError",
    "OverloadedError",
    "RankedDocument",
    "Ranking",
    "RetryPolicy",
    "ServerError",
    "Timing",
    "UnauthenticatedError",
    "UnavailableError",
    "Usage",
]
