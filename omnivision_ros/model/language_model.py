"""Qwen2 decoder (Qwen2.5-0.5B): RoPE tables, grouped-query attention, the prompt-table image splice,
and the KV cache passed in and out as tensors.

`LanguageModel.forward` is the decoder graph contract itself (DESIGN §3): token ids (int32), the image
table, positions and the past K/V of every layer in; float32 logits of the last position and the present
K/V out. One call serves prefill (many tokens, empty past) and decode (one token, long past). Ids >= lm_vocab
select row (id - lm_vocab) of the image table instead of a token embedding (TensorRT-LLM's prompt table).

float16 safety (the GPU graphs): whatever the weights' dtype, the residual stream, the norms' statistics,
the attention scores (Q.K^T and softmax) and the logits are float32; only the matmul inputs, the weights and
the KV cache take the model's dtype. Qwen2-family checkpoints carry "massive activations" in a few residual
channels, and float16 tops out at 65504: a float16 residual add or Q.K^T overflows to inf and the next norm
turns it into NaN (QwenLM/Qwen2 issues 761, 868, 826; llama.cpp PR 8412 moved Qwen2's Q.K^T to float32 for
the same reason). In a float32 model every cast below is a no-op and leaves no node in the graph.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from omnivision_ros.model.config import OmniVisionConfig
from omnivision_ros.model.layers import FusedLinear, RMSNorm, cast

# Masked scores get the lowest float16 value, never -inf: -inf - -inf = NaN in fused fp16 kernels.
MASK_VALUE = float(torch.finfo(torch.float16).min)


def rope_tables(config: OmniVisionConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [lm_max_context, head_dim] in float32 (precomputed rather than exported as trigonometry).

    The angles are transformers' Qwen2 float32 angles; cos/sin are taken in float64 by NumPy and rounded: torch's
    cos/sin took different kernel paths in different process states (float32 results up to 1.5e-4
    apart at angles of a few hundred radians), and an exported table must not depend on that."""
    dim = config.lm_head_dim
    inv_freq = 1.0 / (config.lm_rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    freqs = torch.arange(config.lm_max_context).float()[:, None] * inv_freq[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    angles = emb.numpy().astype(np.float64)  # NumPy: one code path whatever torch's thread state
    return torch.from_numpy(np.cos(angles).astype(np.float32)), torch.from_numpy(np.sin(angles).astype(np.float32))


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, half: int) -> torch.Tensor:
    """Rotate-half RoPE (Qwen2 / Llama layout: the two halves of a head are the pairs)."""
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


class DecoderBlock(nn.Module):
    def __init__(self, config: OmniVisionConfig):
        super().__init__()
        h, kv, hd = config.lm_hidden, config.lm_kv_heads, config.lm_head_dim
        self.input_norm = RMSNorm(h, config.lm_rms_eps)
        self.qkv = FusedLinear(h, {"q": config.lm_heads * hd, "k": kv * hd, "v": kv * hd}, bias=True)
        self.o = nn.Linear(config.lm_heads * hd, h, bias=False)
        self.post_norm = RMSNorm(h, config.lm_rms_eps)
        self.gate_up = FusedLinear(h, {"gate": config.lm_ffn, "up": config.lm_ffn}, bias=False)
        self.down = nn.Linear(config.lm_ffn, h, bias=False)
        self.kv = kv
        self.group = config.lm_heads // kv
        self.head_dim = hd

    def forward(self, x, cos, sin, mask, past_k, past_v):
        """x [B, T, H] fp32 (the residual stream); cos/sin [B, T, hd]; mask [T, S] fp32; past [B, kv, P, hd]
        -> x, present K, V [B, kv, S, hd] in the weights' dtype."""
        b, t = x.shape[0], x.shape[1]
        kv, g, hd = self.kv, self.group, self.head_dim
        q, k, v = self.qkv(self.input_norm(x)).split(self.qkv.split_sizes(), dim=-1)  # weights' dtype
        # Query head j*g + i attends with KV head j: group queries by KV head instead of repeating K/V.
        q = rotate(q.reshape(b, t, kv, g, hd), cos[:, :, None, None], sin[:, :, None, None], hd // 2) * hd ** -0.5
        k = rotate(k.reshape(b, t, kv, hd), cos[:, :, None], sin[:, :, None], hd // 2)
        q = q.permute(0, 2, 3, 1, 4).reshape(b, kv, g * t, hd)  # [B, kv, g*T, hd]
        k = torch.cat([past_k, k.transpose(1, 2)], dim=2)  # [B, kv, S, hd]
        v = torch.cat([past_v, v.reshape(b, t, kv, hd).transpose(1, 2)], dim=2)
        # Scores and softmax in fp32: Q.K^T is where fp16 Qwen2 overflows first. [B, kv, g, T, S]
        scores = torch.matmul(cast(q, torch.float32), cast(k, torch.float32).transpose(2, 3)).reshape(b, kv, g, t, -1)
        probs = cast(torch.softmax(scores + mask, dim=-1), v.dtype).reshape(b, kv, g * t, -1)
        attn = torch.matmul(probs, v).reshape(b, kv, g, t, hd).permute(0, 3, 1, 2, 4).reshape(b, t, kv * g * hd)
        x = x + cast(self.o(attn), x.dtype)  # residual adds in fp32
        gate, up = self.gate_up(self.post_norm(x)).split(self.gate_up.split_sizes(), dim=-1)
        return x + cast(self.down(F.silu(gate) * up), x.dtype), k, v


class LanguageModel(nn.Module):
    """(input_ids, image_embeds, position_ids, past_key_0, past_value_0, ...) -> (logits, present_key_0, ...)."""

    def __init__(self, config: OmniVisionConfig):
        super().__init__()
        self.vocab = config.lm_vocab
        self.mp_tokens = config.mp_tokens
        self.hidden = config.lm_hidden
        # One table for the token embedding and, tied as released, the lm_head.
        self.embed = nn.Parameter(torch.empty(config.lm_vocab, config.lm_hidden))
        self.lm_head = None if config.lm_tie_embeddings else nn.Parameter(torch.empty(config.lm_vocab, config.lm_hidden))
        self.blocks = nn.ModuleList(DecoderBlock(config) for _ in range(config.lm_layers))
        self.norm = RMSNorm(config.lm_hidden, config.lm_rms_eps)
        self.register_buffer("cos", torch.empty(config.lm_max_context, config.lm_head_dim))
        self.register_buffer("sin", torch.empty(config.lm_max_context, config.lm_head_dim))

    def embed_ids(self, input_ids: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
        """Token embeddings [B, T, H], with rows of the image table [B, mp_tokens, H] spliced in where ids >= vocab."""
        b = input_ids.shape[0]
        is_image = input_ids >= self.vocab
        tokens = F.embedding(torch.where(is_image, 0, input_ids), self.embed)  # [B, T, H]
        batch_offset = torch.arange(b, dtype=torch.int32)[:, None] * self.mp_tokens
        rows = torch.where(is_image, input_ids - self.vocab, 0) + batch_offset  # rows of [B*81, H]
        images = F.embedding(rows, image_embeds.reshape(-1, self.hidden))
        return torch.where(is_image[..., None], images, tokens)

    def forward(self, input_ids, image_embeds, position_ids, *past):
        t = input_ids.shape[1]
        p = past[0].shape[2]
        key_pos = torch.arange(p + t)
        query_pos = torch.arange(t) + p
        mask = torch.where(key_pos[None, :] > query_pos[:, None], MASK_VALUE, 0.0)  # [T, S] fp32
        cos = F.embedding(position_ids, self.cos)  # [B, T, hd]
        sin = F.embedding(position_ids, self.sin)
        x = cast(self.embed_ids(input_ids, image_embeds), torch.float32)  # the residual stream: fp32 [B, T, H]
        present = []
        for i, block in enumerate(self.blocks):
            x, k, v = block(x, cos, sin, mask, past[2 * i], past[2 * i + 1])
            present += [k, v]
        last = self.norm(x[:, -1])  # [B, H] in the weights' dtype: only the last position needs logits
        head = self.embed if self.lm_head is None else self.lm_head
        # Gemm with transB over the table itself: MatMul(x, W^T) would make constant folding write a
        # transposed second copy of the 151936 x 896 table into the graph.
        logits = torch.addmm(torch.zeros((), dtype=last.dtype), last, head.t())
        return (cast(logits, torch.float32), *present)
