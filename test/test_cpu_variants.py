"""CPU variants (export/cpu_optimize.py) on the tiny preset: they export, load, follow the graph contract and
stay close to the fp32 graphs.

Tolerances, with what was measured on the tiny preset (seed 0) on the development machine:
- cpu-int8: cosine to fp32 >= 0.99 on image embeddings (measured 0.9998) and on the last-position logits
  of the prefill and of 24 decode steps (measured 0.9987 to 0.9997). Greedy tokens, teacher-forced (both
  sessions fed fp32's tokens, argmax compared per step): >= 80 % agree (measured 96 %, 23 of 24).
  Free-running greedy text diverges early (measured: the first token agrees, the second does not): a
  random model's top logits are nearly tied, so one flipped argmax changes everything after it.
- cpu-int4: the same int8 vision graph, so the same embeddings. Its logits are held to cosine >= 0.85
  (measured 0.97 after the prefill, 0.92 to 0.97 over the steps; teacher-forced agreement 58 %, bound 30 %):
  4-bit weights drift much further on random weights. At full size the int4 logits' cosine is 0.87 and
  llama.cpp's Q4_0 of the same weights gets 0.80 on the same prompt, so this is what 4-bit costs here, not a
  defect; int4 is an opt-in speed variant, never the default, and misses the 0.99 target (docs/performance.md).
"""
import dataclasses
import json
import shutil

import numpy as np
import pytest

from omnivision_ros.errors import OmniVisionError
from omnivision_ros.model.bundle import MANIFEST, decoder_input_names, decoder_output_names, open_bundle
from omnivision_ros.model.prompt import PromptBuilder
from omnivision_ros.model import variants
from omnivision_ros.runtime.generator import GenerationConfig
from omnivision_ros.runtime.ort_backend import OrtBackend
from omnivision_ros.runtime.pipeline import Pipeline

pytest.importorskip("torch", reason="the CPU variants are built at export time, with torch")

from omnivision_ros.export.cli import main as export_main  # noqa: E402
from omnivision_ros.export.cpu_optimize import Weights, model_weights  # noqa: E402
from omnivision_ros.export.onnx_export import graph_problems  # noqa: E402

VARIANTS = ("cpu-int8", "cpu-int4")
MIN_COSINE = {"cpu-int8": 0.99, "cpu-int4": 0.85}
MIN_EMBEDS_COSINE = 0.99
MIN_TEACHER_FORCED_AGREEMENT = {"cpu-int8": 0.8, "cpu-int4": 0.3}


@pytest.fixture(scope="module")
def cpu_bundle(tiny_bundle, tmp_path_factory):
    """A copy of the tiny bundle with both CPU variants added in place through omnivision-export."""
    path = tmp_path_factory.mktemp("cpu") / "bundle"
    shutil.copytree(tiny_bundle, path)
    assert export_main(["--model", str(path), "--out", str(path), "--cpu-variants", "int8,int4", "--no-progress"]) == 0
    return path


@pytest.fixture(scope="module")
def backends(cpu_bundle):
    bundle = open_bundle(cpu_bundle)
    return {name: OrtBackend(bundle, name, threads=2) for name in ("fp32", *VARIANTS)}


@pytest.fixture(scope="module")
def pixels(tiny_config):
    return np.random.default_rng(3).uniform(-1, 1, (2, 3, 384, 384)).astype(np.float32)  # [2, 3, 384, 384]


def cosine(a, b):
    a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_variants_are_in_the_manifest_and_verify(cpu_bundle, tiny_config):
    manifest = json.loads((cpu_bundle / MANIFEST).read_text())
    bundle = open_bundle(cpu_bundle, verify="full")
    assert bundle.variants == ["fp32", "fp16", *VARIANTS]
    for name in VARIANTS:
        entry = manifest["variants"][name]
        assert entry["precision"] == "fp32" and entry["derived_from"] == "fp32"
        assert entry["quantization"] == dataclasses.asdict(variants.VARIANTS[name].quantization)  # what was built
        assert entry["vision"] == f"{name}/vision.onnx" and entry["decoder"] == f"{name}/decoder.onnx"
        for rel in (entry["vision"], entry["decoder"], *entry["data"]):
            assert manifest["files"][rel]["size"] == (cpu_bundle / rel).stat().st_size
        assert list(entry["io"]["decoder"]["inputs"]) == decoder_input_names(tiny_config)
        assert list(entry["io"]["decoder"]["outputs"]) == decoder_output_names(tiny_config)
        bundle.variant(name)  # hashes match


