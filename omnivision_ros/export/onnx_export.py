"""Export the reference model to the two ONNX graphs of a model bundle (DESIGN §3, graph contract).

The graphs come from small export-friendly modules of our own, built from the reference model's
weights, not from transformers' classes traced with their cache objects:

- `VisionGraph`: pixel_values [B, 3, 384, 384] -> image_embeds [B, 81, lm_hidden] (SigLIP + projector).
- `DecoderGraph`: ids, image table, positions, past K/V -> last-position logits + present K/V; one graph
  serves prefill (P = 0, many tokens) and decode (one token, long past).

Each is built for a dtype: float32 (CPU) or float16 (GPU). Weights, activations and the KV cache take
that dtype; LayerNorm/RMSNorm statistics and softmax run in float32 and logits are float32.
Exported with the TorchScript-based exporter (`dynamo=False`, still in torch 2.13): on these modules
it gives plain standard-op graphs at opset 17 with the contract's dim names, about 5x faster than the
torch.export-based exporter, which also works on them but needs opset >= 18, names derived dims
itself ("past + seq" instead of "total") and emitted an invalid int32 GatherND for `table[ids]`.
"""
from __future__ import annotations

import math
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper
import torch
import torch.nn.functional as F
from torch import nn

from omnivision_ros.errors import OmniVisionError
from omnivision_ros.model.config import OmniVisionConfig
from omnivision_ros.model.reference import OmniVisionReference
from omnivision_ros.model.bundle import (
    decoder_input_names,
    decoder_output_names,
    VISION_INPUTS,
    VISION_OUTPUTS,
)

OPSET = 17
OPSET_RANGE = (17, 19)  # what TensorRT 10.3 (JetPack 6) parses
CONTROL_FLOW_OPS = ("If", "Loop", "Scan")
# Masked scores get the lowest float16 value, never -inf: -inf - -inf = NaN in fused fp16 kernels.
MASK_VALUE = float(torch.finfo(torch.float16).min)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


class Linear(nn.Module):
    """y = x W^T + b over given tensors (no random init of a throwaway nn.Linear)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @classmethod
    def fused(cls, layers: list[nn.Linear], dtype: torch.dtype) -> "Linear":
        """One matmul for several projections of the same input (q|k|v, gate|up); outputs concatenated."""
        weight = torch.cat([layer.weight.detach() for layer in layers]).to(dtype)
        biases = [layer.bias for layer in layers]
        if all(b is None for b in biases):
            return cls(weight)
        bias = torch.cat([
            b.detach() if b is not None else torch.zeros(layer.out_features) for b, layer in zip(biases, layers)
        ]).to(dtype)
        return cls(weight, bias)

    @classmethod
    def of(cls, layer: nn.Linear, dtype: torch.dtype) -> "Linear":
        bias = None if layer.bias is None else layer.bias.detach().to(dtype)
        return cls(layer.weight.detach().to(dtype), bias)  # .to(same dtype) shares the reference's storage

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


def cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x in dtype; no Cast node in the trace when it already is (the TorchScript exporter keeps no-op casts)."""
    return x if x.dtype == dtype else x.to(dtype)


class LayerNorm32(nn.Module):
    """LayerNorm computed in float32 whatever the activation dtype."""

    def __init__(self, norm: nn.LayerNorm):
        super().__init__()
        self.weight = nn.Parameter(norm.weight.detach().float(), requires_grad=False)
        self.bias = nn.Parameter(norm.bias.detach().float(), requires_grad=False)
        self.eps = norm.eps

    def forward(self, x):
        return cast(F.layer_norm(cast(x, torch.float32), self.weight.shape, self.weight, self.bias, self.eps), x.dtype)


