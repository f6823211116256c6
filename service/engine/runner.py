"""How a batch runs on a device: padding, host-to-device copies, precision, OOM recovery.

Runs on the engine's forward workers; one runner serves them all.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable, Sequence

import numpy as np
import torch

from embedserve.service.engine.cuda_graphs import GraphedForward, shapes_for
from embedserve.service.models.base import ModelAdapter

log = logging.getLogger(__name__)

# A batch's torch threads: a count, or what to read for it before each layer.
ThreadCount = int | Callable[[], int]

# Tensor cores want the sequence dimension in multiples of 8 on the GPU.
_CUDA_WIDTH_MULTIPLE = 8


class BatchRunner:
    def __init__(self, adapter: ModelAdapter) -> None:
        self.adapter = adapter
        self.graphs: GraphedForward | None = None
        self.device = adapter.device.device
        self._cuda = self.device.type == "cuda"
        self._pad = adapter.pad_token_id
        if self._cuda:
            # Kernels are picked per shape on first use; fixed-size inputs are not the
            # case here, so let cuDNN/cuBLAS heuristics choose without benchmarking.
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
            self._stream: torch.cuda.Stream | None = torch.cuda.Stream(device=self.device)  # type: ignore[no-untyped-call]
        else:
            self._stream = None
        # torch's thread count is per calling thread: each forward worker keeps its own.
        self._threads = threading.local()
        if not self._cuda:
            # A batch's thread count may change while it runs (workers.py, SharedThreads):
            # it is read again where each layer starts.
            for module in adapter.thread_checkpoints():
                module.register_forward_pre_hook(self._follow_threads)

    def capture_graphs(self, max_rows: int, max_tokens: int) -> float:
        """Capture CUDA graphs of the forward for batches of up to ``max_rows`` rows and
        ``max_tokens`` padded tokens (``cuda_graphs.py``); the seconds it took. Raises when
        the model cannot be captured."""
        if self._stream is None:
            raise ValueError("CUDA graphs need a CUDA device")
        shapes = shapes_for(max_rows, max_tokens, self.adapter.max_input_tokens)
        graphs = GraphedForward(self.adapter.forward, self.device, self._stream, self._pad, shapes)
        seconds = graphs.capture()
        self.graphs = graphs
        return seconds

    def padded_width(self, lengths: Sequence[int]) -> int:
        width = max(lengths)
        if self._cuda:
            width = -(-width // _CUDA_WIDTH_MULTIPLE) * _CUDA_WIDTH_MULTIPLE
        return width

    def run(self, batch: Sequence[Sequence[int]], threads: ThreadCount = 0) -> np.ndarray:
        """One output row a sequence, as float32 on the host.

        ``threads``: torch threads for this batch on the CPU (0: as they are), or what to
        read for them when the batch starts and before each layer.
        """
        wanted = threads if callable(threads) else functools.partial(int, threads)
        self._set_threads(wanted())
        if not self._cuda:
            # Read by this runner's layer hooks on this thread, for this batch only.
            self._threads.wanted = wanted
            try:
                return self._forward(batch)
            finally:
                self._threads.wanted = None
        try:
            return self._forward(batch)
        except torch.cuda.OutOfMemoryError:
            if len(batch) == 1:
                raise
            # A batch the budget allowed still ran out of memory (fragmentation, another
            # process): finish it in halves rather than failing the callers.
            torch.cuda.empty_cache()
            log.warning("out of GPU memory on a batch of %d; splitting it", len(batch))
            middle = len(batch) // 2
            return np.concatenate([self.run(batch[:middle]), self.run(batch[middle:])])

    def _set_threads(self, count: int) -> None:
        if count and getattr(self._threads, "count", 0) != count:
            torch.set_num_threads(count)
            self._threads.count = count

    def _follow_threads(self, _module: torch.nn.Module, _args: object) -> None:
        wanted = getattr(self._threads, "wanted", None)
        if wanted is not None:
            self._set_threads(wanted())

    def _forward(self, batch: Sequence[Sequence[int]]) -> np.ndarray:
        width = self.padded_width([len(ids) for ids in batch])
        ids = np.full((len(batch), width), self._pad, dtype=np.int64)
        mask = np.zeros((len(batch), width), dtype=np.int64)
        for row, seq in enumerate(batch):
            ids[row, : len(seq)] = seq
            mask[row, : len(seq)] = 1
        input_ids = torch.from_numpy(ids)
        attention_mask = torch.from_numpy(mask)
        if self._stream is None:
            with torch.inference_mode():
                return self.adapter.forward(input_ids, attention_mask).float().numpy()
        with torch.cuda.stream(self._stream), torch.inference_mode():
            replayed = self.graphs.run(ids, mask) if self.graphs is not None else None
            if replayed is not None:
                out = replayed.float()
            else:
                input_ids = input_ids.pin_memory().to(self.device, non_blocking=True)
                attention_mask = attention_mask.pin_memory().to(self.device, non_blocking=True)
                out = self.adapter.forward(input_ids, attention_mask).float()
            host = out.to("cpu", non_blocking=True)
            self._stream.synchronize()
        return host.numpy()
