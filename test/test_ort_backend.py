"""The ONNX Runtime backend on the tiny bundle: same tokens as the PyTorch reference, cache handling,
reuse across questions, and a runtime path that never imports torch."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from omnivision_ros.errors import OmniVisionError
from omnivision_ros.model.prompt import PromptBuilder
from omnivision_ros.model.bundle import open_bundle
from omnivision_ros.runtime.factory import open_model
from omnivision_ros.runtime.generator import GenerationConfig, decode
from omnivision_ros.runtime.ort_backend import OrtBackend
from omnivision_ros.runtime.pipeline import Pipeline

SAMPLE = Path(__file__).resolve().parents[1] / "omnivision_ros" / "data" / "sample.jpg"
GREEDY_32 = GenerationConfig(max_new_tokens=32, stop_token_ids=())  # never stops early: 32 real steps


@pytest.fixture(scope="module")
def ort_backend(tiny_bundle):
    return OrtBackend(open_bundle(tiny_bundle), threads=2)


@pytest.fixture(scope="module")
def torch_backend(tiny_model):
    from omnivision_ros.runtime.torch_backend import TorchBackend

    return TorchBackend(tiny_model)


@pytest.mark.parametrize("kind", ["onnxruntime", "torch"])
def test_every_backend_refuses_bad_decoder_input_alike(kind, ort_backend, torch_backend, tiny_config):
    """The checks live in DecoderSession, once for all backends (TensorRT's run in test_tensorrt.py)."""
    backend = ort_backend if kind == "onnxruntime" else torch_backend
    session = backend.new_session()
    v, limit = tiny_config.lm_vocab, tiny_config.lm_vocab + tiny_config.mp_tokens
    for call, message in [
        (lambda: session.prefill(np.array([], np.int64)), "at least one token"),
        (lambda: session.prefill(np.array([1, v + 2])), "no image embeddings"),
        (lambda: session.prefill(np.array([limit])), rf"token ids must lie in \[0, {limit}\)"),
        (lambda: session.prefill(np.array([-1])), "token ids must lie"),
        (lambda: session.prefill(np.ones(tiny_config.lm_max_context + 1, np.int64)), "context full"),
        (lambda: session.step(v + 1), "generated token id"),
    ]:
        with pytest.raises(OmniVisionError, match=message):
            call()
    logits = session.prefill(np.array([1, v + 2]), np.zeros((81, tiny_config.lm_hidden), np.float32))
    assert logits.shape == (v,) and session.length == 2 and session.has_image
    session.step(int(np.argmax(logits)))
    assert session.length == 3


def run(*args, timeout=120):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=env)


def test_backend_defaults_to_fp32_on_cpu(ort_backend):
    assert ort_backend.name == "onnxruntime"
    assert (ort_backend.precision, ort_backend.device) == ("fp32", "cpu")
    assert "fp32" in ort_backend.description and "CPU" in ort_backend.description


def test_greedy_tokens_match_torch_for_32_steps(ort_backend, torch_backend, tokenizer, tiny_config, scene_image):
    from omnivision_ros.model.preprocess import preprocess

    pixels = preprocess(scene_image, tiny_config)[None]
    ids = PromptBuilder(tokenizer, tiny_config).build("What do you see?").ids
    tokens = []
    for backend in (ort_backend, torch_backend):
        session = backend.new_session()
        logits = session.prefill(ids, backend.encode_images(pixels)[0])
        tokens.append(decode(session, logits, GREEDY_32).token_ids)
    assert len(tokens[0]) == 32
    assert tokens[0] == tokens[1]
    assert len(set(tokens[0])) > 3  # varied text, so the comparison means something


def test_prefill_then_steps_equals_one_long_prefill(ort_backend, tokenizer, tiny_config, scene_image):
    from omnivision_ros.model.preprocess import preprocess

    embeds = ort_backend.encode_images(preprocess(scene_image, tiny_config)[None])[0]
    prompts = PromptBuilder(tokenizer, tiny_config)
    question = prompts.question_ids("Is the door open?")
    pieces = ort_backend.new_session()
    pieces.prefill(prompts.prefix_ids, embeds)
    logits = pieces.prefill(question)
    steps = [int(np.argmax(logits))]
    for _ in range(3):
        steps.append(int(np.argmax(pieces.step(steps[-1]))))
    whole = ort_backend.new_session()
    expected = whole.prefill(np.concatenate([prompts.prefix_ids, question, steps[:-1]]), embeds)
    assert pieces.length == whole.length
    np.testing.assert_allclose(pieces.step(steps[-1]), whole.step(steps[-1]), atol=1e-5, rtol=0)
    assert int(np.argmax(expected)) == steps[-1]


def test_fork_gives_independent_sessions(ort_backend, tokenizer, tiny_config):
    ids = PromptBuilder(tokenizer, tiny_config).question_ids("Hello there")
    base = ort_backend.new_session()
    base.prefill(ids)
    a, b = base.fork(), base.fork()
    la = a.step(11)
    b.step(22)
    b.step(33)
    assert (a.length, b.length, base.length) == (len(ids) + 1, len(ids) + 2, len(ids))
    fresh = ort_backend.new_session()
    fresh.prefill(ids)
    np.testing.assert_array_equal(fresh.step(11), la)  # b's steps did not leak into a
    np.testing.assert_array_equal(base.step(11), la)  # nor into the session they were forked from
    base.close()
    np.testing.assert_array_equal(a.step(44), fresh.step(44))  # closing the parent leaves forks working


