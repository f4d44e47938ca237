"""GGUF loading: files written in the released layout by the test-model writer, read back by the loader."""
import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader, GGUFValueType, GGUFWriter
from gguf.quants import dequantize, quantize

from omnivision_ros.errors import OmniVisionError
from omnivision_ros.model import gguf_names
from omnivision_ros.model.gguf_loader import (
    GGUFFile,
    config_from_gguf,
    find_gguf_files,
    load_gguf_model,
    model_tensor,
    tokenizer_from_gguf,
)
from omnivision_ros.model.tokens import ADDED_TOKENS, STOP_TOKEN_IDS

torch = pytest.importorskip("torch", reason="GGUF files load into the model's PyTorch modules")

from omnivision_ros.export.make_test_model import encode, main, tensor_type, write_test_model  # noqa: E402
from omnivision_ros.model.vision_language_model import OmniVisionModel  # noqa: E402

SAMPLE = Path(__file__).resolve().parents[1] / "omnivision_ros" / "data" / "sample.jpg"
SEED = 3


@pytest.fixture(scope="module")
def source(tiny_config):
    return OmniVisionModel.random(tiny_config, SEED)


def logits_of(model, ids, image):
    c = model.config
    ids = torch.as_tensor(ids, dtype=torch.int32)[None]
    past = [torch.zeros(1, c.lm_kv_heads, 0, c.lm_head_dim)] * (2 * c.lm_layers)
    return model(ids, image, torch.arange(ids.shape[1], dtype=torch.int32)[None], *past)[0]


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """dtype -> folder with the two files, written once per module."""
    folders = {}
    for dtype in ("f32", "f16", "q8_0"):
        folders[dtype] = tmp_path_factory.mktemp(dtype)
        assert main(["--preset", "tiny", "--out", str(folders[dtype]), "--dtype", dtype, "--seed", str(SEED)]) == 0
    return folders


@pytest.fixture(scope="module")
def loaded(written):
    return {dtype: load_gguf_model(folder) for dtype, folder in written.items()}


def test_released_file_names_and_layout(written, tiny_config):
    lm, mmproj = find_gguf_files(written["f16"])
    assert (lm.name, mmproj.name) == ("Nano-Vlm-Processor-494M-F16.gguf", "mmproj-omni-vlm-f16.gguf")
    lm, mmproj = GGUFFile(lm), GGUFFile(mmproj)
    assert lm.architecture == "qwen2" and mmproj.architecture == "siglip"
    assert mmproj.value("siglip.has_omni_vlm_projector") is True
    assert "output.weight" not in lm.tensors  # tied to token_embd
    assert lm.tensor("blk.0.attn_q.weight").ggml_type == Q.F16
    assert lm.tensor("blk.0.attn_q.bias").ggml_type == Q.F32
    assert lm.tensor("output_norm.weight").ggml_type == Q.F32
    assert mmproj.tensor("v.patch_embd.weight").ggml_type == Q.F16  # conv kernel, 4-D
    assert mmproj.tensor("mm.0.bias").ggml_type == Q.F32
    assert mmproj.tensor("v.head.attention.in_weight").ggml_type == Q.F32  # converter keeps it F32
    assert set(gguf_names.MMPROJ_UNUSED) <= set(mmproj.tensors)
    assert config_from_gguf(lm.path, mmproj.path) == tiny_config


def test_gguf_dims_are_reversed_on_disk(written, tiny_config):
    _, mmproj_path = find_gguf_files(written["f32"])
    raw = {t.name: t for t in GGUFReader(mmproj_path).tensors}
    # mm.0: Linear(mp_in -> mp_hidden) has torch shape [mp_hidden, mp_in]; GGUF lists ne0 = mp_in first.
    assert list(raw["mm.0.weight"].shape) == [tiny_config.mp_in, tiny_config.mp_hidden]
    assert GGUFFile(mmproj_path).shape("mm.0.weight") == (tiny_config.mp_hidden, tiny_config.mp_in)


