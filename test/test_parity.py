"""Parity of the model's stages with transformers' SiglipVisionModel and Qwen2ForCausalLM on the same weights.

transformers is a test-only oracle: the package never imports it (test_lint.py checks that). The name maps
below also tie the GGUF name table to gguf-py's own qwen2 map (test_gguf.py): a parameter mapped to the
wrong transformers tensor fails the parity here.
"""
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the model's PyTorch modules need torch")
transformers = pytest.importorskip("transformers", reason="parity tests compare against transformers")

from hf_names import HF_QWEN2, HF_VISION, expand  # noqa: E402

from omnivision_ros.model.gguf_loader import model_tensor  # noqa: E402

PARITY_ATOL = 1e-5
def hf_state(model, table, blocks):
    return {theirs: model_tensor(model, ours).clone() for ours, theirs in expand(table, blocks).items()}


@pytest.fixture(scope="module")
def hf_vision(tiny_model):
    c = tiny_model.config
    config = transformers.SiglipVisionConfig(
        hidden_size=c.vit_hidden, intermediate_size=c.vit_mlp, num_hidden_layers=c.vit_layers,
        num_attention_heads=c.vit_heads, image_size=c.vit_image_size, patch_size=c.vit_patch_size,
        hidden_act="gelu_pytorch_tanh", layer_norm_eps=c.vit_ln_eps, vision_use_head=False)
    hf = transformers.SiglipVisionModel(config).eval()
    missing, unexpected = hf.load_state_dict(hf_state(tiny_model, HF_VISION, c.vit_layers), strict=False)
    assert not unexpected and not [m for m in missing if "head" not in m]
    return hf


@pytest.fixture(scope="module")
def hf_decoder(tiny_model):
    c = tiny_model.config
    config = transformers.Qwen2Config(
        vocab_size=c.lm_vocab, hidden_size=c.lm_hidden, intermediate_size=c.lm_ffn, num_hidden_layers=c.lm_layers,
        num_attention_heads=c.lm_heads, num_key_value_heads=c.lm_kv_heads, hidden_act="silu",
        max_position_embeddings=32768, rms_norm_eps=c.lm_rms_eps, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": c.lm_rope_theta}, use_sliding_window=False)
    hf = transformers.Qwen2ForCausalLM(config).eval()
    state = hf_state(tiny_model, HF_QWEN2, c.lm_layers)
    state["lm_head.weight"] = state["model.embed_tokens.weight"]
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and not missing
    return hf


def test_vision_tower_matches_siglip(tiny_model, hf_vision):
    pixels = torch.rand(2, 3, 384, 384) * 2 - 1
    with torch.no_grad():
        expected = hf_vision(pixel_values=pixels).last_hidden_state  # last layer + post-LayerNorm
        got = tiny_model.vision(pixels)
    torch.testing.assert_close(got, expected, rtol=0, atol=PARITY_ATOL)


def run(model, ids, image, past=None, start=0):
    """The decoder contract on one row of ids: (last logits [vocab], present K/V)."""
    c = model.config
    past = past or [torch.zeros(1, c.lm_kv_heads, 0, c.lm_head_dim)] * (2 * c.lm_layers)
    ids = torch.as_tensor(np.asarray(ids), dtype=torch.int32)[None]
    positions = torch.arange(start, start + ids.shape[1], dtype=torch.int32)[None]
    logits, *present = model(ids, image, positions, *past)
    return logits[0], present


def test_decoder_matches_qwen2(tiny_model, hf_decoder, tiny_config, tokenizer):
    v = tiny_config.lm_vocab
    ids = np.array(tokenizer.encode("Is the door open?") + [v + 2, v + 40] + tokenizer.encode(" Answer."))
    image = torch.randn(1, 81, tiny_config.lm_hidden)
    # transformers gets the spliced embeddings built here, independently of LanguageModel.embed_ids.
    rows = [image[0, i - v] if i >= v else hf_decoder.model.embed_tokens.weight[i] for i in ids]
    with torch.no_grad():
        out = hf_decoder(inputs_embeds=torch.stack(rows)[None], use_cache=True)
        logits, present = run(tiny_model, ids, image)
        torch.testing.assert_close(logits, out.logits[0, -1], rtol=0, atol=PARITY_ATOL)
        for i in range(tiny_config.lm_layers):  # the cache: RoPE applied, [B, kv, S, hd]
            torch.testing.assert_close(present[2 * i], out.past_key_values.layers[i].keys, rtol=0, atol=PARITY_ATOL)
            torch.testing.assert_close(present[2 * i + 1], out.past_key_values.layers[i].values, rtol=0,
                                       atol=PARITY_ATOL)
        token = int(logits.argmax())
        step = hf_decoder(input_ids=torch.tensor([[token]]), past_key_values=out.past_key_values, use_cache=True)
        step_logits, _ = run(tiny_model, [token], image, present, start=len(ids))
        torch.testing.assert_close(step_logits, step.logits[0, -1], rtol=0, atol=PARITY_ATOL)
