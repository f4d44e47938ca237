"""gpu-int4: the weight-only INT4 decoder for TensorRT, checked on ONNX Runtime's CPU provider.

The INT4 layout and quantizer, the graph's op audit (the form TensorRT's ONNX parser takes: standard ops at
opset 21, DequantizeLinear on constant INT4 weights, axis 0, positive float16 scales, no zero point, no
control flow), and parity: its logits against fp32 are at least as close as those of the same weights rounded
through llama.cpp's Q4_0 (gguf-py's quantizer) and run through the same model.
"""
import json
import shutil

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from omnivision_ros.errors import OmniVisionError
from omnivision_ros.export.gpu_int4 import (
    INT4_OPSET,
    add_gpu_int4,
    dequantize_int4,
    int4_graph_problems,
    int4_tensor,
    quantize_int4,
)
from omnivision_ros.model.bundle import open_bundle
from omnivision_ros.model.variants import GPU_INT4, VARIANTS, tensorrt_variant

SPEC = VARIANTS[GPU_INT4].quantization


def test_int4_initializers_use_onnx_packing():
    q = np.random.default_rng(0).integers(-8, 8, (64, 6)).astype(np.int8)
    tensor = int4_tensor("w", q)
    assert tensor.data_type == onnx.TensorProto.INT4 and len(tensor.raw_data) == q.size // 2
    np.testing.assert_array_equal(numpy_helper.to_array(tensor), q)  # onnx's own reader agrees
    q[0, :2] = (5, 2)
    assert int4_tensor("w", q).raw_data[0] == 0x25  # element 0 in the low nibble, element 1 in the high one


def test_quantizer_blocks_scales_and_error():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((96, 10)).astype(np.float32)
    w[32:64, 3] = 0  # an all-zero block: TensorRT still needs a positive scale
    q, scales = quantize_int4(w, 32)
    assert q.dtype == np.int8 and q.min() >= -8 and q.max() <= 7
    assert scales.shape == (3, 10) and scales.dtype == np.float16 and (scales > 0).all()
    back = dequantize_int4(q, scales)
    assert np.all(back[32:64, 3] == 0)
    # The scale search is never worse than the plain absmax / 7 choice, and beats it overall.
    blocks = w.reshape(3, 32, 10)
    plain = (np.abs(blocks).max(axis=1) / 7).astype(np.float16).astype(np.float32)
    plain[plain == 0] = 1
    plain_back = np.clip(np.rint(blocks / plain[:, None]), -8, 7) * plain[:, None]
    err, plain_err = ((back - w) ** 2).reshape(3, 32, 10).sum(1), ((plain_back - blocks) ** 2).sum(1)
    assert (err <= plain_err + 1e-7).all() and err.sum() < 0.9 * plain_err.sum()
    with pytest.raises(OmniVisionError, match="blocks of 32"):
        quantize_int4(w[:40], 32)


@pytest.fixture(scope="module")
def int4_bundle(tiny_bundle, tmp_path_factory):
    path = tmp_path_factory.mktemp("int4") / "bundle"
    shutil.copytree(tiny_bundle, path)
    assert add_gpu_int4(path)
    return path


def test_variant_is_listed_and_shares_the_fp16_vision_graph(int4_bundle):
    bundle = open_bundle(int4_bundle, verify="full")
    variant = bundle.variant(GPU_INT4)
    assert tensorrt_variant("int4") == GPU_INT4
    assert variant.precision == "fp16" and variant.vision == int4_bundle / "fp16" / "vision.onnx"
    entry = json.loads((int4_bundle / "manifest.json").read_text())["variants"][GPU_INT4]
    assert entry["decoder"] == "gpu-int4/decoder.onnx" and entry["derived_from"] == "fp16"
    assert entry["quantization"]["block_size"] == SPEC.block_size
    assert not add_gpu_int4(int4_bundle)  # present already: kept


def test_graph_has_the_form_tensorrt_parses(int4_bundle, tiny_config):
    model = onnx.load(str(int4_bundle / "gpu-int4" / "decoder.onnx"))
    assert int4_graph_problems(model, SPEC) == []
    assert [o.version for o in model.opset_import] == [INT4_OPSET]
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("DequantizeLinear") == 4 * tiny_config.lm_layers  # qkv, o, gate_up, down
    assert ops.count("Gemm") == 1  # the lm_head stays float16 over the tied table
    assert not any(t.data_type == onnx.TensorProto.FLOAT16 and len(t.dims) == 2
                   and t.name not in ("embed", "cos", "sin") and not t.name.endswith(".scales")
                   for t in model.graph.initializer)  # no float16 matrix left besides the table
    # The audit catches what TensorRT would reject.
    scale = next(t for t in model.graph.initializer if t.name.endswith(".scales"))
    scale.CopyFrom(numpy_helper.from_array(-numpy_helper.to_array(scale), scale.name))
    model.graph.node[0].CopyFrom(onnx.helper.make_node("If", ["c"], ["d"], name="branch"))
    problems = int4_graph_problems(model, SPEC)
    assert any("strictly positive" in p for p in problems) and any("control flow If" in p for p in problems)


