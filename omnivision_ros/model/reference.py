"""PyTorch reference model: SigLIP vision tower + compressed projector + Qwen2 decoder.

Used for export and parity checks, and as the `torch` backend. Built from transformers' SigLIP and
Qwen2 implementations with random weights (seeded) unless weights are loaded into it.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import Qwen2Config, Qwen2ForCausalLM, SiglipVisionConfig, SiglipVisionModel

from omnivision_ros.model.config import OmniVisionConfig
from omnivision_ros.model.projector import CompressedProjector


def siglip_config(config: OmniVisionConfig) -> SiglipVisionConfig:
    return SiglipVisionConfig(
        hidden_size=config.vit_hidden,
        intermediate_size=config.vit_mlp,
        num_hidden_layers=config.vit_layers,
        num_attention_heads=config.vit_heads,
        num_channels=3,
        image_size=config.vit_image_size,
        patch_size=config.vit_patch_size,
        hidden_act="gelu_pytorch_tanh",
        layer_norm_eps=config.vit_ln_eps,
        vision_use_head=False,  # the released attention-pooling head is stored but unused
    )


def qwen2_config(config: OmniVisionConfig) -> Qwen2Config:
    return Qwen2Config(
        vocab_size=config.lm_vocab,
        hidden_size=config.lm_hidden,
        intermediate_size=config.lm_ffn,
        num_hidden_layers=config.lm_layers,
        num_attention_heads=config.lm_heads,
        num_key_value_heads=config.lm_kv_heads,
        hidden_act="silu",
        max_position_embeddings=max(config.lm_max_context, 32768),
        rms_norm_eps=config.lm_rms_eps,
        tie_word_embeddings=config.lm_tie_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": config.lm_rope_theta},
        use_sliding_window=False,
    )


@torch.no_grad()
def spread_decoder_weights(decoder: nn.Module, seed: int) -> None:
    """Re-draw the decoder's matrices with std 1/sqrt(fan_in), embeddings kept small.

    With transformers' default init (std 0.02 everywhere) and tied embeddings, a random decoder only
    echoes its last input token, so it would stop at once on <|im_end|>. Wider matrices give random
    but varied text, which exercises decoding the way real weights do. Speed does not depend on it.
    """
    generator = torch.Generator().manual_seed(seed + 1)
    for name, param in decoder.named_parameters():
        if param.dim() == 2 and "embed" not in name:
            param.copy_(torch.randn(param.shape, generator=generator) / param.shape[1] ** 0.5)


class OmniVisionReference(nn.Module):
    """Image + token ids -> logits. Ids >= lm_vocab index the image embeddings (prompt-table style)."""

    def __init__(self, config: OmniVisionConfig, seed: int | None = 0):
        super().__init__()
        config.validate()
        self.config = config
        if seed is not None:
            torch.manual_seed(seed)
        self.vision = SiglipVisionModel(siglip_config(config))
        self.projector = CompressedProjector(config)
        self.decoder = Qwen2ForCausalLM(qwen2_config(config))
        if seed is not None:
            spread_decoder_weights(self.decoder, seed)
        self.eval()

    @torch.no_grad()
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] -> [B, 81, lm_hidden]. SigLIP output = last layer + post-LayerNorm."""
        features = self.vision(pixel_values=pixel_values).last_hidden_state  # [B, 729, vit_hidden]
        return self.projector(features)

    def embed(self, ids: torch.Tensor, image_embeds: torch.Tensor | None) -> torch.Tensor:
        """ids [B, T] -> inputs_embeds [B, T, lm_hidden], splicing image rows in for ids >= vocab."""
        vocab = self.config.lm_vocab
        is_image = ids >= vocab
        token_embeds = self.decoder.get_input_embeddings()(torch.where(is_image, 0, ids))
        if not bool(is_image.any()):
            return token_embeds
        if image_embeds is None:
            raise ValueError("image positions in the ids but no image embeddings given")
        rows = torch.where(is_image, ids - vocab, 0)  # [B, T]
        picked = torch.gather(
            image_embeds, 1, rows.unsqueeze(-1).expand(-1, -1, image_embeds.shape[-1])
        )  # [B, T, H]
        return torch.where(is_image.unsqueeze(-1), picked.to(token_embeds.dtype), token_embeds)

    @torch.no_grad()
    def forward(self, ids, image_embeds=None, past_key_values=None, use_cache=True):
        """Returns (logits [B, T, vocab], past_key_values)."""
        out = self.decoder(
            inputs_embeds=self.embed(ids, image_embeds),
            past_key_values=past_key_values,
            use_cache=use_cache,
        )
        return out.logits, out.past_key_values