def test_the_fp32_graphs_hold_the_models_weights_by_its_names(tiny_bundle, tiny_model):
    """The CPU variants read the model's weights by parameter name, from the model or (for a bundle) from its
    fp32 graphs: both sources give the same arrays for every weight."""
    fp32 = open_bundle(tiny_bundle).variant("fp32")
    lm = [n for n, _ in tiny_model.language_model.named_parameters()] + ["cos", "sin"]
    vision = [n for n, _ in tiny_model.named_parameters() if not n.startswith("language_model.")]
    for path, prefix, names in ((fp32.decoder, "language_model.", lm), (fp32.vision, "", vision)):
        from_graph, from_model = Weights(path), model_weights(tiny_model, prefix)
        for name in names:
            np.testing.assert_array_equal(from_graph(name), from_model(name), err_msg=name)


def test_variants_built_from_the_model_equal_those_from_the_graphs(cpu_bundle, tmp_path):
    import onnx

    out = tmp_path / "bundle"
    assert export_main(["--model", "tiny", "--out", str(out), "--no-progress"]) == 0  # int8 by default
    assert open_bundle(out).variants == ["fp32", "cpu-int8"]
    for graph in ("vision.onnx", "decoder.onnx"):
        ours = onnx.load(str(out / "cpu-int8" / graph))
        theirs = onnx.load(str(cpu_bundle / "cpu-int8" / graph))
        assert ours.graph.node == theirs.graph.node
        weights = {t.name: onnx.numpy_helper.to_array(t) for t in theirs.graph.initializer}
        for tensor in ours.graph.initializer:
            np.testing.assert_array_equal(onnx.numpy_helper.to_array(tensor), weights[tensor.name], err_msg=tensor.name)


def test_adding_variants_to_a_bundle_of_format_1_asks_for_a_re_export(tiny_bundle, tmp_path):
    old = shutil.copytree(tiny_bundle, tmp_path / "old")
    manifest = json.loads((old / MANIFEST).read_text())
    manifest["format_version"] = 1  # its vision weights had other names
    (old / MANIFEST).write_text(json.dumps(manifest))
    assert export_main(["--model", str(old), "--out", str(old), "--cpu-variants", "int8", "--no-progress"]) == 2
    assert open_bundle(old).variants == ["fp32", "fp16"]  # untouched


def test_variants_use_contrib_ops_and_the_standard_graphs_stay_standard(cpu_bundle):
    import onnx

    def ops(path):
        return {n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node}

    for name in VARIANTS:
        decoder = ops(cpu_bundle / name / "decoder.onnx")
        fused = {"MatMulNBits", "GroupQueryAttention", "GatherBlockQuantized", "SkipSimplifiedLayerNormalization"}
        assert fused <= decoder
        assert "MatMul" not in decoder  # every weight matrix is quantized
        assert {"DynamicQuantizeMatMul", "MultiHeadAttention"} <= ops(cpu_bundle / name / "vision.onnx")
    for graph in ("vision.onnx", "decoder.onnx"):
        assert graph_problems(onnx.load(str(cpu_bundle / graph), load_external_data=False)) == []


@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_stays_close_to_fp32(backends, variant, pixels, tokenizer, tiny_config):
    fp32, other = backends["fp32"], backends[variant]
    ref_embeds = fp32.encode_images(pixels)
    embeds = other.encode_images(pixels)  # batch of 2: the dynamic batch still works
    assert embeds.shape == ref_embeds.shape == (2, tiny_config.mp_tokens, tiny_config.lm_hidden)
    for i in range(2):
        assert cosine(embeds[i], ref_embeds[i]) >= MIN_EMBEDS_COSINE
    ids = PromptBuilder(tokenizer, tiny_config).build("What is in the picture?").ids
    ref_session, session = fp32.new_session(), other.new_session()
    ref_logits = ref_session.prefill(ids, ref_embeds[0])
    logits = session.prefill(ids, ref_embeds[0])  # same inputs: the decoder alone is compared
    assert cosine(logits, ref_logits) >= MIN_COSINE[variant]
    # Teacher forcing: both sessions take fp32's greedy token, so every step compares like with like.
    agree = []
    for _ in range(24):
        token = int(np.argmax(ref_logits))
        agree.append(token == int(np.argmax(logits)))
        ref_logits, logits = ref_session.step(token), session.step(token)
        assert cosine(logits, ref_logits) >= MIN_COSINE[variant]
    assert np.mean(agree) >= MIN_TEACHER_FORCED_AGREEMENT[variant]


