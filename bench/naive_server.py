"""The NAIVE baseline: a tiny grpc.aio server doing one forward pass per request.

What a team would write in an afternoon: the same API subset (``EmbedService/Embed``, the
float32 and float32-bytes encodings), the same model folder, mean pooling, threads, weights
precision and normalization as embedserve, but no batching across requests: each request is
tokenized and run on its own, one at a time on a single worker thread.

``python -m bench.naive_server --port 0 --threads 2 [--dtype bfloat16]`` logs one JSON line
``{"message": "serving", "port": P}`` on stderr when it is ready.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np
import torch

from bench import texts as corpus
from bench.procs import DTYPES
from embedserve.service.models.loading import resolve_device
from embedserve.service.models.quantization import apply_int8
from embedserve.v1 import common_pb2, embed_service_pb2, embed_service_pb2_grpc

if TYPE_CHECKING:
    Context = grpc.aio.ServicerContext[Any, Any]
else:
    Context = grpc.aio.ServicerContext

MAX_TOKENS = 256


class NaiveEmbedder(embed_service_pb2_grpc.EmbedServiceServicer):
    """Embed only: EmbedStream answers UNIMPLEMENTED (the base class's behaviour)."""

    EmbedStream = embed_service_pb2_grpc.EmbedServiceServicer.EmbedStream

    def __init__(self, threads: int, dtype: str = "float32") -> None:
        from tokenizers import Tokenizer
        from transformers import AutoModel

        torch.set_num_threads(threads)
        folder = corpus.model_folder()
        self.model = AutoModel.from_pretrained(str(folder), local_files_only=True)
        device = resolve_device("cpu", dtype)  # the server's reading of --dtype
        self.model.to(device.dtype)
        self.model.eval()
        apply_int8(device, self.model)
        tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        tokenizer.enable_truncation(MAX_TOKENS)
        tokenizer.enable_padding()
        self.tokenizer = tokenizer
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="forward")

    def _embed(self, texts: list[str]) -> tuple[np.ndarray, int]:
        encodings = self.tokenizer.encode_batch(texts)
        ids = torch.tensor([e.ids for e in encodings])
        mask = torch.tensor([e.attention_mask for e in encodings])
        with torch.inference_mode():
            hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
            m = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9)
            vectors = torch.nn.functional.normalize(pooled.float(), p=2, dim=1).numpy()
        return vectors, int(mask.sum())

    async def Embed(  # noqa: N802 - the gRPC method name
        self, request: embed_service_pb2.EmbedRequest, context: Context
    ) -> embed_service_pb2.EmbedResponse:
        texts = list(request.inputs)
        if not texts:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "inputs must not be empty")
        loop = asyncio.get_running_loop()
        vectors, tokens = await loop.run_in_executor(self.executor, self._embed, texts)
        dims = int(vectors.shape[1])
        if request.encoding == common_pb2.ENCODING_FLOAT32_BYTES:
            embeddings = [
                common_pb2.Embedding(float32_bytes=row.astype("<f4").tobytes(), dimensions=dims)
                for row in vectors
            ]
        else:
            embeddings = [
                common_pb2.Embedding(
                    float32=common_pb2.FloatVector(values=row.tolist()), dimensions=dims
                )
                for row in vectors
            ]
        return embed_service_pb2.EmbedResponse(
            model="naive",
            embeddings=embeddings,
            usage=common_pb2.Usage(input_tokens=tokens, inputs=len(texts)),
        )


async def serve(port: int, threads: int, dtype: str = "float32") -> None:
    servicer = NaiveEmbedder(threads, dtype)
    servicer._embed([corpus.SHORT_TEXT])  # warm up
    server = grpc.aio.server()
    embed_service_pb2_grpc.add_EmbedServiceServicer_to_server(servicer, server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print(json.dumps({"message": "serving", "port": bound}), file=sys.stderr, flush=True)
    await server.wait_for_termination()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.naive_server", description=__doc__)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="weights precision")
    args = parser.parse_args(argv)
    asyncio.run(serve(args.port, args.threads, args.dtype))
    return 0


if __name__ == "__main__":
    sys.exit(main())
