"""The PyTorch reference model behind the backend interface (the `torch` backend)."""
from __future__ import annotations

import copy

import numpy as np
import torch

from omnivision_ros.model.reference import OmniVisionReference
from omnivision_ros.runtime.backend import Backend, DecoderSession


class TorchSession(DecoderSession):
    def __init__(self, model: OmniVisionReference, past=None, length: int = 0, image_embeds=None):
        self.model = model
        self.past = past
        self.length = length
        self.image_embeds = image_embeds  # [1, 81, H], kept for later image ids

    def _run(self, ids: np.ndarray) -> np.ndarray:
        ids_t = torch.from_numpy(np.array(ids, dtype=np.int64)).reshape(1, -1)
        logits, self.past = self.model(ids_t, self.image_embeds, past_key_values=self.past)
        self.length += ids_t.shape[1]
        return logits[0, -1].float().numpy()

    def prefill(self, ids, image_embeds=None):
        if image_embeds is not None:
            self.image_embeds = torch.as_tensor(np.asarray(image_embeds, dtype=np.float32))[None]
        return self._run(ids)

    def step(self, token_id):
        return self._run(np.asarray([token_id]))

    def fork(self):
        return TorchSession(self.model, copy.deepcopy(self.past), self.length, self.image_embeds)

    def close(self):
        self.past = None


class TorchBackend(Backend):
    name = "torch"

    def __init__(self, model: OmniVisionReference, threads: int | None = None):
        self.model = model.eval()
        self.config = model.config
        if threads:
            torch.set_num_threads(threads)
        self.description = f"PyTorch reference ({next(model.parameters()).dtype}, {torch.get_num_threads()} threads)"

    def encode_images(self, pixel_values):
        with torch.no_grad():
            embeds = self.model.encode_images(torch.as_tensor(np.asarray(pixel_values, dtype=np.float32)))
        return embeds.float().numpy()

    def new_session(self):
        return TorchSession(self.model)