@pytest.mark.parametrize("dtype", ["f32", "f16", "q8_0"])
def test_round_trip_every_tensor(dtype, loaded, source):
    model, _ = loaded[dtype]
    names = {**gguf_names.lm_names(2), **gguf_names.mmproj_names(2)}
    for gguf_name, target in names.items():
        x = model_tensor(source, target).numpy()
        qtype = tensor_type(gguf_name, x.ndim, x.shape[-1], dtype)
        expected = dequantize(encode(x, qtype), qtype)  # exactly what the file can hold
        np.testing.assert_array_equal(model_tensor(model, target).numpy(), expected, err_msg=gguf_name)
        bound = {"f32": 0.0, "f16": 1e-3, "q8_0": 1.5e-2}[dtype] * max(float(np.abs(x).max()), 1e-6)
        assert float(np.abs(expected - x).max()) <= bound, gguf_name


def test_loaded_model_gives_the_source_logits(loaded, source, tiny_config, tokenizer):
    model, _ = loaded["f32"]
    torch.manual_seed(0)
    pixels = torch.randn(1, 3, 384, 384)
    embeds = model.encode_images(pixels)
    torch.testing.assert_close(embeds, source.encode_images(pixels), rtol=0, atol=1e-6)
    ids = tokenizer.encode("Is the door open?") + [tiny_config.lm_vocab + 4, 151645]
    logits = logits_of(model, ids, embeds)
    expected = logits_of(source, ids, embeds)
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)
    assert model.language_model.lm_head is None  # tied to the token embedding, as released
    f16_logits = logits_of(loaded["f16"][0], ids, embeds)
    torch.testing.assert_close(f16_logits, expected, rtol=0, atol=0.05)


def test_tokenizer_from_gguf(written, tokenizer):
    lm, _ = find_gguf_files(written["f16"])
    tok = tokenizer_from_gguf(lm)
    text = "Describe the scene: a red cup, 3 chairs and an open door.\n¿Qué? 東京 🙂"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert ids == tokenizer.encode(text)  # same vocabulary and merges as the synthetic tokenizer
    for name, (tid, control) in ADDED_TOKENS.items():
        assert tok.token_id(name) == tid
        assert (tok.encode(name) == [tid]) is not control, name  # user text cannot inject control tokens
    assert tok.special_ids["<|im_end|>"] == 151645 and tok.special_ids["<|image_pad|>"] == 151655
    assert {tok.special_ids[tok.decode([i])] for i in STOP_TOKEN_IDS} == set(STOP_TOKEN_IDS)
    assert tok.decode([151700]) == ""  # llama.cpp's [PAD] fillers decode to nothing


# --- the name tables against independent sources -------------------------------------------------

def lm_table_mismatches(table):
    """Entries of a language-model table that gguf-py's qwen2 map names otherwise: our parameter -> its
    transformers name (hf_names.py, held to transformers by the parity tests) -> gguf-py's GGUF name."""
    from hf_names import HF_QWEN2, expand

    blocks = 3
    to_hf = expand(HF_QWEN2, blocks)
    gguf_py = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2, blocks)
    wrong = []
    for gguf_name, target in gguf_names.expand(table, blocks).items():
        expected = gguf_py.get_name(to_hf[target], try_suffixes=(".weight", ".bias"))
        if expected != gguf_name:
            wrong.append(f"{gguf_name} -> {target}, gguf-py: {expected}")
    return wrong


def test_language_model_table_follows_gguf_py():
    assert lm_table_mismatches(gguf_names.LM_TENSORS) == []
    assert gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2, 1).get_name(
        "lm_head.weight", try_suffixes=(".weight",)) == next(iter(gguf_names.LM_UNTIED_OUTPUT))
    # gate and up have the same shape: loading and the round trip cannot tell them apart, this check does.
    swapped = dict(gguf_names.LM_TENSORS)
    swapped["blk.{bid}.ffn_gate.weight"], swapped["blk.{bid}.ffn_up.weight"] = (
        swapped["blk.{bid}.ffn_up.weight"], swapped["blk.{bid}.ffn_gate.weight"])
    assert len(lm_table_mismatches(swapped)) == 2 * 3


# --- the fc1/fc2 trap ----------------------------------------------------------------------------

