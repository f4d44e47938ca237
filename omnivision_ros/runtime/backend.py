"""The small interface every inference backend implements (torch, ONNX Runtime, TensorRT), and the
names they are chosen by.

A backend encodes images and opens decoder sessions; a session owns one sequence's KV cache.
Ids passed to a session follow the prompt-table convention: id >= lm_vocab selects row
(id - lm_vocab) of the image embeddings given with it. `DecoderSession` checks every call (ids,
image presence, context length, a closed session) before the backend runs it, so all backends refuse
bad input alike; a backend implements only `_run`, `_fork` and `_close`.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from omnivision_ros.errors import OmniVisionError
from omnivision_ros.model.config import OmniVisionConfig

# What `open_model` (and so omnivision-ask and the node) accepts; "auto" picks per model kind.
BACKENDS = ("auto", "onnxruntime", "tensorrt", "torch")
# What an exported bundle runs on; the torch backend runs presets and GGUF folders.
BUNDLE_BACKENDS = ("auto", "tensorrt", "onnxruntime")


class DecoderSession(ABC):
    """One sequence: prefill (any number of times, extending it), then one-token steps."""

    def __init__(self, config: OmniVisionConfig, max_context: int, length: int = 0, has_image: bool = False):
        self.config = config
        self.max_context = max_context  # tokens the session can hold (the backend's limit)
        self.length = length  # tokens in the cache
        self.has_image = has_image  # image embeddings were given: ids >= lm_vocab are valid
        self.closed = False

    context_hint = ""  # appended to the context-full message, e.g. how to raise the limit

    def prefill(self, ids: np.ndarray, image_embeds: np.ndarray | None = None) -> np.ndarray:
        """Append ids [T] (image rows from image_embeds [mp_tokens, lm_hidden]); return fp32 logits [vocab] of the last."""
        self._check_open()
        c = self.config
        ids = np.asarray(ids).reshape(-1)
        if ids.size == 0:
            raise OmniVisionError("prefill needs at least one token id")
        if not np.issubdtype(ids.dtype, np.integer):
            raise OmniVisionError(f"token ids must be integers, got {ids.dtype}")
        limit = c.lm_vocab + c.mp_tokens
        if ids.min() < 0 or ids.max() >= limit:
            raise OmniVisionError(f"token ids must lie in [0, {limit}), got {ids.min()}..{ids.max()}")
        if image_embeds is not None:
            image_embeds = np.asarray(image_embeds)
            if image_embeds.shape != (c.mp_tokens, c.lm_hidden):
                raise OmniVisionError(
                    f"image embeddings must be [{c.mp_tokens}, {c.lm_hidden}], got {list(image_embeds.shape)}")
            image_embeds = np.ascontiguousarray(image_embeds, dtype=np.float32)
        elif ids.max() >= c.lm_vocab and not self.has_image:
            raise OmniVisionError("image positions in the ids but no image embeddings given to this session")
        self._check_room(ids.size)
        logits = self._run(ids.astype(np.int32), image_embeds)
        self.has_image = self.has_image or image_embeds is not None
        self.length += ids.size
        return logits

    def step(self, token_id: int) -> np.ndarray:
        """Append one generated token (a text id, < lm_vocab); return fp32 logits [vocab]."""
        self._check_open()
        token = int(token_id)
        if not 0 <= token < self.config.lm_vocab:
            raise OmniVisionError(f"a generated token id must lie in [0, {self.config.lm_vocab}), got {token}")
        self._check_room(1)
        logits = self._run(np.asarray([token], np.int32), None)
        self.length += 1
        return logits

    def fork(self) -> "DecoderSession":
        """An independent session starting from a copy of this one's cache."""
        self._check_open()
        return self._fork()

    def close(self) -> None:
        """Release the cache (device memory for GPU backends). Closing twice is harmless."""
        if not self.closed:
            self.closed = True
            self._close()

    def _check_open(self) -> None:
        if self.closed:
            raise OmniVisionError("this decoder session is closed")

    def _check_room(self, new_tokens: int) -> None:
        if self.length + new_tokens > self.max_context:
            raise OmniVisionError(
                f"context full: {self.length} + {new_tokens} tokens exceed the context of {self.max_context}"
                + self.context_hint)

    @abstractmethod
    def _run(self, ids: np.ndarray, image_embeds: np.ndarray | None) -> np.ndarray:
        """Run ids [T] int32 on top of the `length` cached tokens; image_embeds [mp_tokens, H] float32 when
        given replace the session's image. Return fp32 logits [vocab] of the last position. The caller
        advances `length`."""

    @abstractmethod
    def _fork(self) -> "DecoderSession":
        """A copy of this session that shares nothing writable with it."""

    def _close(self) -> None:
        """Release what the session holds."""


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

    def check_pixels(self, pixel_values: np.ndarray) -> np.ndarray:
        """pixel_values as a [B, 3, S, S] array, or an OmniVisionError naming the expected shape."""
        s = self.config.vit_image_size
        pixels = np.asarray(pixel_values)
        if pixels.ndim != 4 or pixels.shape[1:] != (3, s, s) or pixels.shape[0] < 1:
            raise OmniVisionError(f"pixel_values must be [B, 3, {s}, {s}], got {list(pixels.shape)}")
        return pixels

    def close(self) -> None:
        """Release sessions and device memory."""