class RMSNorm32(nn.Module):
    """Qwen2 RMSNorm: statistics in float32, scale applied in the activation dtype (as transformers does)."""

    def __init__(self, norm: nn.Module, eps: float, dtype: torch.dtype):
        super().__init__()
        self.weight = nn.Parameter(norm.weight.detach().to(dtype), requires_grad=False)
        self.eps = eps

    def forward(self, x):
        h = cast(x, torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * cast(h, x.dtype)


# ---------------------------------------------------------------------------------------------
# Vision: SigLIP encoder + compressed projector


class VisionBlock(nn.Module):
    def __init__(self, layer: nn.Module, config: OmniVisionConfig, dtype: torch.dtype):
        super().__init__()
        attn = layer.self_attn
        self.norm1 = LayerNorm32(layer.layer_norm1)
        self.qkv = Linear.fused([attn.q_proj, attn.k_proj, attn.v_proj], dtype)
        self.out = Linear.of(attn.out_proj, dtype)
        self.norm2 = LayerNorm32(layer.layer_norm2)
        self.fc1 = Linear.of(layer.mlp.fc1, dtype)
        self.fc2 = Linear.of(layer.mlp.fc2, dtype)
        self.tokens = config.vit_tokens
        self.heads = config.vit_heads
        self.head_dim = config.vit_hidden // config.vit_heads

    def forward(self, x):  # [B, N, D]
        qkv = self.qkv(self.norm1(x)).reshape(-1, self.tokens, 3, self.heads, self.head_dim)
        qkv = qkv.permute(2, 0, 3, 1, 4)  # [3, B, heads, N, hd]
        q, k, v = qkv[0] * self.head_dim ** -0.5, qkv[1], qkv[2]
        scores = cast(torch.matmul(q, k.transpose(2, 3)), torch.float32)  # [B, heads, N, N]
        probs = cast(torch.softmax(scores, dim=-1), x.dtype)
        attn = torch.matmul(probs, v).transpose(1, 2).reshape(-1, self.tokens, self.heads * self.head_dim)
        x = x + self.out(attn)
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x)), approximate="tanh"))


class VisionGraph(nn.Module):
    """pixel_values [B, 3, S, S] -> image_embeds [B, mp_tokens, lm_hidden]."""

    def __init__(self, model: OmniVisionReference, dtype: torch.dtype = torch.float32):
        super().__init__()
        config = model.config
        vision = model.vision.vision_model if hasattr(model.vision, "vision_model") else model.vision
        emb = vision.embeddings
        self.dtype = dtype
        self.patch_weight = nn.Parameter(emb.patch_embedding.weight.detach().to(dtype), requires_grad=False)
        self.patch_bias = nn.Parameter(emb.patch_embedding.bias.detach().to(dtype), requires_grad=False)
        self.patch_size = config.vit_patch_size
        self.position = nn.Parameter(emb.position_embedding.weight.detach().to(dtype), requires_grad=False)  # [729, D]
        self.blocks = nn.ModuleList(VisionBlock(layer, config, dtype) for layer in vision.encoder.layers)
        self.post_norm = LayerNorm32(vision.post_layernorm)
        self.mp_tokens = config.mp_tokens
        self.mp_in = config.mp_in
        self.fc1 = Linear.of(model.projector.fc1, dtype)
        self.fc2 = Linear.of(model.projector.fc2, dtype)

    def forward(self, pixel_values):
        x = F.conv2d(pixel_values, self.patch_weight, self.patch_bias, stride=self.patch_size)  # [B, D, 27, 27]
        x = x.flatten(2).transpose(1, 2) + self.position  # [B, 729, D]
        for block in self.blocks:
            x = block(x)
        x = self.post_norm(x).reshape(-1, self.mp_tokens, self.mp_in)  # [B, 81, 10368], contiguous groups of 9
        return self.fc2(F.gelu(self.fc1(x)))  # [B, 81, lm_hidden]


# ---------------------------------------------------------------------------------------------
# Decoder: Qwen2 with the prompt-table image splice


