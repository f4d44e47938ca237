"""ONNX export on the tiny preset: parity with the model's PyTorch modules, the graph contract, the bundle.

Tolerances: the fp32 graphs match the torch model within 1e-4 absolute (tiny-preset embeddings and
logits are of order 1; measured differences are ~1e-6). The fp16 graphs, run on ONNX Runtime's CPU
provider, keep cosine similarity >= 0.99 with fp32 on image embeddings and logits (measured > 0.9999).
"""
import json
import os
import shutil

import numpy as np
import onnx
import onnx.helper
import onnx.numpy_helper
import onnxruntime as ort
import pytest

from omnivision_ros.errors import OmniVisionError
from omnivision_ros.model.bundle import (
    CONFIG_FILE,
    MANIFEST,
    OPSET_RANGE,
    STAMP,
    decoder_input_names,
    decoder_output_names,
    open_bundle,
    sha256_file,
)
from omnivision_ros.model.preprocess import preprocess
from omnivision_ros.model.prompt import PromptBuilder
from omnivision_ros.runtime.factory import open_model
from omnivision_ros.runtime.ort_backend import OrtBackend

torch = pytest.importorskip("torch", reason="export traces the model's PyTorch modules")

from omnivision_ros.export.cli import main as export_main  # noqa: E402
from omnivision_ros.export.onnx_export import graph_problems  # noqa: E402

FP32_ATOL = 1e-4
FP16_MIN_COSINE = 0.99


@pytest.fixture(scope="module")
def ort_fp32(tiny_bundle):
    return OrtBackend(open_bundle(tiny_bundle), "fp32", threads=2)


@pytest.fixture(scope="module")
def ort_fp16(tiny_bundle):
    return OrtBackend(open_bundle(tiny_bundle), "fp16", threads=2, device="cpu")


@pytest.fixture
def pixels(scene_image, tiny_config):
    noise = np.random.default_rng(3).uniform(-1, 1, (3, 384, 384)).astype(np.float32)
    return np.stack([preprocess(scene_image, tiny_config), noise])  # [2, 3, 384, 384]


def cosine(a, b):
    a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def prompt(tokenizer, config, question="What is in the picture?"):
    return PromptBuilder(tokenizer, config).build(question).ids


def test_vision_matches_the_model(ort_fp32, tiny_model, pixels):
    expected = tiny_model.encode_images(torch.from_numpy(pixels)).numpy()
    got = ort_fp32.encode_images(pixels)
    assert got.shape == expected.shape == (2, 81, tiny_model.config.lm_hidden)
    np.testing.assert_allclose(got, expected, atol=FP32_ATOL, rtol=0)
    # Batch entries are independent: one image alone gives its row of the batch.
    np.testing.assert_allclose(ort_fp32.encode_images(pixels[1:]), got[1:], atol=1e-5, rtol=0)


def test_decoder_logits_and_cache_match_the_model(ort_fp32, tiny_model, tokenizer, tiny_config, pixels):
    c = tiny_config
    ids = prompt(tokenizer, c)
    embeds = tiny_model.encode_images(torch.from_numpy(pixels[:1]))
    past = [torch.zeros(1, c.lm_kv_heads, 0, c.lm_head_dim)] * (2 * c.lm_layers)
    positions = torch.arange(len(ids), dtype=torch.int32)[None]
    expected, *present = tiny_model(torch.from_numpy(ids).int()[None], embeds, positions, *past)
    session = ort_fp32.new_session()
    got = session.prefill(ids, embeds[0].numpy())
    np.testing.assert_allclose(got, expected[0].numpy(), atol=FP32_ATOL, rtol=0)
    # The cache itself (RoPE applied, [B, kv, S, hd] layout).
    for ours, theirs in zip(session.past, present):
        np.testing.assert_allclose(ours.numpy(), theirs.numpy(), atol=FP32_ATOL, rtol=0)
    token = int(np.argmax(got))
    step, *_ = tiny_model(torch.tensor([[token]], dtype=torch.int32), embeds,
                          torch.tensor([[len(ids)]], dtype=torch.int32), *present)
    np.testing.assert_allclose(session.step(token), step[0].numpy(), atol=FP32_ATOL, rtol=0)


