"""GGUF tensor names of the released OmniVision-968M files -> OmniVisionModel parameter names.

Two files, one table each; `{bid}` is the block index. One entry per line, and a name that is not in
a table raises: nothing is guessed. A parameter name ending in `[part]` is a slice of a fused weight:
`qkv.weight[k]` is the k projection's rows of the fused q|k|v matrix (FusedLinear.part). The test-model
writer (export/make_test_model.py) uses the same tables, so the layout it writes and the layout the
loader reads cannot drift apart; the tables themselves are checked against independent sources:
test_gguf.py holds the mmproj table to clip.cpp's order, and the language-model table to gguf-py's own
qwen2 name map (through transformers' Qwen2 names, which the parity tests tie to this model).
"""
from __future__ import annotations

import re

from omnivision_ros.errors import OmniVisionError

# Language model file (`Nano-Vlm-Processor-494M-*.gguf`, arch qwen2): llama.cpp's qwen2 names.
# The output projection is tied to token_embd in the released files (no `output.weight`);
# a file that does carry `output.weight` gets an untied lm_head (see LM_UNTIED_OUTPUT).
LM_TENSORS = {
    "token_embd.weight":             "language_model.embed",
    "blk.{bid}.attn_norm.weight":    "language_model.blocks.{bid}.input_norm.weight",
    "blk.{bid}.attn_q.weight":       "language_model.blocks.{bid}.qkv.weight[q]",
    "blk.{bid}.attn_q.bias":         "language_model.blocks.{bid}.qkv.bias[q]",
    "blk.{bid}.attn_k.weight":       "language_model.blocks.{bid}.qkv.weight[k]",
    "blk.{bid}.attn_k.bias":         "language_model.blocks.{bid}.qkv.bias[k]",
    "blk.{bid}.attn_v.weight":       "language_model.blocks.{bid}.qkv.weight[v]",
    "blk.{bid}.attn_v.bias":         "language_model.blocks.{bid}.qkv.bias[v]",
    "blk.{bid}.attn_output.weight":  "language_model.blocks.{bid}.o.weight",
    "blk.{bid}.ffn_norm.weight":     "language_model.blocks.{bid}.post_norm.weight",
    "blk.{bid}.ffn_gate.weight":     "language_model.blocks.{bid}.gate_up.weight[gate]",
    "blk.{bid}.ffn_up.weight":       "language_model.blocks.{bid}.gate_up.weight[up]",
    "blk.{bid}.ffn_down.weight":     "language_model.blocks.{bid}.down.weight",
    "output_norm.weight":            "language_model.norm.weight",
}

# Only in files whose output projection is not tied to the embeddings.
LM_UNTIED_OUTPUT = {
    "output.weight":                 "language_model.lm_head",
}

# Vision + projector file (`mmproj-omni-vlm-f16.gguf`, arch siglip), written by Nexa's
# examples/omni-vlm/convert_image_encoder_to_gguf.py, which renames mlp.fc1 -> ffn_down and
# mlp.fc2 -> ffn_up. THE TRAP: ffn_down is the up-projection fc1 (hidden -> mlp, [4304, 1152])
# and ffn_up the down-projection fc2 (mlp -> hidden, [1152, 4304]); clip.cpp applies ffn_down first.
MMPROJ_TENSORS = {
    "v.patch_embd.weight":           "vision.patch_embed.weight",
    "v.patch_embd.bias":             "vision.patch_embed.bias",
    "v.position_embd.weight":        "vision.position",
    "v.blk.{bid}.attn_q.weight":     "vision.blocks.{bid}.qkv.weight[q]",
    "v.blk.{bid}.attn_q.bias":       "vision.blocks.{bid}.qkv.bias[q]",
    "v.blk.{bid}.attn_k.weight":     "vision.blocks.{bid}.qkv.weight[k]",
    "v.blk.{bid}.attn_k.bias":       "vision.blocks.{bid}.qkv.bias[k]",
    "v.blk.{bid}.attn_v.weight":     "vision.blocks.{bid}.qkv.weight[v]",
    "v.blk.{bid}.attn_v.bias":       "vision.blocks.{bid}.qkv.bias[v]",
    "v.blk.{bid}.attn_out.weight":   "vision.blocks.{bid}.out.weight",
    "v.blk.{bid}.attn_out.bias":     "vision.blocks.{bid}.out.bias",
    "v.blk.{bid}.ln1.weight":        "vision.blocks.{bid}.norm1.weight",
    "v.blk.{bid}.ln1.bias":          "vision.blocks.{bid}.norm1.bias",
    "v.blk.{bid}.ffn_down.weight":   "vision.blocks.{bid}.fc1.weight",
    "v.blk.{bid}.ffn_down.bias":     "vision.blocks.{bid}.fc1.bias",
    "v.blk.{bid}.ffn_up.weight":     "vision.blocks.{bid}.fc2.weight",
    "v.blk.{bid}.ffn_up.bias":       "vision.blocks.{bid}.fc2.bias",
    "v.blk.{bid}.ln2.weight":        "vision.blocks.{bid}.norm2.weight",
    "v.blk.{bid}.ln2.bias":          "vision.blocks.{bid}.norm2.bias",
    "v.post_ln.weight":              "vision.post_norm.weight",
    "v.post_ln.bias":                "vision.post_norm.bias",
    "mm.0.weight":                   "projector.fc1.weight",
    "mm.0.bias":                     "projector.fc1.bias",
    "mm.2.weight":                   "projector.fc2.weight",
    "mm.2.bias":                     "projector.fc2.bias",
}