def rope_tables(config: OmniVisionConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [lm_max_context, head_dim] in float32, computed exactly as transformers' Qwen2 does."""
    dim = config.lm_head_dim
    inv_freq = 1.0 / (config.lm_rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    freqs = torch.arange(config.lm_max_context).float()[:, None] * inv_freq[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def rotate(x, cos, sin, half: int):
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


class DecoderBlock(nn.Module):
    def __init__(self, layer: nn.Module, config: OmniVisionConfig, dtype: torch.dtype):
        super().__init__()
        attn, mlp = layer.self_attn, layer.mlp
        self.input_norm = RMSNorm32(layer.input_layernorm, config.lm_rms_eps, dtype)
        self.qkv = Linear.fused([attn.q_proj, attn.k_proj, attn.v_proj], dtype)
        self.o = Linear.of(attn.o_proj, dtype)
        self.post_norm = RMSNorm32(layer.post_attention_layernorm, config.lm_rms_eps, dtype)
        self.gate_up = Linear.fused([mlp.gate_proj, mlp.up_proj], dtype)
        self.down = Linear.of(mlp.down_proj, dtype)
        self.kv = config.lm_kv_heads
        self.group = config.lm_heads // config.lm_kv_heads
        self.head_dim = config.lm_head_dim
        self.hidden = config.lm_hidden
        self.ffn = config.lm_ffn

    def forward(self, x, cos, sin, mask, past_k, past_v):
        """x [B, T, H]; cos/sin [B, T, hd]; mask [T, S] fp32; past [B, kv, P, hd] -> x, present K, V [B, kv, S, hd]."""
        b, t = x.shape[0], x.shape[1]
        kv, g, hd = self.kv, self.group, self.head_dim
        q, k, v = self.qkv(self.input_norm(x)).split([self.hidden, kv * hd, kv * hd], dim=-1)
        # Query head j*g + i attends with KV head j: group queries by KV head instead of repeating K/V.
        q = rotate(q.reshape(b, t, kv, g, hd), cos[:, :, None, None], sin[:, :, None, None], hd // 2) * hd ** -0.5
        k = rotate(k.reshape(b, t, kv, hd), cos[:, :, None], sin[:, :, None], hd // 2)
        q = q.permute(0, 2, 3, 1, 4).reshape(b, kv, g * t, hd)  # [B, kv, g*T, hd]
        k = torch.cat([past_k, k.transpose(1, 2)], dim=2)  # [B, kv, S, hd]
        v = torch.cat([past_v, v.reshape(b, t, kv, hd).transpose(1, 2)], dim=2)
        scores = torch.matmul(q, k.transpose(2, 3)).reshape(b, kv, g, t, -1)  # [B, kv, g, T, S]
        scores = cast(scores, torch.float32) + mask
        probs = cast(torch.softmax(scores, dim=-1), x.dtype).reshape(b, kv, g * t, -1)
        attn = torch.matmul(probs, v).reshape(b, kv, g, t, hd).permute(0, 3, 1, 2, 4).reshape(b, t, self.hidden)
        x = x + self.o(attn)
        gate, up = self.gate_up(self.post_norm(x)).split([self.ffn, self.ffn], dim=-1)
        return x + self.down(F.silu(gate) * up), k, v


class DecoderGraph(nn.Module):
    """(input_ids, image_embeds, position_ids, past_key_0, past_value_0, ...) -> (logits, present_key_0, ...)."""

    def __init__(self, model: OmniVisionReference, dtype: torch.dtype = torch.float32):
        super().__init__()
        config = model.config
        decoder = model.decoder.model
        self.vocab = config.lm_vocab
        self.mp_tokens = config.mp_tokens
        self.hidden = config.lm_hidden
        # One table for the token embedding and the tied lm_head.
        self.embed = nn.Parameter(decoder.embed_tokens.weight.detach().to(dtype), requires_grad=False)
        if not config.lm_tie_embeddings:
            raise OmniVisionError(f"model '{config.name}': export supports tied embeddings only (lm_tie_embeddings)")
        cos, sin = rope_tables(config)
        self.register_buffer("cos", cos.to(dtype))
        self.register_buffer("sin", sin.to(dtype))
        self.blocks = nn.ModuleList(DecoderBlock(layer, config, dtype) for layer in decoder.layers)
        self.norm = RMSNorm32(decoder.norm, config.lm_rms_eps, dtype)

    def embed_ids(self, input_ids, image_embeds):
        """Token embeddings, with rows of the image table spliced in where ids >= vocab."""
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
        x = self.embed_ids(input_ids, image_embeds)
        present = []
        for i, block in enumerate(self.blocks):
            x, k, v = block(x, cos, sin, mask, past[2 * i], past[2 * i + 1])
            present += [k, v]
        last = self.norm(x[:, -1])  # [B, H]: only the last position needs logits
        # Gemm with transB over the embedding table itself: MatMul(x, W^T) would make constant folding
        # write a transposed second copy of the 151936 x 896 table.
        logits = torch.addmm(torch.zeros((), dtype=last.dtype), last, self.embed.t())
        return (cast(logits, torch.float32), *present)


# ---------------------------------------------------------------------------------------------
# Export


def vision_example(config: OmniVisionConfig, dtype: torch.dtype) -> torch.Tensor:
    """Tracing input. Batch 1 because tracing runs the whole encoder (slow in fp16 on a CPU); the batch
    stays dynamic since no reshape names it (-1)."""
    return torch.zeros(1, 3, config.vit_image_size, config.vit_image_size, dtype=dtype)


def decoder_example(config: OmniVisionConfig, dtype: torch.dtype, batch: int = 2, seq: int = 3, past: int = 4) -> tuple:
    """Tracing inputs, every dynamic size > 1 so none gets specialised; image and text ids mixed."""
    ids = torch.arange(batch * seq, dtype=torch.int32).reshape(batch, seq)
    ids[:, 0] = config.lm_vocab  # an image position in each row
    positions = (torch.arange(seq, dtype=torch.int32) + past).expand(batch, seq).contiguous()
    image_embeds = torch.zeros(batch, config.mp_tokens, config.lm_hidden, dtype=dtype)
    kv = [torch.zeros(batch, config.lm_kv_heads, past, config.lm_head_dim, dtype=dtype)
          for _ in range(2 * config.lm_layers)]
    return (ids, image_embeds, positions, *kv)


def decoder_dynamic_axes(config: OmniVisionConfig) -> dict:
    axes = {
        "input_ids": {0: "batch", 1: "seq"},
        "image_embeds": {0: "batch"},
        "position_ids": {0: "batch", 1: "seq"},
        "logits": {0: "batch"},
    }
    for name in decoder_input_names(config)[3:]:
        axes[name] = {0: "batch", 2: "past"}
    for name in decoder_output_names(config)[1:]:
        axes[name] = {0: "batch", 2: "total"}
    return axes


def name_folded_weights(graph: onnx.ModelProto) -> None:
    """Name the weights the exporter constant-folded ("onnx::MatMul_123") after the node using them:
    "blocks.3.gate_up.weight" (the MatMul operand, stored [in, out]), so quantizers and engine
    inspectors can tell the layers apart."""
    users: dict[str, list] = {}
    for node in graph.graph.node:
        for slot, name in enumerate(node.input):
            users.setdefault(name, []).append((node, slot))
    taken = {t.name for t in graph.graph.initializer}
    for tensor in graph.graph.initializer:
        if not tensor.name.startswith("onnx::") or len(users.get(tensor.name, [])) != 1:
            continue
        node, slot = users[tensor.name][0]
        scope = node.name.strip("/").replace("/", ".")
        new = scope.rsplit(".", 1)[0] + ".weight" if node.op_type == "MatMul" and slot == 1 else f"{scope}.input{slot}"
        if new not in taken:
            taken.add(new)
            node.input[slot] = tensor.name = new


def export_graph(module: nn.Module, args: tuple, path: Path, input_names, output_names, dynamic_axes,
                 opset: int = OPSET, output_dims: dict | None = None) -> None:
    """Trace `module` to `path` + `path.data` (all weights in that one external file).

    output_dims: {output: [dim name or size, ...]} written over what the tracer inferred (it leaves
    generated names for sizes it could not follow through dynamic reshapes).
    """
    path = Path(path)
    with tempfile.TemporaryDirectory(dir=path.parent) as scratch, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript exporter deprecation and tracer notes
        raw = Path(scratch) / "graph.onnx"
        # Graphs over 2 GB come out with one external file per tensor; they are gathered below.
        torch.onnx.export(
            module, args, str(raw), dynamo=False, opset_version=opset, input_names=list(input_names),
            output_names=list(output_names), dynamic_axes=dynamic_axes, do_constant_folding=True,
        )
        graph = onnx.load(str(raw))
    graph.producer_name = "omnivision_ros"
    name_folded_weights(graph)
    for value in graph.graph.output:
        for dim, size in zip(value.type.tensor_type.shape.dim, (output_dims or {}).get(value.name, [])):
            if isinstance(size, str):
                dim.dim_param = size
            else:
                dim.dim_value = size
    problems = graph_problems(graph)
    if problems:
        raise OmniVisionError(f"exported graph {path.name} breaks the graph contract: " + "; ".join(problems))
    onnx.save_model(graph, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=path.name + ".data", size_threshold=1024)


def graph_problems(graph: onnx.ModelProto) -> list[str]:
    """How a graph breaks the contract's portability rules: standard ops only, opset in OPSET_RANGE,
    no control flow, no -inf in its constants (tensors whose data is loaded or inline)."""
    problems = []
    opsets = {entry.domain or "ai.onnx": entry.version for entry in graph.opset_import}
    extra = sorted(set(opsets) - {"ai.onnx"})
    if extra:
        problems.append(f"non-standard operator domains {extra}")
    if not OPSET_RANGE[0] <= opsets.get("ai.onnx", 0) <= OPSET_RANGE[1]:
        problems.append(f"opset {opsets.get('ai.onnx')} outside {OPSET_RANGE[0]}..{OPSET_RANGE[1]}")
    tensors = [t for t in graph.graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL]
    for node in graph.graph.node:
        if node.domain not in ("", "ai.onnx"):
            problems.append(f"node {node.name}: operator {node.domain}::{node.op_type}")
        if node.op_type in CONTROL_FLOW_OPS:
            problems.append(f"node {node.name}: control flow {node.op_type}")
        tensors += [a.t for a in node.attribute if a.type == onnx.AttributeProto.TENSOR]
        if any(a.type == onnx.AttributeProto.FLOAT and math.isinf(a.f) for a in node.attribute):
            problems.append(f"node {node.name}: infinite float attribute")
    for tensor in tensors:
        if tensor.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE):
            if np.isinf(onnx.numpy_helper.to_array(tensor)).any():
                problems.append(f"tensor {tensor.name or '(constant)'} holds inf")
    return problems


def export_vision(model: OmniVisionReference, path: Path, precision: str = "fp32", opset: int = OPSET) -> None:
    dtype = DTYPES[precision]
    module = VisionGraph(model, dtype).eval()
    with torch.no_grad():
        export_graph(module, (vision_example(model.config, dtype),), path, VISION_INPUTS, VISION_OUTPUTS,
                     {"pixel_values": {0: "batch"}, "image_embeds": {0: "batch"}}, opset,
                     {"image_embeds": ["batch", model.config.mp_tokens, model.config.lm_hidden]})


def export_decoder(model: OmniVisionReference, path: Path, precision: str = "fp32", opset: int = OPSET) -> None:
    dtype = DTYPES[precision]
    config = model.config
    module = DecoderGraph(model, dtype).eval()
    with torch.no_grad():
        export_graph(module, decoder_example(config, dtype), path,
                     decoder_input_names(config), decoder_output_names(config),
                     decoder_dynamic_axes(config), opset)
