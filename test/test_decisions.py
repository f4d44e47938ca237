"""Check and Choose in the runtime, and standing watches without a ROS graph, on the tiny bundle (ONNX
Runtime): probabilities and scores are compared with ones computed here from the backend's logits of
fresh, uncached sessions; watches run through the real orchestrator and worker."""
from __future__ import annotations

import json
import logging
import math
import threading
import time

import numpy as np
import pytest

from omnivision_ros.errors import OmniVisionError
from omnivision_ros.model.preprocess import preprocess
from omnivision_ros.model.prompt import PromptBuilder
from omnivision_ros.model.tokenizer import TextTokenizer, synthetic_tokenizer_json
from omnivision_ros.model.tokens import FIRST_ADDED_ID, IM_START_ID
from omnivision_ros.orchestration import Orchestrator, Request
from omnivision_ros.ros.client import image_msg, stamp
from omnivision_ros.ros.frames import CameraFeed
from omnivision_ros.ros.params import CameraConfig, NodeConfig
from omnivision_ros.runtime.decisions import NO_WORDS, YES_WORDS, AnswerTokens, check_options
from omnivision_ros.runtime.factory import open_model
from omnivision_ros.runtime.pipeline import FrameQuestion, Pipeline
from omnivision_ros.watches import Hysteresis, Watches, WatchSpec, check_watch
from omnivision_ros.worker import READY

QUESTION = "Is the door open?"


def picture(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, (72, 96, 3), dtype=np.uint8)
    img[:36] = (37 * seed % 256, 90, 200)
    return img


@pytest.fixture(scope="module")
def opened(tiny_bundle):
    return open_model(str(tiny_bundle), "onnxruntime", 1, precision="fp32")


@pytest.fixture
def pipeline(opened):
    return Pipeline(*opened)  # fresh caches for each test


class EncodeCalls:
    """Records the batch size of every vision call of a backend (the call itself runs unchanged)."""

    def __init__(self, backend, monkeypatch):
        self.sizes = []
        original = backend.encode_images

        def encode_images(pixels):
            self.sizes.append(len(pixels))
            return original(pixels)

        monkeypatch.setattr(backend, "encode_images", encode_images)


def next_token_logits(backend, tokenizer, image, question, answer_ids=()) -> np.ndarray:
    """float64 logits after the prompt, `<|im_start|>assistant\\n` and `answer_ids`, from one new session."""
    header = [IM_START_ID, *tokenizer.encode("assistant\n")]
    ids = np.concatenate([PromptBuilder(tokenizer, backend.config).build(question).ids, header,
                          np.asarray(answer_ids, np.int64)]).astype(np.int64)
    embeds = backend.encode_images(preprocess(image, backend.config)[None])[0]
    session = backend.new_session()
    try:
        return session.prefill(ids, embeds).astype(np.float64)
    finally:
        session.close()


def probabilities(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max())
    return e / e.sum()


def single_token_ids(tokenizer, words) -> list[int]:
    return [tokenizer.encode(w)[0] for w in words if len(tokenizer.encode(w)) == 1]


# --- Check -----------------------------------------------------------------------------------------


def test_answer_tokens_are_the_single_token_spellings(tokenizer):
    tokens = AnswerTokens.resolve(tokenizer)
    assert list(tokens.yes_ids) == single_token_ids(tokenizer, YES_WORDS) and len(tokens.yes_ids) >= 2
    assert list(tokens.no_ids) == single_token_ids(tokenizer, NO_WORDS) and len(tokens.no_ids) >= 2
    assert set(tokens.skipped) == {w for w in YES_WORDS + NO_WORDS if len(tokenizer.encode(w)) != 1}
    assert [tokenizer.decode([i]).strip().lower() for i in tokens.yes_ids + tokens.no_ids] == \
        ["yes"] * len(tokens.yes_ids) + ["no"] * len(tokens.no_ids)


def test_a_vocabulary_without_yes_and_no_tokens_refuses_checks_only(opened):
    data = json.loads(synthetic_tokenizer_json())
    vocab = data["model"]["vocab"]
    first = min(vocab[w.replace(" ", "Ġ")] for w in ("Yes", "No"))
    data["model"]["merges"] = data["model"]["merges"][:len(data["model"]["merges"]) - (FIRST_ADDED_ID - first)]
    plain = TextTokenizer.from_json(json.dumps(data))  # the words' merges gone: none is one token any more
    with pytest.raises(OmniVisionError, match="holds no spelling of 'yes' as one token"):
        AnswerTokens.resolve(plain)
    pipeline = Pipeline(opened[0], plain)
    assert "holds no spelling of 'yes' as one token" in pipeline.check_error
    with pytest.raises(OmniVisionError, match="Check cannot read a yes/no probability"):
        pipeline.check(picture(1), QUESTION)
    assert pipeline.ask(picture(1), QUESTION, max_new_tokens=2).token_ids  # free text still works


