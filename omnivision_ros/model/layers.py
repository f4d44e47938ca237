"""Building blocks shared by the model's stages: fused linear layers and float32-statistics norms.

Every stage is written once and used three ways: the torch backend runs it, ONNX export traces it, GGUF
weights load into it. So the modules here avoid what traces badly (no-op casts, data-dependent control
flow) and keep numerically sensitive parts in float32 when the weights are float16.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x in dtype; no Cast node in a trace when it already is (the TorchScript exporter keeps no-op casts)."""
    return x if x.dtype == dtype else x.to(dtype)


class FusedLinear(nn.Linear):
    """One matmul for several projections of the same input (q|k|v, gate|up), outputs side by side.

    `parts` names the output rows of each projection, so weights stored per projection (the GGUF files,
    transformers' modules) load into slices of the fused weight: `part("k")` is the slice of k's rows.
    """

    def __init__(self, in_features: int, parts: dict[str, int], bias: bool = True):
        super().__init__(in_features, sum(parts.values()), bias=bias)
        self.parts: dict[str, slice] = {}
        start = 0
        for name, rows in parts.items():
            self.parts[name] = slice(start, start + rows)
            start += rows

    def part(self, name: str) -> slice:
        return self.parts[name]

    def split_sizes(self) -> list[int]:
        return [s.stop - s.start for s in self.parts.values()]


class LayerNorm32(nn.LayerNorm):
    """LayerNorm with its statistics and parameters in float32 whatever the activation dtype
    (`OmniVisionModel.converted` keeps these parameters float32 in a float16 model)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.layer_norm(cast(x, torch.float32), self.normalized_shape, self.weight, self.bias, self.eps)
        return cast(y, x.dtype)


class RMSNorm(nn.Module):
    """Qwen2's RMSNorm: statistics in float32, the scale applied in the weight's dtype (as transformers does).

    The output takes the weight's dtype, not the input's: in a float16 model the residual stream it
    reads is float32 (see language_model.py) and what it feeds, a matmul, is float16."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = cast(x, torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * cast(h, self.weight.dtype)