# SigLIP's attention-pooling head: stored in the released mmproj, never used (the projector reads
# the post-LN patch tokens). GGUF name -> shape in NumPy order, from the vision widths
# (h = vit_hidden, m = vit_mlp). The converter squeezes the probe [1, 1, h] to [h] and keeps the
# fused in_proj as F32 (its name does not end in ".weight").
MMPROJ_UNUSED = {
    "v.head.probe":                  ("h",),
    "v.head.attention.in_weight":    ("3h", "h"),
    "v.head.attention.in_bias":      ("3h",),
    "v.head.attention.out.weight":   ("h", "h"),
    "v.head.attention.out.bias":     ("h",),
    "v.head.ln.weight":              ("h",),
    "v.head.ln.bias":                ("h",),
    "v.head.ffn_down.weight":        ("m", "h"),
    "v.head.ffn_down.bias":          ("m",),
    "v.head.ffn_up.weight":          ("h", "m"),
    "v.head.ffn_up.bias":            ("h",),
}


# Shapes (NumPy order) of every tensor above, by dimension names that `dimensions(config)` resolves. The
# loader holds a file to them before it builds the tokenizer or the model, so a wrong file fails in a
# fraction of a second; test_gguf.py holds them to the model's own parameter shapes.
LM_SHAPES = {
    "token_embd.weight":             ("vocab", "hidden"),
    "blk.{bid}.attn_norm.weight":    ("hidden",),
    "blk.{bid}.attn_q.weight":       ("q", "hidden"),
    "blk.{bid}.attn_q.bias":         ("q",),
    "blk.{bid}.attn_k.weight":       ("kv", "hidden"),
    "blk.{bid}.attn_k.bias":         ("kv",),
    "blk.{bid}.attn_v.weight":       ("kv", "hidden"),
    "blk.{bid}.attn_v.bias":         ("kv",),
    "blk.{bid}.attn_output.weight":  ("hidden", "q"),
    "blk.{bid}.ffn_norm.weight":     ("hidden",),
    "blk.{bid}.ffn_gate.weight":     ("ffn", "hidden"),
    "blk.{bid}.ffn_up.weight":       ("ffn", "hidden"),
    "blk.{bid}.ffn_down.weight":     ("hidden", "ffn"),
    "output_norm.weight":            ("hidden",),
    "output.weight":                 ("vocab", "hidden"),
}

