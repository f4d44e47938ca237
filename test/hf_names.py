"""The model's parameter names -> transformers' SigLIP and Qwen2 names ({i}: block index; `[part]` a slice
of a fused weight). Used by the parity tests (which load these weights into transformers' modules and compare
outputs, so a wrong entry fails there) and by the check of the GGUF name table against gguf-py's own map."""

HF_VISION = {
    "vision.patch_embed.weight": "embeddings.patch_embedding.weight",
    "vision.patch_embed.bias": "embeddings.patch_embedding.bias",
    "vision.position": "embeddings.position_embedding.weight",
    "vision.blocks.{i}.norm1.weight": "encoder.layers.{i}.layer_norm1.weight",
    "vision.blocks.{i}.norm1.bias": "encoder.layers.{i}.layer_norm1.bias",
    "vision.blocks.{i}.qkv.weight[q]": "encoder.layers.{i}.self_attn.q_proj.weight",
    "vision.blocks.{i}.qkv.bias[q]": "encoder.layers.{i}.self_attn.q_proj.bias",
    "vision.blocks.{i}.qkv.weight[k]": "encoder.layers.{i}.self_attn.k_proj.weight",
    "vision.blocks.{i}.qkv.bias[k]": "encoder.layers.{i}.self_attn.k_proj.bias",
    "vision.blocks.{i}.qkv.weight[v]": "encoder.layers.{i}.self_attn.v_proj.weight",
    "vision.blocks.{i}.qkv.bias[v]": "encoder.layers.{i}.self_attn.v_proj.bias",
    "vision.blocks.{i}.out.weight": "encoder.layers.{i}.self_attn.out_proj.weight",
    "vision.blocks.{i}.out.bias": "encoder.layers.{i}.self_attn.out_proj.bias",
    "vision.blocks.{i}.norm2.weight": "encoder.layers.{i}.layer_norm2.weight",
    "vision.blocks.{i}.norm2.bias": "encoder.layers.{i}.layer_norm2.bias",
    "vision.blocks.{i}.fc1.weight": "encoder.layers.{i}.mlp.fc1.weight",
    "vision.blocks.{i}.fc1.bias": "encoder.layers.{i}.mlp.fc1.bias",
    "vision.blocks.{i}.fc2.weight": "encoder.layers.{i}.mlp.fc2.weight",
    "vision.blocks.{i}.fc2.bias": "encoder.layers.{i}.mlp.fc2.bias",
    "vision.post_norm.weight": "post_layernorm.weight",
    "vision.post_norm.bias": "post_layernorm.bias",
}
HF_QWEN2 = {
    "language_model.embed": "model.embed_tokens.weight",
    "language_model.blocks.{i}.input_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "language_model.blocks.{i}.qkv.weight[q]": "model.layers.{i}.self_attn.q_proj.weight",
    "language_model.blocks.{i}.qkv.bias[q]": "model.layers.{i}.self_attn.q_proj.bias",
    "language_model.blocks.{i}.qkv.weight[k]": "model.layers.{i}.self_attn.k_proj.weight",
    "language_model.blocks.{i}.qkv.bias[k]": "model.layers.{i}.self_attn.k_proj.bias",
    "language_model.blocks.{i}.qkv.weight[v]": "model.layers.{i}.self_attn.v_proj.weight",
    "language_model.blocks.{i}.qkv.bias[v]": "model.layers.{i}.self_attn.v_proj.bias",
    "language_model.blocks.{i}.o.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "language_model.blocks.{i}.post_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "language_model.blocks.{i}.gate_up.weight[gate]": "model.layers.{i}.mlp.gate_proj.weight",
    "language_model.blocks.{i}.gate_up.weight[up]": "model.layers.{i}.mlp.up_proj.weight",
    "language_model.blocks.{i}.down.weight": "model.layers.{i}.mlp.down_proj.weight",
    "language_model.norm.weight": "model.norm.weight",
}


def expand(table, blocks):
    out = {}
    for ours, theirs in table.items():
        for i in range(blocks) if "{i}" in ours else [0]:
            out[ours.format(i=i)] = theirs.format(i=i)
    return out
