"""--dtype int8 on the CPU: every linear layer multiplies in int8.

Each linear layer's weights are quantized once at start-up (int8, one scale per output row).
Each call quantizes its input one row (one token) at a time, with that row's own scale,
multiplies in int8 with exact int32 sums (``torch._int_mm``), and scales back to float32.
Embeddings, layer norms, attention and pooling stay in float32.

Why per row and not PyTorch's dynamic quantization (``torch.ao``, one scale for the whole
input tensor): a token's scale then depends on every other token of the batch, so a text's
vector changed with the texts batched beside it (a cosine as low as 0.85 between a text
alone and in a batch), and one outlier token coarsened the rest (cosine to float32 as low
as 0.91). With a scale per row the integer product is exact and the rescaling is per
element, so a text's vector does not depend on its batch at all, and it stays nearer
float32. Measured on MiniLM in docs/benchmarks.md ("int8 on the CPU").
"""

from __future__ import annotations

import torch
from torch import nn

from embedserve.service.models.base import DeviceSpec, ModelLoadError

INT8_MAX = 127
_TINY = torch.finfo(torch.float32).tiny  # keeps an all-zero row's scale above zero


def require_int8_kernels() -> None:
    """Fail at start-up, not under traffic, where this torch build cannot multiply int8."""
    left = torch.tensor([[1, -2], [3, 4]], dtype=torch.int8)
    try:
        product = torch._int_mm(left, left)
    except RuntimeError as exc:
        raise ModelLoadError(f"--dtype int8: this torch build has no int8 matmul ({exc})") from exc
    if not torch.equal(product, left.int() @ left.int()):
        raise ModelLoadError("--dtype int8: this torch build's int8 matmul is wrong")


class Int8Linear(nn.Module):
    """``x @ weight.T + bias`` with int8 weights (a scale per output row) and int8 input
    rows (a scale per row, taken per call)."""

    weight_t: torch.Tensor
    weight_scale: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(dim=1).clamp(min=_TINY) / INT8_MAX
        quantized = torch.round(weight / scale[:, None]).clamp_(-INT8_MAX, INT8_MAX)
        # [in, out], row-major: the layout _int_mm multiplies fastest on the CPU.
        self.register_buffer("weight_t", quantized.to(torch.int8).t().contiguous())
        self.register_buffer("weight_scale", scale)
        bias = None if linear.bias is None else linear.bias.detach().float().clone()
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).float()
        scale = rows.abs().amax(dim=1, keepdim=True)
        scale = scale.clamp_(min=_TINY).div_(INT8_MAX)
        quantized = torch.round(rows / scale).to(torch.int8)  # within ±127 by the scale
        out = torch._int_mm(quantized, self.weight_t).float()
        out.mul_(scale).mul_(self.weight_scale)
        if self.bias is not None:
            out.add_(self.bias)
        return out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def apply_int8(device: DeviceSpec, *roots: nn.Module) -> None:
    """Convert the linear layers under ``roots`` where the server runs ``--dtype int8``."""
    if device.int8_linears:
        quantize_linears(*roots)


def quantize_linears(*roots: nn.Module) -> int:
    """Replace every ``nn.Linear`` under ``roots`` with an ``Int8Linear``, in place.

    A linear layer reachable from several roots (the packed BERT encoder shares the model's)
    is converted once, and every parent then holds the same int8 layer, so the float weights
    are freed. Returns the number of layers converted.
    """
    converted: dict[int, nn.Module] = {}
    for root in roots:
        _convert_children(root, converted)
    return len(converted)


def _convert_children(module: nn.Module, converted: dict[int, nn.Module]) -> None:
    for name, child in list(module.named_children()):
        if type(child) is nn.Linear:
            if id(child) not in converted:
                converted[id(child)] = Int8Linear(child)
            setattr(module, name, converted[id(child)])
        else:
            _convert_children(child, converted)
