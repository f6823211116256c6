"""CUDA graphs for small batches: one replay instead of a kernel launch per operator.

An eager transformers forward dispatches about a thousand kernels from Python, and each one
releases the GIL and takes it back. On a GPU that dispatch, not the arithmetic, bounds a small
batch: Qwen3-Embedding-0.6B took 29 ms at batch 1 on an H200, against 4.7 ms replayed from a
graph, and a 64 x 64-token batch 48 against 24 ms (docs/benchmarks.md, "Where a GPU server's
time goes"). The event loop, which shares the GIL with that dispatch, gets it back too.

A graph replays the shapes it was captured at, so a batch is padded up to one of a fixed set
of shapes (``Shape``): the extra rows hold one pad token each and their outputs are dropped,
and the extra columns are right padding under the attention mask, which the models here
already run with. Every shape is captured at start, so a model that cannot be captured fails
there, not under traffic. A batch with no shape close enough (``shape_for``) runs eagerly.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

ROWS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
WIDTHS = (16, 32, 48, 64, 96, 128, 192, 256, 384, 512)
# The --cuda-graph-tokens the docs and bench/gpu_check.sh use: past about this many tokens a
# batch's arithmetic outweighs its dispatch, and it may as well run eagerly.
DEFAULT_MAX_TOKENS = 8192
# A shape may hold this many times the tokens of the batch padded to its own width...
MAX_PADDING_RATIO = 1.5
# ...or any number, below this many tokens, where the GPU's time hardly depends on the size.
SMALL_TOKENS = 2048


@dataclass(frozen=True)
class Shape:
    rows: int
    width: int

    @property
    def tokens(self) -> int:
        return self.rows * self.width


def shapes_for(max_rows: int, max_tokens: int, max_width: int) -> list[Shape]:
    """The shapes to capture, largest first (captures share one memory pool that way)."""
    shapes = [
        Shape(rows, width)
        for rows in ROWS
        for width in WIDTHS
        if rows <= max_rows and width <= max_width and rows * width <= max_tokens
    ]
    return sorted(shapes, key=lambda s: (s.tokens, s.rows), reverse=True)


def shape_for(rows: int, width: int, shapes: list[Shape]) -> Shape | None:
    """The smallest captured shape a batch of ``rows`` x ``width`` fits, if it is close enough
    in size for its padding to cost less than the dispatch it saves."""
    fitting = [s for s in shapes if s.rows >= rows and s.width >= width]
    if not fitting:
        return None
    best = min(fitting, key=lambda s: (s.tokens, s.width))
    if best.tokens <= max(SMALL_TOKENS, MAX_PADDING_RATIO * rows * width):
        return best
    return None


def pad_to(
    ids: np.ndarray, mask: np.ndarray, shape: Shape, pad_id: int
) -> tuple[np.ndarray, np.ndarray]:
    """A right-padded batch grown to ``shape``: pad columns under a zero mask, and extra rows
    of one unmasked pad token (a row with nothing to attend to would give NaN)."""
    rows, width = ids.shape
    grown_ids = np.full((shape.rows, shape.width), pad_id, dtype=np.int64)
    grown_mask = np.zeros((shape.rows, shape.width), dtype=np.int64)
    grown_ids[:rows, :width] = ids
    grown_mask[:rows, :width] = mask
    grown_mask[rows:, 0] = 1
    return grown_ids, grown_mask


class _Graph:
    """One captured shape: its static inputs, the graph, and its static output."""

    def __init__(self, shape: Shape, device: torch.device, pad_id: int) -> None:
        self.shape = shape
        self.ids = torch.full((shape.rows, shape.width), pad_id, dtype=torch.long, device=device)
        # Captured with padding in every row, so that the masked path is the one recorded
        # (a model may skip its mask when there is none).
        self.mask = torch.ones((shape.rows, shape.width), dtype=torch.long, device=device)
        if shape.width > 1:
            self.mask[:, -1] = 0
        self.graph = torch.cuda.CUDAGraph()
        self.output: torch.Tensor | None = None


class GraphedForward:
    """A model's forward replayed from CUDA graphs for batches that fit a captured shape."""

    def __init__(
        self,
        forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        device: torch.device,
        stream: torch.cuda.Stream,
        pad_id: int,
        shapes: list[Shape],
    ) -> None:
        self._forward = forward
        self._device = device
        self._stream = stream
        self._pad_id = pad_id
        self.shapes = shapes
        self._graphs: dict[Shape, _Graph] = {}
        self.replays = 0

    def capture(self) -> float:
        """Capture every shape; the seconds it took. Raises what a failed capture raises."""
        started = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        with torch.inference_mode(), torch.cuda.stream(self._stream):
            for shape in self.shapes:
                graph = _Graph(shape, self._device, self._pad_id)
                # One eager run first: lazy initialisation (cuBLAS workspaces, kernels
                # chosen per shape) must not happen inside the capture.
                self._forward(graph.ids, graph.mask)
                self._stream.synchronize()
                with torch.cuda.graph(
                    graph.graph, pool=pool, stream=self._stream, capture_error_mode="thread_local"
                ):
                    graph.output = self._forward(graph.ids, graph.mask)
                self._graphs[shape] = graph
        self._stream.synchronize()
        return time.perf_counter() - started

    def run(self, ids: np.ndarray, mask: np.ndarray) -> torch.Tensor | None:
        """The batch's outputs on the device (not yet synchronized), or None when no captured
        shape fits it. Call on the stream this was built with, in inference mode (the
        static inputs are inference tensors)."""
        rows, width = ids.shape
        shape = shape_for(rows, width, self.shapes)
        if shape is None:
            return None
        graph = self._graphs[shape]
        grown_ids, grown_mask = pad_to(ids, mask, shape, self._pad_id)
        graph.ids.copy_(torch.from_numpy(grown_ids).pin_memory(), non_blocking=True)
        graph.mask.copy_(torch.from_numpy(grown_mask).pin_memory(), non_blocking=True)
        graph.graph.replay()
        self.replays += 1
        assert graph.output is not None
        return graph.output[:rows]
