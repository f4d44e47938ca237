"""The model's PyTorch modules behind the backend interface (the `torch` backend: presets and GGUF folders)."""
from __future__ import annotations

import numpy as np
import torch

from omnivision_ros.model.vision_language_model import OmniVisionModel
from omnivision_ros.runtime.backend import Backend, DecoderSession


class TorchSession(DecoderSession):
    def __init__(self, backend: "TorchBackend", past: list, length: int = 0, image: torch.Tensor | None = None):
        super().__init__(backend.config, backend.config.lm_max_context, length, has_image=image is not None)
        self.backend = backend
        self.past = past  # [1, kv, length, hd] per layer, keys and values alternating (decoder input order)
        self.image = image  # [1, mp_tokens, H], kept for later image ids

    def _run(self, ids: np.ndarray, image_embeds: np.ndarray | None) -> np.ndarray:
        if image_embeds is not None:
            self.image = torch.from_numpy(image_embeds)[None]
        table = self.image if self.image is not None else self.backend.no_image
        positions = torch.arange(self.length, self.length + ids.size, dtype=torch.int32)[None]
        with torch.inference_mode():
            logits, *self.past = self.backend.model(torch.from_numpy(ids)[None], table, positions, *self.past)
        return logits[0].numpy()

    def _fork(self):
        # Steps build new cache tensors (torch.cat) and never write old ones: the fork can share them.
        return TorchSession(self.backend, list(self.past), self.length, self.image)

    def _close(self):
        self.past = None


class TorchBackend(Backend):
    name = "torch"

    def __init__(self, model: OmniVisionModel, threads: int | None = None):
        self.model = model.eval()
        self.config = c = model.config
        if threads:
            torch.set_num_threads(threads)
        dtype = model.dtype
        self.no_image = torch.zeros(1, c.mp_tokens, c.lm_hidden, dtype=dtype)  # the contract always takes a table
        self.empty_past = [torch.zeros(1, c.lm_kv_heads, 0, c.lm_head_dim, dtype=dtype)] * (2 * c.lm_layers)
        self.description = f"PyTorch ({dtype}, {torch.get_num_threads()} threads)"

    def encode_images(self, pixel_values):
        pixels = self.check_pixels(pixel_values)
        with torch.inference_mode():
            embeds = self.model.encode_images(torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32)))
        return embeds.float().numpy()

    def new_session(self):
        return TorchSession(self, list(self.empty_past))
