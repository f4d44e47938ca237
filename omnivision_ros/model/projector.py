"""Compressed projector: 729 vision tokens -> 81 LM tokens (9x fewer), then a 2-layer MLP.

The grouping is contiguous: output token j is input tokens 9j..9j+8 concatenated (a plain reshape of
[B, 729, 1152] to [B, 81, 10368]), not a 3x3 spatial neighbourhood. No norm.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from omnivision_ros.model.config import OmniVisionConfig


class CompressedProjector(nn.Module):
    def __init__(self, config: OmniVisionConfig):
        super().__init__()
        self.tokens = config.mp_tokens
        self.width = config.mp_in
        self.fc1 = nn.Linear(config.mp_in, config.mp_hidden)  # GGUF mm.0
        self.fc2 = nn.Linear(config.mp_hidden, config.lm_hidden)  # GGUF mm.2

    def group(self, features: torch.Tensor) -> torch.Tensor:
        """[B, 729, 1152] -> [B, 81, 10368]: contiguous groups of mp_group tokens."""
        return features.reshape(-1, self.tokens, self.width)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(self.group(features))))  # [B, 81, lm_hidden]; exact (erf) GELU