def test_decoder_graph_batches_sequences_independently(tiny_bundle, ort_fp32, tiny_config, tokenizer, pixels):
    """Batch > 1 through the raw graph: each row (own image table, own ids) equals its batch-1 run."""
    path = open_bundle(tiny_bundle).variant("fp32").decoder
    decoder = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    embeds = ort_fp32.encode_images(pixels)  # [2, 81, H]
    ids = np.stack([prompt(tokenizer, tiny_config, "Is the door open?"), prompt(tokenizer, tiny_config, "What color?")])
    empty = np.zeros((2, tiny_config.lm_kv_heads, 0, tiny_config.lm_head_dim), np.float32)
    feeds = {"input_ids": ids.astype(np.int32), "image_embeds": embeds,
             "position_ids": np.tile(np.arange(ids.shape[1], dtype=np.int32), (2, 1)),
             **{name: empty for name in decoder_input_names(tiny_config)[3:]}}
    logits = decoder.run(["logits"], feeds)[0]
    for row in range(2):
        single = ort_fp32.new_session().prefill(ids[row], embeds[row])
        np.testing.assert_allclose(logits[row], single, atol=1e-5, rtol=0)


def test_fp16_variant_stays_close_to_fp32(ort_fp32, ort_fp16, tokenizer, tiny_config, pixels):
    assert ort_fp16.precision == "fp16" and ort_fp16.device == "cpu"
    e32, e16 = ort_fp32.encode_images(pixels), ort_fp16.encode_images(pixels)
    assert e16.dtype == np.float32
    assert cosine(e16, e32) >= FP16_MIN_COSINE
    ids = prompt(tokenizer, tiny_config)
    s32, s16 = ort_fp32.new_session(), ort_fp16.new_session()
    l32, l16 = s32.prefill(ids, e32[0]), s16.prefill(ids, e32[0])  # same inputs for both decoders
    assert l16.dtype == np.float32 and np.isfinite(l16).all()
    assert cosine(l16, l32) >= FP16_MIN_COSINE
    token = int(np.argmax(l32))
    assert cosine(s16.step(token), s32.step(token)) >= FP16_MIN_COSINE


def graphs(bundle_path):
    bundle = open_bundle(bundle_path)
    for name in bundle.variants:
        variant = bundle.variant(name)
        yield name, "vision", variant.vision
        yield name, "decoder", variant.decoder


def test_graphs_hold_only_standard_ops_at_the_declared_opset(tiny_bundle):
    for precision, graph_name, path in graphs(tiny_bundle):
        model = onnx.load(str(path))  # tiny: external data loaded too, so every tensor is inspected
        where = f"{precision} {graph_name}"
        opsets = {entry.domain: entry.version for entry in model.opset_import}
        assert set(opsets) == {""}, where  # no com.microsoft or other domains
        assert OPSET_RANGE[0] <= opsets[""] <= OPSET_RANGE[1], where
        assert {node.domain for node in model.graph.node} <= {""}, where
        assert not {node.op_type for node in model.graph.node} & {"If", "Loop", "Scan"}, where
        constants = list(model.graph.initializer) + [
            a.t for node in model.graph.node for a in node.attribute if a.type == onnx.AttributeProto.TENSOR
        ]
        for tensor in constants:
            if tensor.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16):
                assert not np.isinf(onnx.numpy_helper.to_array(tensor)).any(), f"{where}: {tensor.name} holds inf"
        assert graph_problems(model) == [], where


def test_graphs_follow_the_io_contract(tiny_bundle, tiny_config):
    for precision, graph_name, path in graphs(tiny_bundle):
        model = onnx.load(str(path), load_external_data=False)
        types = {
            v.name: (v.type.tensor_type.elem_type, [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim])
            for v in [*model.graph.input, *model.graph.output]
        }
        act = onnx.TensorProto.FLOAT16 if precision == "fp16" else onnx.TensorProto.FLOAT
        c = tiny_config
        if graph_name == "vision":
            assert [v.name for v in model.graph.input] == ["pixel_values"]
            assert types["pixel_values"] == (act, ["batch", 3, 384, 384])
            assert types["image_embeds"] == (act, ["batch", c.mp_tokens, c.lm_hidden])
        else:
            assert [v.name for v in model.graph.input] == decoder_input_names(c)
            assert [v.name for v in model.graph.output] == decoder_output_names(c)
            assert types["input_ids"] == (onnx.TensorProto.INT32, ["batch", "seq"])
            assert types["position_ids"] == (onnx.TensorProto.INT32, ["batch", "seq"])
            assert types["image_embeds"] == (act, ["batch", c.mp_tokens, c.lm_hidden])
            assert types["logits"] == (onnx.TensorProto.FLOAT, ["batch", c.lm_vocab])
            assert types["past_key_1"] == (act, ["batch", c.lm_kv_heads, "past", c.lm_head_dim])
            assert types["present_value_1"] == (act, ["batch", c.lm_kv_heads, "total", c.lm_head_dim])
        # All weights in the one external file beside the graph.
        big = [t for t in model.graph.initializer if np.prod(t.dims) * 2 > 4096]
        assert big and all(t.data_location == onnx.TensorProto.EXTERNAL for t in big)
        locations = {e.value for t in big for e in t.external_data if e.key == "location"}
        assert locations == {path.name + ".data"}