def test_session_rejects_bad_input(ort_backend, tiny_config):
    session = ort_backend.new_session()
    with pytest.raises(OmniVisionError, match="no image embeddings"):
        session.prefill(np.array([1, tiny_config.lm_vocab + 2]))
    with pytest.raises(OmniVisionError, match="token ids must lie"):
        session.prefill(np.array([tiny_config.lm_vocab + tiny_config.mp_tokens]))
    with pytest.raises(OmniVisionError, match="context full"):
        session.prefill(np.ones(tiny_config.lm_max_context + 1, np.int64))
    with pytest.raises(OmniVisionError, match=r"image embeddings must be \[81, 64\]"):
        session.prefill(np.array([1]), np.zeros((80, 64), np.float32))
    with pytest.raises(OmniVisionError, match="pixel_values must be"):
        ort_backend.encode_images(np.zeros((1, 3, 224, 224), np.float32))
    with pytest.raises(OmniVisionError, match="generated token id must lie"):
        session.step(tiny_config.lm_vocab)  # an image position is never a generated token
    with pytest.raises(OmniVisionError, match="must be integers"):
        session.prefill(np.array([1.5]))
    assert session.length == 0 and not session.has_image  # refused calls left the session as it was
    session.close()
    with pytest.raises(OmniVisionError, match="closed"):
        session.step(1)
    session.close()  # a second close is harmless


def test_pipeline_reuse_gives_the_cold_answer(ort_backend, tokenizer, scene_image):
    gen = GenerationConfig(max_new_tokens=12, stop_token_ids=())
    warm = Pipeline(ort_backend, tokenizer, gen)
    first = warm.ask(scene_image, "What do you see?", frame_key=("front", 1))
    second = warm.ask(scene_image, "Is the door open?", frame_key=("front", 1))
    assert not first.timing.vision_cache_hit and not first.timing.prefix_cache_hit
    assert second.timing.vision_cache_hit and second.timing.prefix_cache_hit
    assert second.timing.prompt_tokens == len(warm.prompts.question_ids("Is the door open?"))
    again = warm.ask(scene_image, "What do you see?", frame_key=("front", 1))
    cold = Pipeline(ort_backend, tokenizer, gen).ask(scene_image, "Is the door open?", frame_key=("front", 1))
    assert (second.token_ids, second.text) == (cold.token_ids, cold.text)
    assert (again.token_ids, again.text) == (first.token_ids, first.text)
    assert len(first.token_ids) == 12


def test_pipeline_caches_evict_when_full(ort_backend, tokenizer, scene_image):
    gen = GenerationConfig(max_new_tokens=2)
    pipeline = Pipeline(ort_backend, tokenizer, gen, vision_cache_size=2, prefix_cache_size=1)
    pipeline.ask(scene_image, "What?", frame_key=("cam", 1))
    oldest_prefix = pipeline.prefix_cache.get((("cam", 1), "bgr"))
    for stamp in (2, 3):
        pipeline.ask(scene_image, "What?", frame_key=("cam", stamp))
    assert (len(pipeline.vision_cache), len(pipeline.prefix_cache)) == (2, 1)
    assert oldest_prefix.past is None  # evicted sessions are closed, their cache released
    repeat = pipeline.ask(scene_image, "What?", frame_key=("cam", 1))
    assert not repeat.timing.vision_cache_hit and not repeat.timing.prefix_cache_hit


def test_factory_opens_a_bundle_on_onnxruntime(tiny_bundle):
    backend, tokenizer = open_model(str(tiny_bundle))
    assert backend.name == "onnxruntime"
    assert tokenizer.token_id("<|im_end|>") == 151645
    with pytest.raises(OmniVisionError, match="torch backend runs presets and GGUF"):
        open_model(str(tiny_bundle), "torch")


NO_TORCH_SCRIPT = """
import sys
from omnivision_ros.model.preprocess import load_image
from omnivision_ros.runtime.factory import open_model
from omnivision_ros.runtime.generator import GenerationConfig
from omnivision_ros.runtime.pipeline import Pipeline

backend, tokenizer = open_model(sys.argv[1])
answer = Pipeline(backend, tokenizer, GenerationConfig(max_new_tokens=4)).ask(load_image(sys.argv[2]), "What is this?")
heavy = sorted(name for name in ("torch", "transformers", "onnx") if name in sys.modules)
print(backend.name, len(answer.token_ids), heavy)
"""


def test_runtime_imports_no_torch(tiny_bundle):
    result = run("-c", NO_TORCH_SCRIPT, str(tiny_bundle), str(SAMPLE))
    assert result.returncode == 0, result.stderr
    name, _, heavy = result.stdout.strip().split(" ", 2)
    assert name == "onnxruntime"
    assert heavy == "[]", f"the runtime imported {heavy}"


def test_ask_cli_answers_from_a_bundle(tiny_bundle):
    result = run("-m", "omnivision_ros.cli.ask", "--model", str(tiny_bundle), "--image", str(SAMPLE),
                 "--max-new-tokens", "6", "What do you see?")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    timing = result.stderr.strip().splitlines()[-1]
    assert timing.startswith("[onnxruntime]") and "first token" in timing
