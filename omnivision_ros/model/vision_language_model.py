"""OmniVision-968M assembled: SigLIP tower -> compressed projector -> Qwen2 decoder.

The one implementation of the model: the torch backend runs it, ONNX export traces its stages (the vision
graph is `ImageEncoder`, the decoder graph is `LanguageModel` itself), and GGUF weights load into it
(model/gguf_names.py maps the files' tensor names to its parameter names). transformers' SigLIP and Qwen2
classes are only a test oracle for it.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from omnivision_ros.model.config import OmniVisionConfig
from omnivision_ros.model.language_model import LanguageModel, rope_tables
from omnivision_ros.model.layers import LayerNorm32
from omnivision_ros.model.projector import CompressedProjector
from omnivision_ros.model.vision import VisionTower


class ImageEncoder(nn.Module):
    """pixel_values [B, 3, S, S] -> image embeddings [B, mp_tokens, lm_hidden]: the vision graph.

    A view of a model's vision tower and projector under the same attribute names, so a trace of it
    names the weights as the model does ("vision.blocks.0.qkv.weight", "projector.fc1.weight").
    """

    def __init__(self, vision: VisionTower, projector: CompressedProjector):
        super().__init__()
        self.vision = vision
        self.projector = projector

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.projector(self.vision(pixel_values))


class OmniVisionModel(nn.Module):
    """Image + token ids -> logits. Build with `random(config, seed)` or `empty(config)` (for loading)."""

    def __init__(self, config: OmniVisionConfig, dtype: torch.dtype = torch.float32):
        """Parameters allocated but not initialised; `random` and `empty` are the constructors to use."""
        super().__init__()
        config.validate()
        self.config = config
        with torch.device("meta"):  # allocate once, below, in the final dtype (nothing is drawn twice)
            self.vision = VisionTower(config)
            self.projector = CompressedProjector(config)
            self.language_model = LanguageModel(config)
        self.to(dtype)
        for module in self.modules():
            if isinstance(module, LayerNorm32):
                module.float()  # LayerNorm statistics and parameters stay float32 in a float16 model
        self.to_empty(device="cpu")
        cos, sin = rope_tables(config)
        self.language_model.cos.copy_(cos)
        self.language_model.sin.copy_(sin)
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def empty(cls, config: OmniVisionConfig, dtype: torch.dtype = torch.float32) -> "OmniVisionModel":
        """Uninitialised weights, to be overwritten (GGUF loading, a dtype conversion)."""
        return cls(config, dtype)

    @classmethod
    def random(cls, config: OmniVisionConfig, seed: int = 0) -> "OmniVisionModel":
        """Random weights of the real architecture, the same for the same config and seed."""
        model = cls(config)
        init_random(model, seed)
        return model

    @property
    def dtype(self) -> torch.dtype:
        return self.language_model.embed.dtype

    def image_encoder(self) -> ImageEncoder:
        return ImageEncoder(self.vision, self.projector)

    @torch.no_grad()
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] -> [B, mp_tokens, lm_hidden]. SigLIP output = last block + post-LayerNorm."""
        return self.projector(self.vision(pixel_values))

    @torch.no_grad()
    def forward(self, input_ids, image_embeds, position_ids, *past):
        """The decoder contract (see LanguageModel): logits of the last position and the present K/V."""
        return self.language_model(input_ids, image_embeds, position_ids, *past)

    @torch.no_grad()
    def converted(self, dtype: torch.dtype) -> "OmniVisionModel":
        """A copy in `dtype` (LayerNorms stay float32), made without a full-size intermediate copy."""
        copy = OmniVisionModel.empty(self.config, dtype)
        copy.load_state_dict(self.state_dict())  # copies convert dtypes tensor by tensor
        return copy


@torch.no_grad()
def init_random(model: OmniVisionModel, seed: int) -> None:
    """Draw every weight from a generator seeded with `seed`, in parameter order.

    Matrices get std 1/sqrt(fan_in), so activations keep their scale through the layers. In the decoder
    this matters beyond scale: with small matrices (transformers' default std 0.02) and tied embeddings a
    random decoder only echoes its last input token and stops at once on <|im_end|>; wide matrices give
    random but varied text, which exercises decoding the way real weights do. The token embedding stays
    small (std 0.02), as in trained models. Biases and norm scales are drawn near 0 and 1 rather than
    set to exactly 0 and 1, so a test catches a bias or a norm scale that is not applied.
    Speed does not depend on any of it.
    """
    generator = torch.Generator().manual_seed(seed)

    def normal(param: torch.Tensor, mean: float, std: float) -> None:
        draw = torch.randn(param.shape, generator=generator, dtype=torch.float32) * std + mean
        param.copy_(draw)

    for name, param in model.named_parameters():
        if name.endswith("embed"):
            normal(param, 0.0, 0.02)
        elif name.endswith("norm.weight") or name.endswith("norm1.weight") or name.endswith("norm2.weight"):
            normal(param, 1.0, 0.02)
        elif name.endswith("bias"):
            normal(param, 0.0, 0.02)
        elif name == "vision.position":
            normal(param, 0.0, 1.0 / math.sqrt(param.shape[1]))
        else:  # matrices and the patch kernel
            fan_in = param[0].numel()
            normal(param, 0.0, 1.0 / math.sqrt(fan_in))

