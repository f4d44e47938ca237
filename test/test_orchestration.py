"""omnivision_ros.orchestration without a ROS graph: requests about frames held in CameraFeeds
(sensor_msgs messages, as the node's subscriptions store them), answered by the tiny bundle on
ONNX Runtime through the real worker and pipeline."""
from __future__ import annotations

import logging
import math
import threading
import time

import numpy as np
import pytest

from omnivision_ros.errors import OmniVisionError
from omnivision_ros.orchestration import REFUSED, Orchestrator, Reply, Request, TextStream, answer_work
from omnivision_ros.ros.client import image_msg, stamp
from omnivision_ros.ros.frames import CameraFeed
from omnivision_ros.ros.params import CameraConfig, NodeConfig
from omnivision_ros.runtime.factory import open_model
from omnivision_ros.runtime.pipeline import Pipeline
from omnivision_ros.worker import CANCELLED, DONE, READY

TIMING_FIELDS = {"queue_ms", "encode_ms", "prefill_ms", "ttft_ms", "decode_ms", "prompt_tokens", "new_tokens",
                 "tokens_per_second", "vision_cache_hit", "prefix_cache_hit"}


def picture(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)
    img[:48] = (200, 40, 10)
    return img


def config(model: str, **changes) -> NodeConfig:
    values = dict(model=model, backend="onnxruntime", threads=1, precision=None,
                  cameras=(CameraConfig("front", "/front/image_raw", "raw"),), default_camera="front",
                  describe_prompt="Describe this image.", describe_rate_hz=0.0, max_new_tokens=6, temperature=0.0,
                  top_p=1.0, seed=None, max_frame_age_s=5.0, queue_size=2, request_timeout_s=30.0,
                  max_image_pixels=1_000_000, vision_cache_size=4, prefix_cache_size=2, question_max_chars=500,
                  task="vqa", lm_file=None, mmproj_file=None)
    values.update(changes)
    return NodeConfig(**values)


class Replies:
    """on_reply target: collects replies, with the thread each arrived on."""

    def __init__(self):
        self.items: list[Reply] = []
        self._event = threading.Event()

    def __call__(self, reply: Reply) -> None:
        self.items.append(reply)
        self._event.set()

    def wait(self, timeout_s: float = 30.0) -> Reply:
        assert self._event.wait(timeout_s), "no reply"
        self._event.clear()
        return self.items[-1]


@pytest.fixture(scope="module")
def served(tiny_bundle):
    feeds = {"front": CameraFeed("front", "/front/image_raw", "raw")}
    orchestrator = Orchestrator(config(str(tiny_bundle)), feeds, time.time_ns, logging.getLogger("test")).start()
    deadline = time.monotonic() + 60
    while orchestrator.worker.state != READY and time.monotonic() < deadline:
        time.sleep(0.02)
    assert orchestrator.worker.state == READY, orchestrator.worker.load_error
    yield orchestrator, feeds["front"]
    orchestrator.close()


def put(feed: CameraFeed, pixels: np.ndarray, encoding: str = "bgr8", age_s: float = 0.0):
    msg = image_msg(pixels, stamp(time.time() - age_s), "front_optical", encoding)
    feed.store(msg, time.time_ns())
    return msg


def ask(orchestrator, question="Is the door open?", max_age_s=0.0, on_text=None) -> Reply:
    replies = Replies()
    orchestrator.submit(Request("ask", "", question, max_age_s), replies, on_text)
    reply = replies.wait()
    assert len(replies.items) == 1
    return reply


def test_pipeline_converts_a_frame_only_on_a_vision_cache_miss(tiny_bundle):
    pipeline = Pipeline(*open_model(str(tiny_bundle), "onnxruntime", 1))
    calls = []

    def pixels():
        calls.append(1)
        return picture(1)

    first = pipeline.ask(pixels, "Is the door open?", frame_key="f1", max_new_tokens=4)
    second = pipeline.ask(pixels, "Is anyone there?", frame_key="f1", max_new_tokens=4)
    assert len(calls) == 1 and second.timing.vision_cache_hit
    assert first.text == pipeline.ask(picture(1), "Is the door open?", max_new_tokens=4).text
    with pytest.raises(OmniVisionError, match="needs a frame_key"):
        pipeline.ask(pixels, "Is the door open?")