def _siglip_as_clip_cpp(f: GGUFFile, config, pixels: np.ndarray) -> np.ndarray:
    """SigLIP tower computed straight from the GGUF tensors in clip.cpp's order (ffn_down, GELU, ffn_up)."""
    t = lambda name: f.array(name).astype(np.float64)  # noqa: E731
    p, g, h = config.vit_patch_size, config.vit_grid, config.vit_hidden
    x = pixels[0, :, : g * p, : g * p].reshape(3, g, p, g, p).transpose(1, 3, 0, 2, 4).reshape(g * g, -1)
    x = x @ t("v.patch_embd.weight").reshape(h, -1).T + t("v.patch_embd.bias") + t("v.position_embd.weight")

    def ln(v, name):
        v = (v - v.mean(-1, keepdims=True)) / np.sqrt(v.var(-1, keepdims=True) + config.vit_ln_eps)
        return v * t(f"{name}.weight") + t(f"{name}.bias")

    def linear(v, name):
        return v @ t(f"{name}.weight").T + t(f"{name}.bias")

    heads, d = config.vit_heads, h // config.vit_heads
    for i in range(config.vit_layers):
        y = ln(x, f"v.blk.{i}.ln1")
        q, k, v = (linear(y, f"v.blk.{i}.attn_{n}").reshape(-1, heads, d).transpose(1, 0, 2) for n in "qkv")
        att = q @ k.transpose(0, 2, 1) / np.sqrt(d)
        att = np.exp(att - att.max(-1, keepdims=True))
        att /= att.sum(-1, keepdims=True)
        x = x + linear((att @ v).transpose(1, 0, 2).reshape(-1, h), f"v.blk.{i}.attn_out")
        y = linear(ln(x, f"v.blk.{i}.ln2"), f"v.blk.{i}.ffn_down")
        y = 0.5 * y * (1 + np.tanh(np.sqrt(2 / np.pi) * (y + 0.044715 * y**3)))
        x = x + linear(y, f"v.blk.{i}.ffn_up")
    return ln(x, "v.post_ln")


def test_vision_ffn_down_is_fc1_as_in_clip_cpp(written, loaded, source, tiny_config):
    _, mmproj_path = find_gguf_files(written["f32"])
    f = GGUFFile(mmproj_path)
    fc1 = source.vision.blocks[0].fc1.weight.numpy()
    assert tiny_config.vit_mlp != tiny_config.vit_hidden  # so shapes tell fc1 from fc2
    assert f.shape("v.blk.0.ffn_down.weight") == (tiny_config.vit_mlp, tiny_config.vit_hidden) == fc1.shape
    np.testing.assert_array_equal(f.array("v.blk.0.ffn_down.weight"), fc1)
    pixels = np.random.default_rng(1).standard_normal((1, 3, 384, 384))
    expected = _siglip_as_clip_cpp(f, tiny_config, pixels)
    got = loaded["f32"][0].vision(torch.from_numpy(pixels).float())[0]
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-4)


def _swapped_table():
    table = dict(gguf_names.MMPROJ_TENSORS)
    for part in ("weight", "bias"):
        down, up = f"v.blk.{{bid}}.ffn_down.{part}", f"v.blk.{{bid}}.ffn_up.{part}"
        table[down], table[up] = table[up], table[down]
    return table


def test_swapped_vision_mlp_table_fails_the_shape_check(written, monkeypatch):
    # The files agree with the shape table; the swapped name table sends them to parameters of another shape.
    monkeypatch.setattr(gguf_names, "MMPROJ_TENSORS", _swapped_table())
    with pytest.raises(RuntimeError, match=r"ffn_(down|up)\.weight shape .* vs vision\.blocks\.0\.fc"):
        load_gguf_model(written["f32"])


def test_swapped_vision_mlp_table_changes_a_square_model(tmp_path, tiny_config, monkeypatch):
    square = dataclasses.replace(tiny_config, name="square", vit_mlp=tiny_config.vit_hidden)
    write_test_model(tmp_path, square, "f32", seed=SEED)
    src = OmniVisionModel.random(square, SEED)
    pixels = torch.randn(1, 3, 384, 384)
    right, _ = load_gguf_model(tmp_path)
    torch.testing.assert_close(right.encode_images(pixels), src.encode_images(pixels), rtol=0, atol=1e-6)
    _, mmproj_path = find_gguf_files(tmp_path)
    expected = _siglip_as_clip_cpp(GGUFFile(mmproj_path), square, pixels.double().numpy())
    monkeypatch.setattr(gguf_names, "MMPROJ_TENSORS", _swapped_table())
    wrong, _ = load_gguf_model(tmp_path)  # shapes agree, values do not
    got = wrong.vision(pixels)[0].numpy()
    assert np.abs(got - expected).max() > 1e-2


# --- dequantization ------------------------------------------------------------------------------