MMPROJ_SHAPES = {
    "v.patch_embd.weight":           ("h", "rgb", "patch", "patch"),
    "v.patch_embd.bias":             ("h",),
    "v.position_embd.weight":        ("patches", "h"),
    "v.blk.{bid}.attn_q.weight":     ("h", "h"),
    "v.blk.{bid}.attn_q.bias":       ("h",),
    "v.blk.{bid}.attn_k.weight":     ("h", "h"),
    "v.blk.{bid}.attn_k.bias":       ("h",),
    "v.blk.{bid}.attn_v.weight":     ("h", "h"),
    "v.blk.{bid}.attn_v.bias":       ("h",),
    "v.blk.{bid}.attn_out.weight":   ("h", "h"),
    "v.blk.{bid}.attn_out.bias":     ("h",),
    "v.blk.{bid}.ln1.weight":        ("h",),
    "v.blk.{bid}.ln1.bias":          ("h",),
    "v.blk.{bid}.ffn_down.weight":   ("m", "h"),
    "v.blk.{bid}.ffn_down.bias":     ("m",),
    "v.blk.{bid}.ffn_up.weight":     ("h", "m"),
    "v.blk.{bid}.ffn_up.bias":       ("h",),
    "v.blk.{bid}.ln2.weight":        ("h",),
    "v.blk.{bid}.ln2.bias":          ("h",),
    "v.post_ln.weight":              ("h",),
    "v.post_ln.bias":                ("h",),
    "mm.0.weight":                   ("mp_hidden", "mp_in"),
    "mm.0.bias":                     ("mp_hidden",),
    "mm.2.weight":                   ("hidden", "mp_hidden"),
    "mm.2.bias":                     ("hidden",),
}


def dimensions(config) -> dict[str, int]:
    """Dimension name -> size for the shape tables (config: an OmniVisionConfig)."""
    c = config
    return {
        "vocab": c.lm_vocab, "hidden": c.lm_hidden, "q": c.lm_heads * c.lm_head_dim,
        "kv": c.lm_kv_heads * c.lm_head_dim, "ffn": c.lm_ffn,
        "h": c.vit_hidden, "3h": 3 * c.vit_hidden, "m": c.vit_mlp, "rgb": 3, "patch": c.vit_patch_size,
        "patches": c.vit_tokens, "mp_in": c.mp_in, "mp_hidden": c.mp_hidden,
    }


def expected_shapes(config) -> dict[str, tuple[int, ...]]:
    """GGUF name -> NumPy shape of every tabled tensor of both files, for the model `config` describes."""
    sizes = dimensions(config)
    shapes = {}
    for table, n_blocks in ((LM_SHAPES, config.lm_layers), (MMPROJ_SHAPES, config.vit_layers)):
        for name, dims in table.items():
            for bid in range(n_blocks) if "{bid}" in name else (None,):
                shapes[name.format(bid=bid)] = tuple(sizes[d] for d in dims)
    return shapes


def expand(table: dict[str, str], n_blocks: int) -> dict[str, str]:
    """Table with `{bid}` entries repeated for blocks 0..n_blocks-1, in table order."""
    out = {}
    for gguf_name, param_name in table.items():
        if "{bid}" in gguf_name:
            for bid in range(n_blocks):
                out[gguf_name.format(bid=bid)] = param_name.format(bid=bid)
        else:
            out[gguf_name] = param_name
    return out


def lm_names(n_layers: int, tied: bool = True) -> dict[str, str]:
    """GGUF name -> parameter name for every tensor the language-model file must hold."""
    names = expand(LM_TENSORS, n_layers)
    if not tied:
        names.update(LM_UNTIED_OUTPUT)
    return names


def mmproj_names(n_layers: int) -> dict[str, str]:
    """GGUF name -> parameter name for every tensor the mmproj file must hold."""
    return expand(MMPROJ_TENSORS, n_layers)


_PART = re.compile(r"^(?P<param>[^\[\]]+)(?:\[(?P<part>\w+)\])?$")


def split_part(target: str) -> tuple[str, str | None]:
    """"blocks.0.qkv.weight[k]" -> ("blocks.0.qkv.weight", "k"); a whole parameter -> (name, None)."""
    match = _PART.match(target)
    if match is None:
        raise OmniVisionError(f"malformed parameter target '{target}' in a GGUF name table")
    return match["param"], match["part"]


def unused_shape(gguf_name: str, vit_hidden: int, vit_mlp: int) -> tuple[int, ...]:
    """NumPy shape of a stored-but-unused mmproj tensor; raises for a name that is not one."""
    try:
        dims = MMPROJ_UNUSED[gguf_name]
    except KeyError:
        raise OmniVisionError(f"'{gguf_name}' is not a known unused mmproj tensor") from None
    sizes = {"h": vit_hidden, "3h": 3 * vit_hidden, "m": vit_mlp}
    return tuple(sizes[d] for d in dims)