def test_reply_carries_frame_answer_and_timing(served):
    orchestrator, feed = served
    msg = put(feed, picture(2))
    reply = ask(orchestrator)
    assert reply.success and reply.state == DONE and reply.error == ""
    assert reply.camera == "front" and reply.header == msg.header
    assert reply.answer and reply.stop_reason in ("stop", "length")
    t = reply.timing
    assert set(t) == TIMING_FIELDS and t["new_tokens"] == 6 and not t["vision_cache_hit"]
    assert t["ttft_ms"] >= t["queue_ms"] + t["encode_ms"] + t["prefill_ms"]
    assert orchestrator.stats.served >= 1 and orchestrator.stats.last_ttft_ms == t["ttft_ms"]


def test_rgb8_frame_answers_like_its_bgr8_twin_and_is_converted_once(served):
    orchestrator, feed = served
    bgr = picture(3)
    put(feed, bgr, "bgr8")
    bgr_reply = ask(orchestrator)
    msg = put(feed, bgr, "rgb8")
    rgb_reply = ask(orchestrator)
    assert rgb_reply.success and rgb_reply.answer == bgr_reply.answer
    # Break the held message: a second question about this frame must not convert it again.
    msg.data = b"\x00" * 10
    again = ask(orchestrator, "Is anyone there?")
    assert again.success and again.timing["vision_cache_hit"], again.error
    newer = put(feed, bgr, "rgb8")
    newer.data = b"\x00" * 10
    broken = ask(orchestrator)
    assert not broken.success and "camera 'front' frame: image data has 10 bytes" in broken.error


@pytest.mark.parametrize("max_age_s", [math.nan, math.inf, -math.inf])
def test_non_finite_max_age_is_refused(served, max_age_s):
    orchestrator, feed = served
    put(feed, picture(4))
    reply = ask(orchestrator, max_age_s=max_age_s)
    assert not reply.success and reply.state == REFUSED
    assert f"max_age_s is {max_age_s}" in reply.error and reply.header is None  # no frame was used


def test_refusals_reach_on_reply_at_once(served):
    orchestrator, feed = served
    put(feed, picture(5), age_s=30.0)
    cases = [(Request("ask", "back", "Is the door open?"), "unknown camera 'back'; cameras: front"),
             (Request("ask", "", "  ", -1.0), "the question is empty"),
             (Request("ask", "", "Is the door open?"), "30.0"),
             (Request("describe", "front", "Describe this image.", 1.0), "older than the bound of 1 s")]
    for request, reason in cases:
        replies = Replies()
        assert orchestrator.submit(request, replies) is None
        assert len(replies.items) == 1 and not replies.items[0].success and reason in replies.items[0].error


def test_streamed_text_only_grows():
    stream = TextStream()
    assert [stream.push(t) for t in ["", "ca", "caf\ufffd", "café", "café au", "cafe au lait", "café au lait"]] \
        == ["", "ca", "f", "é", " au", "", " lait"]
    assert stream.text == "café au lait" and stream.tokens == 7

    pushed = []
    answer_work("q", 0, lambda text, delta, tokens: pushed.append((text, delta, tokens)))
    assert pushed == []  # nothing runs until the worker calls the work


def test_streaming_reply_deltas_add_up(served):
    orchestrator, feed = served
    put(feed, picture(6))
    streamed = []
    reply = ask(orchestrator, on_text=lambda text, delta, tokens: streamed.append((text, delta, tokens)))
    assert reply.success and [s[2] for s in streamed] == list(range(1, 7))
    texts = [s[0] for s in streamed]
    assert "".join(s[1] for s in streamed) == texts[-1] and reply.answer.startswith(texts[-1])
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:]))


def test_low_priority_work_is_skipped_while_a_request_runs(served):
    orchestrator, feed = served
    put(feed, picture(7))
    started = threading.Event()
    long_replies, idle_replies = Replies(), Replies()
    job = orchestrator.submit(Request("query", "", "Describe everything.", max_new_tokens=200), long_replies,
                              lambda text, delta, tokens: started.set())
    assert started.wait(30.0)
    assert orchestrator.submit_work(Request("watch", "", "Is the door open?"), answer_work("Is the door open?", 1),
                                    idle_replies, only_if_idle=True) is None
    assert "the model is busy" in idle_replies.items[0].error
    orchestrator.cancel(job)
    cancelled = long_replies.wait()
    assert cancelled.state == CANCELLED and cancelled.stop_reason == "cancelled"
    assert 1 <= cancelled.timing["new_tokens"] < 200