def test_dequantizes_the_supported_types(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 256)).astype(np.float32)
    q4k = np.zeros((3, 144), np.uint8)  # Q4_K: d, dmin (f16), 12 scale bytes, 128 nibble bytes per 256 values
    q4k[:, 0:2] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
    q4k[:, 2:4] = np.frombuffer(np.float16(0.02).tobytes(), np.uint8)
    q4k[:, 4:] = rng.integers(0, 256, (3, 140), dtype=np.uint8)
    path = tmp_path / "types.gguf"
    w = GGUFWriter(path, "qwen2")
    for qtype in (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0):
        w.add_tensor(qtype.name, quantize(x, qtype), raw_dtype=qtype)
    w.add_tensor("Q4_K", q4k, raw_dtype=Q.Q4_K)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    f = GGUFFile(path)
    for qtype, tol in ((Q.F32, 0), (Q.F16, 2e-3), (Q.BF16, 2e-2), (Q.Q8_0, 3e-2), (Q.Q4_0, 0.5)):
        got = f.array(qtype.name)
        assert got.shape == (3, 256)
        np.testing.assert_allclose(got.astype(np.float32), x, atol=tol, err_msg=qtype.name)
    q4k_values = f.array("Q4_K")
    assert q4k_values.shape == (3, 256) and np.isfinite(q4k_values).all()
    np.testing.assert_array_equal(q4k_values, dequantize(q4k, Q.Q4_K))


# --- bad input -----------------------------------------------------------------------------------

def rewrite(src: Path, dst: Path, *, arch=None, drop=(), replace=None, add=None, drop_keys=(), edit_keys=None):
    """Copy a GGUF file with changes (tensors: name -> (array, ggml type); edit_keys: key -> f(old value))."""
    r = GGUFReader(src)
    w = GGUFWriter(dst, arch or r.fields["general.architecture"].contents())
    for key, field in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or key in drop_keys:
            continue
        sub = field.types[-1] if field.types[0] == GGUFValueType.ARRAY else None
        value = field.contents()
        if edit_keys and key in edit_keys:
            value = edit_keys[key](value)
        w.add_key_value(key, value, field.types[0], sub_type=sub)
    tensors = {t.name: (np.asarray(t.data), t.tensor_type) for t in r.tensors if t.name not in drop}
    tensors.update(replace or {})
    tensors.update(add or {})
    for name, (data, qtype) in tensors.items():
        w.add_tensor(name, data, raw_dtype=qtype)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()


@pytest.fixture
def bad_folder(written, tmp_path):
    """A folder with the good LM file (linked) and an mmproj rewritten by the test: make(**changes) -> folder."""
    lm, mmproj = find_gguf_files(written["f32"])

    def make(**changes):
        (tmp_path / lm.name).symlink_to(lm)
        rewrite(mmproj, tmp_path / mmproj.name, **changes)
        return tmp_path

    return make


def expect_error(folder, pattern):
    with pytest.raises(OmniVisionError) as info:
        load_gguf_model(folder)
    assert re.search(pattern, str(info.value)), str(info.value)


def test_missing_folder_and_missing_files(written, tmp_path):
    expect_error(tmp_path / "nope", r"nope does not exist")
    expect_error(tmp_path, r"holds no \.gguf files")
    lm, mmproj = find_gguf_files(written["f16"])
    (tmp_path / lm.name).symlink_to(lm)
    expect_error(tmp_path, r"no mmproj GGUF.*found only Nano-Vlm-Processor-494M-F16\.gguf")
    (tmp_path / lm.name).unlink()
    (tmp_path / mmproj.name).symlink_to(mmproj)
    expect_error(tmp_path, r"no language-model GGUF")


def test_not_a_gguf_file(bad_folder, tmp_path):
    folder = bad_folder()
    (folder / "notes.gguf").write_text("hello")
    expect_error(folder, r"notes\.gguf: not a GGUF file")


@pytest.mark.parametrize("keep", [100, 3_000_000, -1000])
def test_truncated_file(written, tmp_path, keep):
    lm, mmproj = find_gguf_files(written["f32"])
    data = lm.read_bytes()
    (tmp_path / lm.name).write_bytes(data[:keep])
    (tmp_path / mmproj.name).symlink_to(mmproj)
    expect_error(tmp_path, rf"{lm.name}: .*truncated")