def test_check_probability_is_read_from_the_logits(pipeline, opened, monkeypatch):
    backend, tokenizer = opened
    yes, no = single_token_ids(tokenizer, YES_WORDS), single_token_ids(tokenizer, NO_WORDS)
    found = []
    for seed in (1, 2):
        image = picture(seed)
        p = probabilities(next_token_logits(backend, tokenizer, image, QUESTION))
        expected = p[yes].sum() / (p[yes].sum() + p[no].sum())
        decision = pipeline.check(image, QUESTION)
        assert decision.probability == pytest.approx(expected, abs=1e-5)
        assert decision.yes_no_mass == pytest.approx(p[yes].sum() + p[no].sum(), rel=1e-3)
        assert 0 < decision.yes_no_mass <= 1 and decision.answer == (decision.probability >= 0.5)
        found.append(decision.probability)
    assert found[0] != found[1]
    # The answer follows the threshold; the frame is cached now: no vision call, a short prefill.
    calls = EncodeCalls(backend, monkeypatch)
    image = picture(2)
    at = pipeline.check(image, QUESTION, threshold=found[1])
    above = pipeline.check(image, QUESTION, threshold=min(found[1] + 1e-6, 1.0))
    assert at.answer and not above.answer and at.probability == above.probability
    assert calls.sizes == []
    t = above.timing
    assert t.vision_cache_hit and t.prefix_cache_hit and t.encode_ms == 0.0 and t.new_tokens == 0
    header_tokens = 1 + len(tokenizer.encode("assistant\n"))
    assert t.prompt_tokens == len(tokenizer.encode(QUESTION)) + 1 + header_tokens
    assert t.ttft_ms >= t.prefill_ms > 0


def test_check_frames_encodes_new_frames_in_one_batch(pipeline, opened, monkeypatch):
    backend, _ = opened
    single = Pipeline(*opened)
    a, b = picture(3), picture(4)
    expected = {(seed, q): single.check(picture(seed), q).probability
                for seed in (3, 4) for q in (QUESTION, "Is anyone there?")}

    def broken():
        raise OmniVisionError("camera 'side' frame: unsupported image encoding 'yuv422'")

    calls = EncodeCalls(backend, monkeypatch)
    items = [FrameQuestion(a, QUESTION, "a"), FrameQuestion(b, QUESTION, "b"), FrameQuestion(a, "Is anyone there?", "a"),
             FrameQuestion(broken, QUESTION, "c"), FrameQuestion(b, "   ", "b")]
    results = pipeline.check_frames(items)
    assert calls.sizes == [2]  # a and b together; c failed to convert; the empty question was refused first
    for result, (seed, question) in zip(results[:3], [(3, QUESTION), (4, QUESTION), (3, "Is anyone there?")]):
        assert result.probability == pytest.approx(expected[seed, question], abs=1e-4)
    assert not results[0].timing.vision_cache_hit and results[2].timing.vision_cache_hit is False  # same batch
    assert results[2].timing.prefix_cache_hit and results[0].timing.encode_ms == results[1].timing.encode_ms > 0
    assert isinstance(results[3], OmniVisionError) and "yuv422" in str(results[3])
    assert isinstance(results[4], OmniVisionError) and "the question is empty" in str(results[4])
    # Stopped after the first check: the others are not run.
    asked = []
    stopped = pipeline.check_frames(items[:3], should_stop=lambda: asked.append(1) or len(asked) > 1)
    assert stopped[0] is not None and stopped[1:] == [None, None]


# --- Choose ----------------------------------------------------------------------------------------