@pytest.mark.parametrize("variant", VARIANTS)
def test_prefill_in_pieces_equals_one_prefill(backends, variant, tokenizer, tiny_config, pixels):
    """The path a second question takes: past > 0 and several new tokens through GroupQueryAttention."""
    backend = backends[variant]
    embeds = backend.encode_images(pixels[:1])[0]
    prompts = PromptBuilder(tokenizer, tiny_config)
    question = prompts.question_ids("Is the door open?")
    pieces = backend.new_session()
    pieces.prefill(prompts.prefix_ids, embeds)
    forked = pieces.fork()
    logits = pieces.prefill(question)
    whole = backend.new_session().prefill(np.concatenate([prompts.prefix_ids, question]), embeds)
    np.testing.assert_allclose(logits, whole, atol=1e-4)
    np.testing.assert_allclose(forked.prefill(question), whole, atol=1e-4)  # the fork kept the prefix only
    steps = backend.new_session()
    steps.prefill(prompts.prefix_ids, embeds)
    for token in question[:-1]:
        steps.step(int(token))
    np.testing.assert_allclose(steps.step(int(question[-1])), whole, atol=1e-4)


def test_pipeline_reuse_gives_the_cold_answer_on_int8(backends, tokenizer, scene_image):
    gen = GenerationConfig(max_new_tokens=8, stop_token_ids=())
    warm = Pipeline(backends["cpu-int8"], tokenizer, gen)
    warm.ask(scene_image, "What do you see?", frame_key="f")
    second = warm.ask(scene_image, "Is the door open?", frame_key="f")
    cold = Pipeline(backends["cpu-int8"], tokenizer, gen).ask(scene_image, "Is the door open?", frame_key="f")
    assert second.timing.prefix_cache_hit and not cold.timing.prefix_cache_hit
    assert second.token_ids == cold.token_ids


def test_precision_names_and_the_cpu_default(cpu_bundle, tiny_bundle):
    bundle = open_bundle(cpu_bundle)
    assert OrtBackend(bundle, threads=1, device="cpu").variant == "cpu-int8"  # the CPU default when present
    assert OrtBackend(bundle, "int4", threads=1).variant == "cpu-int4"
    assert OrtBackend(bundle, "fp32", threads=1).variant == "fp32"
    assert OrtBackend(open_bundle(tiny_bundle), threads=1, device="cpu").variant == "fp32"  # no CPU variants
    with pytest.raises(OmniVisionError, match="--cpu-variants int8"):
        OrtBackend(open_bundle(tiny_bundle), "int8")


def test_export_writes_int8_unless_told_not_to():
    from omnivision_ros.export.cli import build_parser, cpu_variant_kinds

    def kinds(*argv):
        args = build_parser().parse_args(["--model", "tiny", "--out", "b", *argv])
        return cpu_variant_kinds(args.cpu_variants, args.tensorrt)

    assert kinds() == ["int8"]
    assert kinds("--fp16") == ["int8"]
    assert kinds("--cpu-variants", "none") == []
    assert kinds("--tensorrt") == []  # engines for a GPU: no CPU variant unless asked
    assert kinds("--tensorrt", "--cpu-variants", "int8,int4") == ["int8", "int4"]


def test_export_flag_rejects_unknown_variants_and_needs_the_same_path(cpu_bundle, tmp_path, capsys):
    assert export_main(["--model", "tiny", "--out", str(tmp_path / "b"), "--cpu-variants", "int3"]) == 2
    assert "unknown int3" in capsys.readouterr().err
    assert export_main(["--model", str(cpu_bundle), "--out", str(tmp_path / "other"), "--cpu-variants", "int8"]) == 2
    assert "is a bundle" in capsys.readouterr().err
    assert export_main(["--model", str(cpu_bundle), "--out", str(cpu_bundle), "--cpu-variants", "int8",
                        "--no-progress"]) == 0  # already there: kept
    assert "already present" in capsys.readouterr().err
