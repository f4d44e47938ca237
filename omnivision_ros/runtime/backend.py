"""The small interface every inference backend implements (torch reference, ONNX Runtime, TensorRT).

A backend encodes images and opens decoder sessions; a session owns one sequence's KV cache.
Ids passed to a session follow the prompt-table convention: id >= lm_vocab selects row
(id - lm_vocab) of the image embeddings given with it.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from omnivision_ros.model.config import OmniVisionConfig


class DecoderSession(ABC):
    """One sequence: prefill (any number of times, extending it), then one-token steps."""

    length: int = 0  # tokens in the cache

    @abstractmethod
    def prefill(self, ids: np.ndarray, image_embeds: np.ndarray | None = None) -> np.ndarray:
        """Append ids [T] (image rows from image_embeds [mp_tokens, lm_hidden]); return fp32 logits [vocab] of the last."""

    @abstractmethod
    def step(self, token_id: int) -> np.ndarray:
        """Append one token; return fp32 logits [vocab]."""

    @abstractmethod
    def fork(self) -> "DecoderSession":
        """An independent session starting from a copy of this one's cache."""

    def close(self) -> None:
        """Release the cache (device memory for GPU backends)."""


class Backend(ABC):
    name: str = "backend"
    config: OmniVisionConfig
    description: str = ""  # e.g. precision and providers, for logs and diagnostics

    @abstractmethod
    def encode_images(self, pixel_values: np.ndarray) -> np.ndarray:
        """pixel_values [B, 3, S, S] float32 -> image embeddings [B, mp_tokens, lm_hidden] float32."""

    @abstractmethod
    def new_session(self) -> DecoderSession:
        """An empty decoder session."""

    def close(self) -> None:
        """Release sessions and device memory."""