def test_choose_ranks_options_by_their_teacher_forced_log_probability(pipeline, opened):
    backend, tokenizer = opened
    image, question = picture(5), "What state is the door in?"
    options = ["open", "closed", "ajar", "half open"]
    totals = []
    for option in options:
        ids = tokenizer.encode(option)
        totals.append(sum(float(np.log(probabilities(next_token_logits(backend, tokenizer, image, question, ids[:i])))[ids[i]])
                          for i in range(len(ids))))
    choice = pipeline.choose(image, question, options)
    assert choice.log_probs == pytest.approx(totals, abs=1e-3)
    assert choice.scores == pytest.approx([t / len(tokenizer.encode(o)) for t, o in zip(totals, options)], abs=1e-3)
    assert choice.probabilities == pytest.approx(list(probabilities(np.asarray(totals))), abs=1e-4)
    assert sum(choice.probabilities) == pytest.approx(1.0)
    assert choice.index == int(np.argmax(totals)) and choice.option == options[choice.index]
    assert list(np.argsort(choice.log_probs)) == list(np.argsort(totals))
    t = choice.timing
    assert t.decode_ms > 0 and t.new_tokens == 0 and t.ttft_ms >= t.prefill_ms + t.decode_ms
    again = pipeline.choose(image, question, options[::-1])  # cached frame; order does not matter
    assert again.option == choice.option and again.timing.vision_cache_hit and again.timing.prefix_cache_hit
    assert again.log_probs == pytest.approx(choice.log_probs[::-1], abs=1e-4)


@pytest.mark.parametrize("options, reason", [
    ([], "no options given"),
    (["open", "  "], "option 1 is empty"),
    (["open", " open "], "option 1 'open' repeats option 0"),
    ([f"state {i}" for i in range(17)], "too many options: 17, the limit is 16"),
])
def test_bad_option_lists_are_refused(options, reason):
    with pytest.raises(OmniVisionError, match=reason):
        check_options(options, 16)


def test_long_options_and_the_ocr_task_are_refused(pipeline, opened):
    assert check_options([" open", "closed "], 16) == ["open", "closed"]
    with pytest.raises(OmniVisionError, match="tokens long, the limit is 8"):
        pipeline.choose(picture(6), "What state is the door in?", ["open", "wide " * 10], max_option_tokens=8)
    ocr = Pipeline(*opened, task="ocr")
    for call in (lambda: ocr.check(picture(6), QUESTION), lambda: ocr.choose(picture(6), QUESTION, ["a", "b"])):
        with pytest.raises(OmniVisionError, match="need task vqa"):
            call()


# --- watches: the rule and the definitions ---------------------------------------------------------


def test_hysteresis_flips_after_min_frames_consecutive_votes():
    rule = Hysteresis(on_threshold=0.6, off_threshold=0.4, min_frames=2)
    probabilities_seen = [0.7, 0.3, 0.7, 0.7, 0.5, 0.3, 0.5, 0.3, 0.3, 0.9, 0.6]
    flips = [rule.update(p) for p in probabilities_seen]
    # A neutral vote (between the thresholds) or one for the current state resets the run; 0.6 votes true.
    assert [i for i, f in enumerate(flips) if f] == [3, 8, 10]
    assert rule.state is True and rule.update(0.45) is False and rule.state is True and rule.streak == 0
    plain = Hysteresis(0.5, 0.5, 1)  # on == off: a plain threshold
    assert [plain.update(p) for p in (0.49, 0.5, 0.5, 0.2, 0.8)] == [False, True, False, True, True]


@pytest.mark.parametrize("change, reason", [
    ({"camera": "side"}, "unknown camera 'side'; cameras: front, back"),
    ({"off_threshold": 0.7, "on_threshold": 0.6}, "off_threshold 0.7 is above on_threshold 0.6"),
    ({"rate_hz": 0.0}, "rate_hz is 0.0"),
    ({"rate_hz": -1.0}, "rate_hz is -1.0"),
    ({"rate_hz": math.inf}, "rate_hz is inf"),
    ({"rate_hz": 50.0}, r"rate_hz is 50.0; pass evaluations per second in \(0, 20\]"),
    ({"on_threshold": math.nan}, "on_threshold is nan"),
    ({"min_frames": 0}, "min_frames is 0"),
    ({"name": "door-open"}, "letters, digits and underscores"),
    ({"question": "  "}, "the question is empty"),
])
def test_bad_watches_are_refused(change, reason):
    spec = dict(name="door_open", camera="front", question=QUESTION, rate_hz=2.0, on_threshold=0.6, off_threshold=0.4,
                min_frames=2)
    spec.update(change)
    with pytest.raises(OmniVisionError, match=reason):
        check_watch(WatchSpec(**spec), ["front", "back"], "front", 100)
    assert check_watch(WatchSpec("door", "", QUESTION), ["front", "back"], "front", 100).camera == "front"