def test_graph_checker_flags_what_tensorrt_cannot_take():
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    inf = onnx.helper.make_tensor("neg_inf", onnx.TensorProto.FLOAT, [1], [-np.inf])
    nodes = [
        onnx.helper.make_node("Add", ["x", "neg_inf"], ["y"]),
        onnx.helper.make_node("FusedMatMul", ["y", "y"], ["z"], domain="com.microsoft"),
    ]
    z = onnx.helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, [1])
    graph = onnx.helper.make_graph(nodes, "g", [x], [z], [inf])
    opsets = [onnx.helper.make_opsetid("", 20), onnx.helper.make_opsetid("com.microsoft", 1)]
    model = onnx.helper.make_model(graph, opset_imports=opsets)
    problems = " | ".join(graph_problems(model))
    assert "com.microsoft" in problems and "opset 20" in problems and "inf" in problems


def test_manifest_lists_every_file_with_hash_size_and_versions(tiny_bundle):
    manifest = json.loads((tiny_bundle / MANIFEST).read_text())
    assert manifest["format_version"] == 2 and manifest["model"] == "tiny"
    on_disk = {p.relative_to(tiny_bundle).as_posix() for p in tiny_bundle.rglob("*") if p.is_file()} - {MANIFEST, STAMP}
    assert set(manifest["files"]) == on_disk
    assert {"fp16/decoder.onnx.data", "decoder.onnx.data", "tokenizer.json", "config.json"} <= on_disk
    for rel, entry in manifest["files"].items():
        assert entry["size"] == (tiny_bundle / rel).stat().st_size
        assert len(entry["sha256"]) == 64
    assert manifest["variants"]["fp32"]["decoder"] == "decoder.onnx"
    assert manifest["variants"]["fp16"]["vision"] == "fp16/vision.onnx"
    assert all(manifest["versions"][pkg] for pkg in ("torch", "onnx", "onnxruntime"))
    assert list(manifest["variants"]["fp32"]["io"]["decoder"]["outputs"])[:2] == ["logits", "present_key_0"]


# --- a changed, corrupt or mismatched bundle is refused -------------------------------------


@pytest.fixture
def bundle_copy(tiny_bundle, tmp_path):
    return shutil.copytree(tiny_bundle, tmp_path / "bundle")


def flip_byte(path, offset=1000):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def edit_manifest(bundle, change):
    manifest = json.loads((bundle / MANIFEST).read_text())
    change(manifest)
    (bundle / MANIFEST).write_text(json.dumps(manifest))


def test_changed_weights_are_refused_naming_the_file(bundle_copy):
    flip_byte(bundle_copy / "decoder.onnx.data")  # same size, new mtime
    bundle = open_bundle(bundle_copy)  # graphs are checked when a variant is used
    with pytest.raises(OmniVisionError, match=r"decoder\.onnx\.data.*sha256"):
        OrtBackend(bundle, "fp32")
    bundle.variant("fp16")  # the other variant is untouched


def test_truncated_and_missing_files_are_refused(bundle_copy):
    data = bundle_copy / "vision.onnx.data"
    data.write_bytes(data.read_bytes()[:-10])
    with pytest.raises(OmniVisionError, match=r"vision\.onnx\.data.*bytes.*manifest"):
        open_bundle(bundle_copy).variant("fp32")
    (bundle_copy / "fp16" / "decoder.onnx").unlink()
    with pytest.raises(OmniVisionError, match=r"fp16/decoder\.onnx.* missing"):
        open_bundle(bundle_copy).variant("fp16")