def test_other_architecture(bad_folder, tmp_path):
    folder = bad_folder()
    w = GGUFWriter(folder / "llama-3.2-1b.gguf", "llama")
    w.add_block_count(16)
    w.add_tensor("token_embd.weight", np.zeros((4, 32), np.float16))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    expect_error(folder, r"llama-3\.2-1b\.gguf: a GGUF of architecture 'llama'")


def test_clip_mmproj_without_omni_projector(bad_folder, tiny_config):
    h = tiny_config.vit_hidden
    folder = bad_folder(
        arch="clip", drop_keys=("siglip.has_omni_vlm_projector",),
        replace={"mm.0.weight": (np.zeros((tiny_config.mp_hidden, h), np.float16), Q.F16)},  # per-token MLP
    )
    expect_error(folder, r"mmproj-omni-vlm-f32\.gguf: an mmproj without the OmniVLM projector")


def test_clip_vision_tower(bad_folder, tiny_config):
    folder = bad_folder(add={"v.class_embd": (np.zeros(tiny_config.vit_hidden, np.float32), Q.F32)})
    expect_error(folder, r"has 'v\.class_embd', a CLIP vision tower")


def test_missing_tensor(bad_folder):
    expect_error(bad_folder(drop=("v.blk.1.ffn_down.bias",)),
                 r"mmproj-omni-vlm-f32\.gguf: tensor 'v\.blk\.1\.ffn_down\.bias' is missing")


def test_wrong_shape(bad_folder, tiny_config):
    w = np.zeros((tiny_config.vit_hidden, tiny_config.vit_hidden + 1), np.float32)
    expect_error(bad_folder(replace={"v.blk.0.attn_q.weight": (w, Q.F32)}),
                 r"tensor 'v\.blk\.0\.attn_q\.weight' has shape \[32, 33\], expected \[32, 32\]")


def test_unsupported_quantization_type(bad_folder, tiny_config):
    h = tiny_config.vit_hidden
    iq4_nl = np.zeros((h, h // 32 * 18), np.uint8)  # 18 bytes per block of 32
    expect_error(bad_folder(replace={"v.blk.0.attn_k.weight": (iq4_nl, Q.IQ4_NL)}),
                 r"'v\.blk\.0\.attn_k\.weight' has unsupported type IQ4_NL")


def test_unexpected_tensor(bad_folder):
    expect_error(bad_folder(add={"v.blk.0.extra.weight": (np.zeros(4, np.float32), Q.F32)}),
                 r"unexpected tensor 'v\.blk\.0\.extra\.weight'")


def test_files_from_different_models(bad_folder, tiny_config):
    folder = bad_folder(replace={
        "mm.2.weight": (np.zeros((80, tiny_config.mp_hidden), np.float32), Q.F32),
        "mm.2.bias": (np.zeros(80, np.float32), Q.F32),
    })
    expect_error(folder, r"projects to width 80 but the language model is 64 wide")


def test_tokenizer_with_wrong_special_ids(tmp_path):
    from gguf import TokenType

    from omnivision_ros.model.tokenizer import bytes_to_unicode

    tokens = list(bytes_to_unicode().values()) + ["<|endoftext|>"]
    path = tmp_path / "lm.gguf"
    w = GGUFWriter(path, "qwen2")
    w.add_tokenizer_model("gpt2"), w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types([TokenType.NORMAL] * 256 + [TokenType.CONTROL])
    w.add_token_merges(["Ġ t"])
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    message = r"lm\.gguf: special token <\|endoftext\|> is at id 256, expected id 151643"
    with pytest.raises(OmniVisionError, match=message):
        tokenizer_from_gguf(path)


# --- command lines -------------------------------------------------------------------------------

def run_cli(module, *args):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=120, env=env)


def test_ask_on_a_gguf_folder(written):
    result = run_cli("omnivision_ros.cli.ask", "--model", str(written["q8_0"]), "--image", str(SAMPLE),
                     "--max-new-tokens", "5", "What is this?")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    assert "tok/s" in result.stderr.strip().splitlines()[-1]


def test_gguf_folder_needs_the_torch_backend(written):
    result = run_cli("omnivision_ros.cli.ask", "--model", str(written["f16"]), "--backend", "onnxruntime",
                     "--image", str(SAMPLE), "What?")
    assert result.returncode == 2
    assert "omnivision-export" in result.stderr and "Traceback" not in result.stderr


def test_make_test_model_rejects_bad_arguments(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--preset", "gigantic", "--out", str(tmp_path)])
    assert "invalid choice" in capsys.readouterr().err