# --- watches on the orchestrator (no ROS graph) ----------------------------------------------------


def node_config(model: str, **changes) -> NodeConfig:
    values = dict(model=model, backend="onnxruntime", threads=1, precision="fp32", task="vqa", lm_file=None,
                  mmproj_file=None, cameras=(CameraConfig("front", "/front/image_raw", "raw"),
                                             CameraConfig("back", "/back/image_raw", "raw")),
                  default_camera="front", describe_prompt="Describe this image.", describe_rate_hz=0.0,
                  max_new_tokens=6, temperature=0.0, top_p=1.0, seed=None, max_frame_age_s=-1.0, queue_size=2,
                  request_timeout_s=30.0, max_image_pixels=1_000_000, vision_cache_size=8, prefix_cache_size=8,
                  question_max_chars=500)
    values.update(changes)
    return NodeConfig(**values)


def started(config: NodeConfig) -> tuple[Orchestrator, dict]:
    feeds = {c.name: CameraFeed(c.name, c.topic, c.transport) for c in config.cameras}
    orchestrator = Orchestrator(config, feeds, time.time_ns, logging.getLogger("test")).start()
    deadline = time.monotonic() + 60
    while orchestrator.worker.state != READY and time.monotonic() < deadline:
        time.sleep(0.02)
    assert orchestrator.worker.state == READY, orchestrator.worker.load_error
    return orchestrator, feeds


class Evaluations:
    def __init__(self):
        self.items = []
        self.arrived = threading.Event()

    def __call__(self, evaluations) -> None:
        self.items.extend(evaluations)
        self.arrived.set()

    def wait(self, cycle_job) -> list:
        assert cycle_job is not None and cycle_job.wait(30.0)
        return self.items


def test_watch_cycles_batch_cameras_take_new_frames_only_and_give_way_to_requests(tiny_bundle, monkeypatch):
    orchestrator, feeds = started(node_config(str(tiny_bundle)))
    now = [100.0]
    evaluations = Evaluations()
    watches = Watches(orchestrator, evaluations, logging.getLogger("test"), clock=lambda: now[0])
    try:
        for name, camera, question in (("door", "front", QUESTION), ("person", "front", "Is anyone there?"),
                                       ("back_door", "back", QUESTION)):
            watches.add(WatchSpec(name, camera, question, rate_hz=1.0, on_threshold=0.5, off_threshold=0.5,
                                  min_frames=1))
        with pytest.raises(OmniVisionError, match="a watch named 'door' exists"):
            watches.add(WatchSpec("door", "back", QUESTION))
        calls = EncodeCalls(orchestrator.worker.model.backend, monkeypatch)
        pictures = {"front": picture(7), "back": picture(8)}
        for camera, pixels in pictures.items():
            feeds[camera].store(image_msg(pixels, stamp(time.time()), camera), time.time_ns())
        assert watches.tick() == 3
        done = evaluations.wait(watches._cycle)
        assert calls.sizes == [2]  # both cameras' frames in one vision call; two watches share the front frame
        reference = Pipeline(*open_model(str(tiny_bundle), "onnxruntime", 1, precision="fp32"))
        by_name = {e.name: e for e in done}
        for name, camera, question in (("door", "front", QUESTION), ("person", "front", "Is anyone there?"),
                                       ("back_door", "back", QUESTION)):
            e = by_name[name]
            assert e.camera == camera and e.header.frame_id == camera
            assert e.probability == pytest.approx(reference.check(pictures[camera], question).probability, abs=1e-4)
            assert e.state == (e.probability >= 0.5) and e.flipped == e.state and e.timing["new_tokens"] == 0
        assert watches.tick() == 0  # not due yet
        now[0] += 1.0
        assert watches.tick() == 0  # due, but no new frame: it waits
        feeds["front"].store(image_msg(pictures["front"], stamp(time.time()), "front"), time.time_ns())
        assert watches.tick() == 2  # the front watches, on the new frame; back_door still waits for one
        evaluations.wait(watches._cycle)
        assert len(evaluations.items) == 5 and calls.sizes == [2, 1]

        # A request runs: due watches skip their cycle instead of queueing behind it.
        started_generating = threading.Event()
        job = orchestrator.submit(Request("query", "front", "Describe everything.", -1.0, 200), lambda reply: None,
                                  lambda text, delta, tokens: started_generating.set())
        assert started_generating.wait(30.0)
        for camera in feeds:
            feeds[camera].store(image_msg(pictures[camera], stamp(time.time()), camera), time.time_ns())
        now[0] += 1.0
        assert watches.tick() == 0 and orchestrator.worker.depth == 0
        skipped = {w["name"]: w["skipped_busy"] for w in watches.snapshot()}
        assert skipped == {"door": 1, "person": 1, "back_door": 1}
        orchestrator.cancel(job)
        job.wait(30.0)
        now[0] += 1.0
        assert watches.tick() == 3  # the frames they skipped are still new to them
        evaluations.wait(watches._cycle)
        snapshot = {w["name"]: w for w in watches.snapshot()}
        assert snapshot["door"]["evaluations"] == 3 and snapshot["back_door"]["evaluations"] == 2
        watches.remove("person")
        with pytest.raises(OmniVisionError, match="no watch named 'person'; watches: door, back_door"):
            watches.remove("person")
        assert [w["name"] for w in watches.snapshot()] == ["door", "back_door"]
    finally:
        orchestrator.close()


