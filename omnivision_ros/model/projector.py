"""Compressed projector: 729 vision tokens -> 81 LM tokens (9x fewer), then a 2-layer MLP.

The grouping is contiguous: output token j is input tokens 9j..9j+8 concatenated (a plain reshape of
[B, 729, 1152] to [B, 81, 10368]), not a 3x3 spatial neighbourhood.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from omnivision_ros.model.config import OmniVisionConfig


def group_tokens(features: np.ndarray, group: int) -> np.ndarray:
    """[B, N, D] -> [B, N/group, D*group], contiguous (NumPy twin of the module's reshape)."""
    b, n, d = features.shape
    return features.reshape(b, n // group, d * group)


class CompressedProjector(nn.Module):
    def __init__(self, config: OmniVisionConfig):
        super().__init__()
        self.group = config.mp_group
        self.fc1 = nn.Linear(config.mp_in, config.mp_hidden)  # GGUF mm.0
        self.act = nn.GELU()
        self.fc2 = nn.Linear(config.mp_hidden, config.lm_hidden)  # GGUF mm.2

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        b, n, d = features.shape  # [B, 729, 1152]
        grouped = features.reshape(b, n // self.group, d * self.group)  # [B, 81, 10368]
        return self.fc2(self.act(self.fc1(grouped)))  # [B, 81, 896]