def test_changed_config_is_refused_on_open(bundle_copy):
    config = bundle_copy / "config.json"
    config.write_text(config.read_text().replace('"lm_layers": 2', '"lm_layers": 3'))
    with pytest.raises(OmniVisionError, match=r"config\.json.*sha256"):
        open_bundle(bundle_copy)


def test_full_verification_catches_what_the_stamp_cannot(bundle_copy):
    data = bundle_copy / "decoder.onnx.data"
    st = data.stat()
    flip_byte(data)
    os.utime(data, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size and mtime: looks untouched
    open_bundle(bundle_copy).variant("fp32")  # auto trusts the stamp (documented)
    with pytest.raises(OmniVisionError, match=r"decoder\.onnx\.data"):
        open_bundle(bundle_copy, verify="full").variant("fp32")


def test_stamp_is_refreshed_after_a_good_hash(bundle_copy):
    (bundle_copy / STAMP).unlink()
    open_bundle(bundle_copy).variant("fp32")
    stamp = json.loads((bundle_copy / STAMP).read_text())
    assert {"config.json", "decoder.onnx.data", "vision.onnx"} <= set(stamp)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda m: m.update(format_version=99), "format version 99"),
        (lambda m: m.update(model="omnivision-968m"), "for model 'omnivision-968m'"),
        (lambda m: m["variants"]["fp32"]["io"]["decoder"]["inputs"].pop("past_value_1"), "do not match config.json"),
        (lambda m: m["files"].pop("fp16/vision.onnx"), "does not list"),
    ],
)
def test_manifest_mismatch_is_refused(bundle_copy, change, message):
    edit_manifest(bundle_copy, change)
    with pytest.raises(OmniVisionError, match=message):
        open_bundle(bundle_copy).variant("fp16")


def test_bundles_of_format_1_still_open_and_run(bundle_copy, tokenizer, tiny_config):
    """Format 1 wrote the generation defaults into config.json; format 2 left them out of the config."""
    config = json.loads((bundle_copy / CONFIG_FILE).read_text())
    config.update(gen_max_new_tokens=256, stop_token_ids=[151645, 151643])
    (bundle_copy / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    entry = {"sha256": sha256_file(bundle_copy / CONFIG_FILE), "size": (bundle_copy / CONFIG_FILE).stat().st_size}
    edit_manifest(bundle_copy, lambda m: m.update(format_version=1) or m["files"].update({CONFIG_FILE: entry}))
    bundle = open_bundle(bundle_copy, verify="full")
    assert bundle.format_version == 1 and bundle.config == tiny_config
    ids = prompt(tokenizer, tiny_config)
    logits = OrtBackend(bundle, "fp32", threads=1).new_session().prefill(ids, np.zeros((81, 64), np.float32))
    assert np.isfinite(logits).all()
    edit_manifest(bundle_copy, lambda m: m.update(format_version=0))
    with pytest.raises(OmniVisionError, match="format version 0 is not one this omnivision_ros reads"):
        open_bundle(bundle_copy)


def test_factory_reports_a_bad_bundle_clearly(bundle_copy):
    flip_byte(bundle_copy / "tokenizer.json", 10)
    with pytest.raises(OmniVisionError, match=r"model bundle .*tokenizer\.json.*re-export"):
        open_model(str(bundle_copy), "onnxruntime")


# --- the export command ----------------------------------------------------------------------


def test_export_refuses_to_overwrite_what_is_not_a_bundle(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("keep me")
    assert export_main(["--model", "tiny", "--out", str(tmp_path), "--no-progress"]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (tmp_path / "notes.txt").read_text() == "keep me"
    assert export_main(["--model", "/no/such/folder", "--out", str(tmp_path / "b"), "--no-progress"]) == 2
    assert "neither a preset" in capsys.readouterr().err


def test_export_force_replaces_a_bundle(bundle_copy):
    assert export_main(["--model", "tiny", "--out", str(bundle_copy), "--no-progress"]) == 2  # exists
    assert export_main(["--model", "tiny", "--out", str(bundle_copy), "--force", "--cpu-variants", "none",
                        "--no-progress"]) == 0
    bundle = open_bundle(bundle_copy, verify="full")
    assert bundle.variants == ["fp32"] and not (bundle_copy / "fp16").exists()
    bundle.variant("fp32")
    assert not [p for p in bundle_copy.parent.iterdir() if p.name.startswith(".")]  # no scratch left behind
