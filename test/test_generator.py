import numpy as np
import pytest

from omnivision_ros.errors import OmniVisionError
from omnivision_ros.model.config import get_preset
from omnivision_ros.model.tokens import STOP_TOKEN_IDS
from omnivision_ros.runtime.backend import DecoderSession
from omnivision_ros.runtime.generator import GenerationConfig, Sampler, decode, sample_exact
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


# --- the fast sampler draws from the distribution of the exact method ---------------------------

SAMPLING_CASES = [  # (vocabulary, logit scale, temperature, top_p): peaked to flat, small and large top-p sets
    (50, 1.0, 1.0, 1.0), (50, 1.0, 0.7, 0.9), (50, 0.1, 1.3, 0.5), (50, 1.0, 1.0, 0.3),
    (600, 2.0, 0.7, 0.9), (3000, 0.3, 0.7, 0.9), (3000, 0.3, 1.0, 1.0), (3000, 0.3, 1.0, 0.2),
]


def exact_probabilities(logits, temperature, top_p):
    """sample_exact's distribution, written out: float64 softmax, stable sort, top-p prefix."""
    scaled = logits.astype(np.float64) / temperature
    probs = np.exp(scaled - scaled.max())
    probs /= probs.sum()
    if top_p < 1:
        order = np.argsort(-probs, kind="stable")
        keep = order[: int(np.searchsorted(np.cumsum(probs[order]), top_p)) + 1]
        kept = np.zeros_like(probs)
        kept[keep] = probs[keep]
        probs = kept / kept.sum()
    return probs


@pytest.fixture(params=SAMPLING_CASES, ids=lambda case: "V{}-s{}-T{}-p{}".format(*case))
def sampling_case(request):
    vocab, scale, temperature, top_p = request.param
    logits = (np.random.default_rng(vocab).standard_normal(vocab) * scale).astype(np.float32)
    return logits, GenerationConfig(temperature=temperature, top_p=top_p, seed=3)


@pytest.mark.parametrize("vocab, scale, temperature, top_p", [case for case in SAMPLING_CASES if case[3] < 1])
def test_top_p_set_is_the_exact_one(vocab, scale, temperature, top_p):
    logits = (np.random.default_rng(vocab).standard_normal(vocab) * scale).astype(np.float32)
    sampler = Sampler(GenerationConfig(temperature=temperature, top_p=top_p))
    ids, cumulative = sampler.nucleus(sampler.probabilities(logits))
    expected = exact_probabilities(logits, temperature, top_p)
    order = np.argsort(-expected, kind="stable")[: np.count_nonzero(expected)]
    assert ids.tolist() == order.tolist()  # the same tokens, in the same order
    assert np.all(np.diff(cumulative) > 0)


def binned_chi2(draws, probs, bins=20):
    """Pearson's chi-square of the draws over up to `bins` groups of tokens of similar probability (so every
    group expects many draws), and its degrees of freedom."""
    inside = np.flatnonzero(probs)
    groups = np.zeros(len(probs), int)
    if len(inside) > bins:
        edges = np.quantile(probs[inside], np.linspace(0, 1, bins + 1)[1:-1])
        groups[inside] = np.digitize(probs[inside], edges)
    else:
        groups[inside] = np.arange(len(inside))
    n = groups[inside].max() + 1
    want = np.bincount(groups[inside], weights=probs[inside], minlength=n) * len(draws)
    got = np.bincount(groups[draws], minlength=n)
    return float(((got - want) ** 2 / want).sum()), n - 1


def test_frequencies_match_the_exact_distribution(sampling_case):
    logits, config = sampling_case
    sampler = Sampler(config)
    draws = np.array([sampler(logits) for _ in range(5000)])
    expected = exact_probabilities(logits, config.temperature, config.top_p)
    assert expected[draws].min() > 0  # never a token outside the set
    chi2, dof = binned_chi2(draws, expected)
    assert chi2 <= dof + 5 * np.sqrt(2 * dof), (chi2, dof)  # mean dof, sd sqrt(2 dof): 5 sd is a ~1e-6 false alarm


def test_same_seed_picks_the_exact_methods_tokens_where_the_order_is_the_same():
    """Temperature alone, and top-p sets the sampler sorts, walk the candidates as sample_exact does with one
    uniform number each: a shared seed gives the same tokens (but for float rounding at a boundary)."""
    logits = (np.random.default_rng(1).standard_normal(20000) * 4).astype(np.float32)
    for temperature, top_p in ((1.0, 1.0), (0.7, 0.9)):
        config = GenerationConfig(temperature=temperature, top_p=top_p, seed=11)
        sampler, rng = Sampler(config), np.random.default_rng(11)
        if top_p < 1:
            p = sampler.probabilities(logits)
            assert np.dot(p, p >= Sampler.HEAD) >= top_p * p.sum()  # the top-p set lies in the sorted head
        fast = [sampler(logits) for _ in range(200)]
        exact = [sample_exact(logits, temperature, top_p, rng) for _ in range(200)]
        assert np.mean(np.equal(fast, exact)) >= 0.99


def test_large_top_p_sets_are_drawn_without_sorting_them(monkeypatch):
    """A flat distribution (what random weights give) makes a set of ~100k tokens. It is drawn by rejection,
    with no sort: only set members come out, as often as they should (over ten probability bins)."""
    logits = (np.random.default_rng(2).standard_normal(VOCAB) * 0.6).astype(np.float32)
    config = GenerationConfig(temperature=0.7, top_p=0.9, seed=5)
    expected = exact_probabilities(logits, config.temperature, config.top_p)
    assert np.count_nonzero(expected) > 50000
    sampler = Sampler(config)
    monkeypatch.setattr(Sampler, "_bracket", None)  # the sorting fallback is not needed here
    monkeypatch.setattr(Sampler, "_prefix", None)
    draws = np.array([sampler(logits) for _ in range(2000)])
    assert expected[draws].min() > 0
    chi2, dof = binned_chi2(draws, expected, bins=10)
    assert chi2 <= dof + 5 * np.sqrt(2 * dof), (chi2, dof)


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


def test_sampling_benchmark_runs_and_compares_both_methods(capsys):
    from omnivision_ros.cli import bench_sampling

    assert bench_sampling.main(["--repeats", "2", "--exact-repeats", "1", "--vocab", "3000"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") >= 3 + 9 and "speed-up" in out and "slowest fast draw" in out
    assert bench_sampling.main(["--logits", "/no/such/file.npz"]) == 2