def _teacher_forced(bundle, precision, ids, image, tokens=None, steps=8):
    """Prefill, then steps on `tokens` (None: greedy, own tokens); logits after each call and the tokens."""
    from omnivision_ros.runtime.ort_backend import OrtBackend

    backend = OrtBackend(bundle, precision=precision, device="cpu")
    session = backend.new_session()
    logits = [session.prefill(ids, image)]
    greedy = []
    for i in range(steps):
        greedy.append(int(np.argmax(logits[-1])))
        logits.append(session.step(greedy[-1] if tokens is None else tokens[i]))
    return logits, greedy


def _cos(a, b):
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_int4_logits_at_least_as_close_to_fp32_as_q4_0(int4_bundle, tiny_config):
    pytest.importorskip("gguf")
    from omnivision_ros.cli.bench import GGML_Q4_0, add_ggml_q4_0_variant

    add_ggml_q4_0_variant(int4_bundle)
    bundle = open_bundle(int4_bundle)
    c = tiny_config
    rng = np.random.default_rng(2)
    ids = np.array([151644, 8, 9, 151652, *range(c.lm_vocab, c.lm_vocab + c.mp_tokens), 151653, *range(40, 70), 151645])
    image = rng.standard_normal((c.mp_tokens, c.lm_hidden)).astype(np.float32)
    ref, tokens = _teacher_forced(bundle, "fp32", ids, image)
    cosines, agree = {}, {}
    for variant in (GPU_INT4, GGML_Q4_0):
        got, picks = _teacher_forced(bundle, variant, ids, image, tokens)  # fed the fp32 tokens
        assert all(np.isfinite(g).all() for g in got)
        cosines[variant] = [_cos(r, g) for r, g in zip(ref, got)]
        agree[variant] = sum(a == b for a, b in zip(picks, tokens))
    print(f"logits cosine vs fp32, mean over prefill + {len(tokens)} teacher-forced steps (greedy agreement): "
          + ", ".join(f"{k} {np.mean(v):.4f} ({agree[k]}/{len(tokens)})" for k, v in cosines.items()))
    assert np.mean(cosines[GPU_INT4]) >= np.mean(cosines[GGML_Q4_0])
    assert min(cosines[GPU_INT4]) > 0.9


def test_onnxruntime_runs_int4_with_float_math(int4_bundle):
    """The backend pins the DequantizeLinear+MatMul fusion to float32 math: the same logits as the unfused
    graph (dequantize, then a float MatMul), where ONNX Runtime's default (int8 activations) is further off."""
    import onnxruntime as ort

    from omnivision_ros.runtime.ort_backend import ORT_INT4_SESSION_CONFIG

    path = str(int4_bundle / "gpu-int4" / "decoder.onnx")
    config = open_bundle(int4_bundle).config
    rng = np.random.default_rng(3)
    feeds = {"input_ids": np.array([[1, 2, config.lm_vocab, 9, 30]], np.int32),
             "image_embeds": rng.standard_normal((1, config.mp_tokens, config.lm_hidden)).astype(np.float16),
             "position_ids": np.arange(5, dtype=np.int32)[None]}
    for i in range(config.lm_layers):
        for kind in ("key", "value"):
            feeds[f"past_{kind}_{i}"] = np.zeros((1, config.lm_kv_heads, 0, config.lm_head_dim), np.float16)

    def logits(level=None, unfused=False):
        options = ort.SessionOptions()
        if unfused:
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        for key, value in ({} if level is None else {**ORT_INT4_SESSION_CONFIG, next(iter(ORT_INT4_SESSION_CONFIG)): level}).items():
            options.add_session_config_entry(key, value)
        return ort.InferenceSession(path, options).run(["logits"], feeds)[0]

    exact = logits(unfused=True)
    pinned = logits(level=ORT_INT4_SESSION_CONFIG["session.qdq_matmulnbits_accuracy_level"])
    default = logits()
    # Strictly closer on ONNX Runtime 1.31; 1.23 (the newest for Python 3.10) keeps float math by default.
    assert np.abs(pinned - exact).max() <= np.abs(default - exact).max()
    assert np.abs(pinned - exact).max() <= 1e-2 * np.abs(exact).max()
