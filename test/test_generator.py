import numpy as np
import pytest

from omnivision_ros.errors import OmniVisionError
from omnivision_ros.model.config import get_preset
from omnivision_ros.model.tokens import STOP_TOKEN_IDS
from omnivision_ros.runtime.backend import DecoderSession
from omnivision_ros.runtime.generator import GenerationConfig, Sampler, decode
from omnivision_ros.runtime.pipeline import Pipeline

VOCAB = 151936


class ScriptedSession(DecoderSession):
    """A session whose logits favour a scripted sequence of tokens (tests the loop, not a model)."""

    def __init__(self, script):
        super().__init__(get_preset("tiny"), max_context=512)
        self.script, self.steps = list(script), []

    def _run(self, ids, image_embeds):
        if self.length:  # a step after the prefill
            self.steps.append(int(ids[0]))
        logits = np.zeros(VOCAB, np.float32)
        logits[self.script[len(self.steps)]] = 10.0
        return logits

    def _fork(self):
        raise NotImplementedError


def test_stops_on_stop_token_and_excludes_it():
    session = ScriptedSession([3, 4, 9, 5, 6])
    result = decode(session, session.prefill([1]), GenerationConfig(max_new_tokens=10, stop_token_ids=(9,)))
    assert result.token_ids == [3, 4] and result.stop_reason == "stop"


@pytest.mark.parametrize("stop", STOP_TOKEN_IDS)
def test_default_stop_set_ends_generation(stop):
    session = ScriptedSession([3, 4, stop, 5, 6])
    result = decode(session, session.prefill([1]), GenerationConfig(max_new_tokens=10))
    assert result.token_ids == [3, 4] and result.stop_reason == "stop"


def test_max_new_tokens():
    session = ScriptedSession(list(range(1, 40)))
    result = decode(session, session.prefill([1]), GenerationConfig(max_new_tokens=5, stop_token_ids=()))
    assert result.token_ids == [1, 2, 3, 4, 5] and result.stop_reason == "length"
    assert session.steps == [1, 2, 3, 4]  # no wasted step after the last token


def test_cancel_and_callback():
    session = ScriptedSession(list(range(1, 40)))
    seen = []
    result = decode(
        session, session.prefill([1]), GenerationConfig(max_new_tokens=30, stop_token_ids=()),
        on_token=seen.append, should_stop=lambda: len(seen) >= 3,
    )
    assert result.stop_reason == "cancelled" and result.token_ids == seen == [1, 2, 3]


def test_seeded_sampling_is_reproducible_and_top_p_limits_choices():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05], np.float32))
    a = Sampler(GenerationConfig(temperature=1.0, seed=42))
    b = Sampler(GenerationConfig(temperature=1.0, seed=42))
    assert [a(logits) for _ in range(50)] == [b(logits) for _ in range(50)]
    s = Sampler(GenerationConfig(temperature=1.0, top_p=0.6, seed=1))
    assert set(s(logits) for _ in range(200)) == {0, 1}  # 0.5 + 0.3 covers 0.6
    assert Sampler(GenerationConfig())(logits) == 0  # greedy


@pytest.mark.parametrize("bad", [dict(max_new_tokens=0), dict(temperature=-1), dict(top_p=0), dict(top_p=1.5)])
def test_invalid_generation_config(bad):
    with pytest.raises(OmniVisionError):
        GenerationConfig(**bad).validate()


def torch_backend(model):
    from omnivision_ros.runtime.torch_backend import TorchBackend

    return TorchBackend(model)


def test_greedy_is_deterministic_on_the_model(tiny_model, tokenizer, scene_image):
    pipe = Pipeline(torch_backend(tiny_model), tokenizer, GenerationConfig(max_new_tokens=12))
    first = pipe.ask(scene_image, "What is this?")
    pipe.clear_caches()
    second = pipe.ask(scene_image, "What is this?")
    assert first.token_ids == second.token_ids and first.text == second.text
    assert first.timing.new_tokens == len(first.token_ids) > 0


def test_seeded_sampling_on_the_model(tiny_model, tokenizer, scene_image):
    pipe = Pipeline(torch_backend(tiny_model), tokenizer)
    gen = GenerationConfig(max_new_tokens=10, temperature=1.0, top_p=0.9, seed=5, stop_token_ids=())
    a = pipe.ask(scene_image, "What is this?", generation=gen)
    b = pipe.ask(scene_image, "What is this?", generation=gen)
    assert a.token_ids == b.token_ids
    c = pipe.ask(scene_image, "What is this?", generation=GenerationConfig(10, 1.0, 0.9, 6, ()))
    assert c.token_ids != a.token_ids


def test_streaming_callback_builds_the_answer(tiny_model, tokenizer, scene_image):
    pipe = Pipeline(torch_backend(tiny_model), tokenizer, GenerationConfig(max_new_tokens=8))
    updates = []
    answer = pipe.ask(scene_image, "What is this?", on_text=updates.append)
    assert len(updates) == answer.timing.new_tokens
    assert updates[-1] == answer.text