def test_check_and_choose_requests_are_checked_on_arrival(tiny_bundle):
    orchestrator, feeds = started(node_config(str(tiny_bundle), choose_max_options=3))
    try:
        feeds["front"].store(image_msg(picture(9), stamp(time.time()), "front"), time.time_ns())
        replies = []
        for threshold in (math.nan, 1.5, -0.1):
            assert orchestrator.submit_check(Request("check", "", QUESTION), threshold, replies.append) is None
            assert f"threshold is {threshold}" in replies[-1].error and not replies[-1].success
        for options, reason in (([], "no options given"), (["a", "b", "c", "d"], "too many options: 4, the limit is 3"),
                                (["a", "a"], "repeats option 0")):
            assert orchestrator.submit_choose(Request("choose", "", QUESTION), options, replies.append) is None
            assert reason in replies[-1].error
        done = threading.Event()
        job = orchestrator.submit_check(Request("check", "back", QUESTION), 0.0, lambda r: (replies.append(r), done.set()))
        assert job is None and "no frame received yet from camera 'back'" in replies[-1].error
        done.clear()
        job = orchestrator.submit_check(Request("check", "", QUESTION), 0.0, lambda r: (replies.append(r), done.set()))
        assert done.wait(30.0) and replies[-1].success and replies[-1].timing["new_tokens"] == 0
        assert replies[-1].result.answer == (replies[-1].result.probability >= 0.5)  # 0 = check_threshold 0.5
    finally:
        orchestrator.close()
    ocr, _ = started(node_config(str(tiny_bundle), task="ocr"))
    try:
        with pytest.raises(OmniVisionError, match="need task vqa"):
            Watches(ocr, print, logging.getLogger("test")).add(WatchSpec("door", "front", QUESTION))
        replies = []
        ocr.submit_check(Request("check", "", QUESTION), 0.0, replies.append)
        ocr.submit_choose(Request("choose", "", QUESTION), ["a", "b"], replies.append)
        assert all("need task vqa" in r.error for r in replies) and len(replies) == 2
    finally:
        ocr.close()


def test_watches_wait_without_failing_when_the_model_cannot_check(tiny_bundle):
    orchestrator, feeds = started(node_config(str(tiny_bundle)))
    try:
        watches = Watches(orchestrator, Evaluations(), logging.getLogger("test"))
        watches.add(WatchSpec("door", "front", QUESTION, rate_hz=5.0))
        # As a vocabulary without single-token yes/no leaves the loaded pipeline (see the test above).
        pipeline = orchestrator.worker.model
        pipeline.answer_tokens, pipeline.check_error = None, "the model's vocabulary holds no spelling of 'yes'"
        feeds["front"].store(image_msg(picture(3), stamp(time.time()), "front"), time.time_ns())
        assert watches.tick() == 0 and watches._cycle is None  # nothing submitted, nothing counted as failed
        (door,) = watches.snapshot()
        assert (door["evaluations"], door["failures"]) == (0, 0) and door["last_error"] == pipeline.check_error
        replies = []
        assert orchestrator.submit_check(Request("check", "", QUESTION), 0.0, replies.append) is None
        assert replies[-1].error == pipeline.check_error and not replies[-1].success
    finally:
        orchestrator.close()
