"""omnivision_node: fast unit tests of its plain parts (image conversion, worker), then the real
node as subprocesses called over real DDS on loopback (domain and discovery range from conftest.py).

Node processes (started together, shared by the tests): `main` (four cameras, queue_size 1),
`rate` (describe_rate_hz > 0), `timeout` (request_timeout_s shorter than any generation; a second
camera made reliable by a qos_overrides parameter) and `missing` (a model path that does not
exist, with the shipped config/omnivision.yaml). The model is the tiny preset exported to a
bundle (ONNX Runtime; conftest's tiny_bundle).
"""
from __future__ import annotations

import array
import math
import signal
import struct
import threading
import time
from pathlib import Path
from xml.etree import ElementTree

import cv2
import numpy as np
import pytest
import yaml
from action_msgs.msg import GoalStatus
from diagnostic_msgs.msg import DiagnosticStatus
from rclpy.qos import QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from ros_helpers import Client, Diagnostics, NodeProcess, values
from sensor_msgs.msg import CompressedImage, Image

from omnivision_interfaces.action import Query

from omnivision_ros.errors import OmniVisionError
from omnivision_ros.ros.client import BackgroundNode, compressed_msg, image_msg, stamp
from omnivision_ros.ros.image_convert import color_order, to_bgr, to_pixels
from omnivision_ros.ros.params import PARAMETERS, WATCH_NAMES
from omnivision_ros.worker import CANCELLED, DONE, ERROR, FAILED, READY, TIMED_OUT, InferenceWorker

try:
    from rclpy.event_handler import PublisherEventCallbacks
except ImportError:  # Humble
    from rclpy.qos_event import PublisherEventCallbacks

ROOT = Path(__file__).resolve().parents[1]
DEADLINE_S = 30.0
MAIN_CAMERAS = {
    "front": "/omnitest/front/image_raw",
    "back": "/omnitest/back/image_raw",
    "comp": "/omnitest/comp/image_raw/compressed",
    "silent": "/omnitest/silent/image_raw",
}
MISSING_MODEL = "/nonexistent/omnivision-bundle"
RELIABLE_TOPIC = "/omnitimeout/rel/image_raw"


def scene(seed: int, color, size=(240, 320)) -> np.ndarray:
    """BGR picture: a coloured band over noise (different seeds/colours give different answers)."""
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
    img[: size[0] // 2] = color
    return img


def raw(pixels: np.ndarray, encoding: str, is_bigendian: int = 0) -> Image:
    channels = 1 if pixels.ndim == 2 else pixels.shape[2]
    msg = Image(encoding=encoding, height=pixels.shape[0], width=pixels.shape[1],
                step=pixels.shape[1] * channels * pixels.itemsize, is_bigendian=is_bigendian)
    msg.data = pixels.tobytes()
    return msg


# --- image_convert (no ROS graph) ---------------------------------------------------------------


def test_raw_encodings_convert_to_bgr():
    bgr = scene(1, (10, 20, 30), (6, 8))
    assert np.array_equal(to_bgr(raw(bgr, "bgr8")), bgr)
    assert np.array_equal(to_bgr(raw(np.ascontiguousarray(bgr[:, :, ::-1]), "rgb8")), bgr)
    bgra = np.concatenate([bgr, np.full((6, 8, 1), 7, np.uint8)], axis=2)
    assert np.array_equal(to_bgr(raw(bgra, "bgra8")), bgr)
    rgba = np.ascontiguousarray(bgra[:, :, [2, 1, 0, 3]])
    assert np.array_equal(to_bgr(raw(rgba, "rgba8")), bgr)
    gray = bgr[:, :, 0].copy()
    assert np.array_equal(to_bgr(raw(gray, "mono8")), np.repeat(gray[:, :, None], 3, axis=2))


def test_raw_rows_with_padding():
    bgr = scene(2, (1, 2, 3), (5, 7))
    padded = np.zeros((5, 7 * 3 + 11), np.uint8)
    padded[:, : 7 * 3] = bgr.reshape(5, -1)
    msg = raw(bgr, "bgr8")
    msg.step, msg.data = padded.shape[1], padded.tobytes()
    assert np.array_equal(to_bgr(msg), bgr)


@pytest.mark.parametrize("bigendian", [0, 1])
def test_mono16_scaled_to_full_range(bigendian):
    depth = np.array([[1000, 1500], [2000, 3000]], np.uint16)  # millimetres
    data = depth.astype(">u2" if bigendian else "<u2")
    out = to_bgr(raw(data, "mono16", is_bigendian=bigendian))
    assert out.shape == (2, 2, 3) and out.dtype == np.uint8
    assert out[0, 0, 0] == 0 and out[1, 1, 0] == 255 and out[0, 1, 0] == 64


@pytest.mark.parametrize("change, reason", [
    ({"data": b"\x00" * 10}, "less than step x height"),
    ({"width": 0}, "zero size"),
    ({"height": 0}, "zero size"),
    ({"encoding": "yuv422"}, "unsupported image encoding 'yuv422'"),
    ({"step": 5}, "step 5 is smaller than"),
    ({"width": 100_000, "height": 100_000}, "too large"),
])
def test_bad_raw_images(change, reason):
    msg = raw(scene(3, (0, 0, 0), (4, 4)), "bgr8")
    for key, value in change.items():
        setattr(msg, key, value)
    with pytest.raises(OmniVisionError, match=reason):
        to_bgr(msg, max_pixels=1_000_000)


def test_compressed_images():
    bgr = scene(4, (0, 0, 255), (32, 48))
    ok, png = cv2.imencode(".png", bgr)
    assert np.array_equal(to_bgr(CompressedImage(format="png", data=png.tobytes())), bgr)
    ok, jpeg = cv2.imencode(".jpg", bgr)
    assert to_bgr(CompressedImage(format="jpeg", data=jpeg.tobytes())).shape == (32, 48, 3)
    with pytest.raises(OmniVisionError, match="cannot decode"):
        to_bgr(CompressedImage(format="jpeg", data=b"definitely not a jpeg"))
    with pytest.raises(OmniVisionError, match="no data"):
        to_bgr(CompressedImage(format="jpeg", data=b""))
    # A PNG header announcing 60000 x 60000 is refused before anything is decoded.
    bomb = bytearray(png.tobytes())
    bomb[16:24] = struct.pack(">II", 60000, 60000)
    with pytest.raises(OmniVisionError, match="too large"):
        to_bgr(CompressedImage(format="png", data=bytes(bomb)), max_pixels=1_000_000)
    with pytest.raises(OmniVisionError, match="too large"):
        to_bgr(CompressedImage(format="jpeg", data=jpeg.tobytes()), max_pixels=100)


def test_pixels_keep_the_camera_channel_order_without_copies():
    bgr = scene(5, (10, 20, 30), (6, 8))
    rgb = np.ascontiguousarray(bgr[:, :, ::-1])
    for encoding, pixels, order in (("bgr8", bgr, "bgr"), ("rgb8", rgb, "rgb")):
        msg = raw(pixels, encoding)
        msg.data = array.array("B", msg.data)  # as rclpy delivers uint8[] fields
        out = to_pixels(msg)
        assert color_order(msg) == order and np.array_equal(out, pixels)
        assert np.shares_memory(out, np.frombuffer(msg.data, np.uint8)), encoding  # a view, not a copy
    rgba = np.concatenate([rgb, np.full((6, 8, 1), 7, np.uint8)], axis=2)
    assert color_order(raw(rgba, "rgba8")) == "rgb" and np.array_equal(to_pixels(raw(rgba, "rgba8")), rgb)
    assert color_order(CompressedImage(format="jpeg")) == "bgr"


# --- worker (no ROS) --------------------------------------------------------------------------


def token_loop(n: int, delay: float = 0.01):
    """A fake generation: n steps, checking should_stop() before each, like the decoder does."""
    def work(model, job):
        done = 0
        while done < n and not job.should_stop():
            time.sleep(delay)
            done += 1
        return (model, done)
    return work


def started_worker(queue_size=2, load=lambda: "model") -> InferenceWorker:
    worker = InferenceWorker(load, queue_size).start()
    deadline = time.monotonic() + 5
    while worker.state not in (READY, FAILED) and time.monotonic() < deadline:
        time.sleep(0.01)
    return worker


def test_worker_runs_jobs_in_order():
    worker = started_worker()
    try:
        jobs = [worker.submit(token_loop(3, 0)) for _ in range(2)]
        for job in jobs:
            assert worker.wait(job).state == DONE
            assert job.result == ("model", 3)
        assert jobs[0].finished <= jobs[1].started
    finally:
        worker.stop()


def test_worker_queue_full_cancel_and_timeout():
    worker = started_worker(queue_size=1)
    try:
        running = worker.submit(token_loop(1000))
        while running.started is None:
            time.sleep(0.005)
        waiting = worker.submit(token_loop(1, 0), timeout_s=0.2)
        with pytest.raises(OmniVisionError, match=r"queue full \(1 waiting\)"):
            worker.submit(token_loop(1, 0))
        assert worker.depth == 1
        # The waiting job's deadline passes while the worker is busy: it ends without running.
        assert worker.wait(waiting).state == TIMED_OUT and "waiting in the queue" in waiting.error
        assert waiting.started is None
        t0 = time.monotonic()
        worker.cancel(running)
        assert worker.wait(running).state == CANCELLED
        assert time.monotonic() - t0 < 0.5 and running.result[1] < 1000
        # A running job past its deadline stops at its next step.
        slow = worker.submit(token_loop(1000), timeout_s=0.1)
        assert worker.wait(slow).state == TIMED_OUT and "generation was stopped" in slow.error
        assert worker.wait(worker.submit(token_loop(2, 0))).state == DONE
    finally:
        worker.stop()


def test_worker_cancels_queued_job_and_survives_errors():
    worker = started_worker()
    try:
        blocker = worker.submit(token_loop(1000))
        while blocker.started is None:
            time.sleep(0.005)
        queued = worker.submit(token_loop(1, 0))
        worker.cancel(queued)
        assert queued.done and queued.state == CANCELLED and worker.depth == 0
        worker.cancel(blocker)

        def broken(model, job):
            raise ValueError("boom")

        failed = worker.wait(worker.submit(broken))
        assert failed.state == ERROR and "internal error: ValueError: boom" in failed.error
        bad_input = worker.wait(worker.submit(lambda m, j: (_ for _ in ()).throw(OmniVisionError("bad frame"))))
        assert bad_input.state == ERROR and bad_input.error == "bad frame"
        assert worker.wait(worker.submit(token_loop(1, 0))).state == DONE
    finally:
        worker.stop()


def test_worker_load_failure_is_reported_to_every_request():
    release = threading.Event()

    def load():
        release.wait(5)
        raise OmniVisionError("model 'x' is neither a preset nor an existing directory")

    worker = InferenceWorker(load, 2).start()
    queued = worker.submit(token_loop(1))  # accepted while loading
    release.set()
    assert worker.wait(queued).state == ERROR
    assert "not loaded: model 'x'" in queued.error
    assert worker.state == FAILED
    with pytest.raises(OmniVisionError, match="not loaded: model 'x'"):
        worker.submit(token_loop(1))
    worker.stop()


def test_worker_low_priority_deadlines_logs_and_shutdown():
    logged = []
    worker = InferenceWorker(lambda: "model", 1, log=logged.append).start()
    while worker.state != READY:
        time.sleep(0.005)
    assert worker.wait(worker.submit(token_loop(2, 0), only_if_idle=True), 5.0).state == DONE
    running = worker.submit(token_loop(1000))
    while running.started is None:
        time.sleep(0.005)
    with pytest.raises(OmniVisionError, match="the model is busy"):
        worker.submit(token_loop(1, 0), only_if_idle=True)
    # Nobody waits on this job: the worker's own watchdog ends it at its deadline and reports it.
    ended = threading.Event()
    queued = worker.submit(token_loop(1, 0), timeout_s=0.1, on_done=lambda job: ended.set())
    assert ended.wait(2.0) and queued.state == TIMED_OUT and queued.started is None
    worker.cancel(running)

    def broken(model, job):
        raise ValueError("boom")

    assert worker.wait(worker.submit(broken), 5.0).state == ERROR
    assert any("Traceback" in m and "ValueError: boom" in m for m in logged)  # to the node's logger
    last = worker.submit(token_loop(1000))
    while last.started is None:
        time.sleep(0.005)
    worker.stop()
    assert last.state == CANCELLED and last.error == "the node is shutting down"


# --- the shipped config ----------------------------------------------------------------------------


def test_shipped_fast_dds_profiles():
    ns = {"dds": "http://www.eprosima.com"}
    large = ElementTree.parse(ROOT / "config" / "fastdds_large_data.xml").getroot()
    (participant,) = large.findall("dds:profiles/dds:participant", ns)
    assert participant.get("is_default_profile") == "true"
    assert participant.find("dds:rtps/dds:builtinTransports", ns).text == "LARGE_DATA"
    shm = ElementTree.parse(ROOT / "config" / "fastdds_shm.xml").getroot()
    segments = [int(d.find("dds:segment_size", ns).text) for d in shm.iter(f"{{{ns['dds']}}}transport_descriptor")
                if d.find("dds:type", ns).text == "SHM"]
    assert segments and segments[0] >= 4 * 1280 * 720 * 3  # a few 720p bgr8 frames in flight
    (participant,) = shm.findall("dds:profiles/dds:participant", ns)
    assert participant.find("dds:rtps/dds:useBuiltinTransports", ns).text == "false"


def test_config_documents_every_parameter():
    text = (ROOT / "config" / "omnivision.yaml").read_text()
    params = yaml.safe_load(text)["/**/omnivision_node"]["ros__parameters"]
    assert set(params) - {"cameras"} == {name for name, _, _ in PARAMETERS}
    # Watches are described in comments: the shipped file starts none (an empty list is left out).
    assert f"#   {WATCH_NAMES[0]}: [door_open]" in text
    for name in params["camera_names"]:
        assert set(params["cameras"][name]) == {"topic", "transport"}


# --- the node over DDS -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model(tiny_bundle) -> str:
    return str(tiny_bundle)


@pytest.fixture(scope="module")
def cluster(model, tmp_path_factory):
    logs = tmp_path_factory.mktemp("node_logs")
    main = NodeProcess("/omnitest", logs, params={
        "model": model,
        "camera_names": list(MAIN_CAMERAS),
        "cameras": {name: {"topic": topic, "transport": "compressed" if name == "comp" else "raw"}
                    for name, topic in MAIN_CAMERAS.items()},
        "default_camera": "front",
        "max_new_tokens": 8,
        "max_frame_age_s": 5.0,
        "queue_size": 1,
        "max_image_pixels": 1_000_000,
        "question_max_chars": 1000,
    })
    rate = NodeProcess("/omnirate", logs, params={
        "model": model, "camera_names": ["cam"], "cameras": {"cam": {"topic": "/omnirate/cam/image_raw"}},
        "describe_rate_hz": 4.0, "max_new_tokens": 4, "max_frame_age_s": -1.0, "task": "ocr",
    })
    timeout = NodeProcess("/omnitimeout", logs, params={
        "model": model, "camera_names": ["cam", "rel"],
        "cameras": {"cam": {"topic": "/omnitimeout/cam/image_raw"}, "rel": {"topic": RELIABLE_TOPIC}},
        "request_timeout_s": 0.01,
        "qos_overrides": {RELIABLE_TOPIC: {"subscription": {"reliability": "reliable", "depth": 2}}},
    })
    missing = NodeProcess("/omnimissing", logs, params_file=ROOT / "config" / "omnivision.yaml",
                          overrides={"model": MISSING_MODEL})
    ros = BackgroundNode("omnivision_test_client")
    nodes = {"main": Client(ros, main), "rate": Client(ros, rate), "timeout": Client(ros, timeout),
             "missing": Client(ros, missing)}
    diagnostics = Diagnostics(ros)
    try:
        # The main node's queue timeout is short: let its model load before the first request.
        diagnostics.wait("/omnitest/omnivision_node: model", lambda s: s.level == DiagnosticStatus.OK,
                         60.0, main)
        yield {"ros": ros, "diagnostics": diagnostics, **nodes}
    finally:
        ros.close()
        for process in (main, rate, timeout, missing):
            process.stop()


@pytest.fixture(scope="module")
def main(cluster):
    return cluster["main"]


def frame(ros, camera: str, pixels: np.ndarray, offset_s: float = 0.0, encoding: str = "bgr8"):
    now = ros.node.get_clock().now().nanoseconds / 1e9
    if camera == "comp":
        return compressed_msg(pixels, stamp(now + offset_s), f"{camera}_optical")
    return image_msg(pixels, stamp(now + offset_s), f"{camera}_optical", encoding)


def assert_ok(response, node=None):
    assert response.success, f"{response.error}\n" + (node.node.log_tail() if node else "")


def test_diagnostics_publish(cluster, model):
    diagnostics = cluster["diagnostics"]
    status = values(diagnostics.get("/omnitest/omnivision_node: model"))
    assert status["state"] == "ready" and status["model"] == model
    assert status["backend"] == "onnxruntime"
    requests = diagnostics.wait("/omnitest/omnivision_node: requests", lambda s: True, 5.0)
    req = values(requests)
    assert req["queue_size"] == "1" and float(req["rss_mb"]) > 10
    assert {"queue_depth", "last_ttft_ms", "last_tokens_per_second", "served", "failed"} <= req.keys()
    for camera in MAIN_CAMERAS:
        status = diagnostics.wait(f"/omnitest/omnivision_node: camera {camera}", lambda s: True, 5.0)
        assert values(status)["topic"] == MAIN_CAMERAS[camera]
        assert "rate_hz" in values(status)


def test_ask_and_describe_answer_about_the_frame(cluster, main):
    ros = cluster["ros"]
    msg = frame(ros, "front", scene(10, (255, 0, 0)))
    main.put_frame("front", MAIN_CAMERAS["front"], msg)
    answer = main.ask("Is the door open?")  # empty camera = default_camera (front)
    assert_ok(answer, main)
    assert answer.camera == "front" and answer.header == msg.header
    assert answer.answer and answer.stop_reason in ("stop", "length")
    t = answer.timing
    assert t.new_tokens == 8 and t.prompt_tokens > 81 and t.tokens_per_second > 0
    assert 0 < t.encode_ms and 0 < t.prefill_ms and t.queue_ms >= 0
    assert t.ttft_ms >= t.encode_ms + t.prefill_ms and t.decode_ms > 0
    described = main.describe("front", max_new_tokens=5)
    assert_ok(described, main)
    assert described.header == msg.header and described.camera == "front"
    assert described.answer and described.timing.new_tokens == 5


def test_two_cameras_each_answered_about_its_own_frame(cluster, main, model):
    ros = cluster["ros"]
    pictures = {"front": scene(11, (0, 255, 0)), "back": scene(12, (0, 0, 255))}
    sent = {}
    for camera, pixels in pictures.items():
        sent[camera] = frame(ros, camera, pixels, offset_s=0.5 if camera == "back" else 0.0)
        main.put_frame(camera, MAIN_CAMERAS[camera], sent[camera])
    answers = {camera: main.ask("What is in front of the robot?", camera=camera) for camera in pictures}

    # The same tiny model run here on each picture gives the answer the node gave for that camera.
    from omnivision_ros.runtime.factory import open_model
    from omnivision_ros.runtime.pipeline import Pipeline

    pipeline = Pipeline(*open_model(model))
    for camera, answer in answers.items():
        assert_ok(answer, main)
        assert answer.camera == camera and answer.header == sent[camera].header
        assert answer.header.frame_id == f"{camera}_optical"
        expected = pipeline.ask(pictures[camera], "What is in front of the robot?", max_new_tokens=8)
        assert answer.answer == expected.text, camera
    assert answers["front"].answer != answers["back"].answer


def test_second_question_on_a_frame_hits_the_caches(cluster, main):
    ros = cluster["ros"]
    msg = frame(ros, "front", scene(13, (128, 0, 128)))
    main.put_frame("front", MAIN_CAMERAS["front"], msg)
    first = main.ask("Is the door open?", camera="front")
    second = main.ask("Is anyone there?", camera="front")
    for response in (first, second):
        assert_ok(response, main)
        assert response.header == msg.header
    assert not first.timing.vision_cache_hit and not first.timing.prefix_cache_hit
    assert second.timing.vision_cache_hit and second.timing.prefix_cache_hit
    assert second.timing.encode_ms < first.timing.encode_ms
    assert second.timing.prompt_tokens < first.timing.prompt_tokens
    assert second.timing.ttft_ms < first.timing.ttft_ms


def test_compressed_camera(cluster, main):
    msg = frame(cluster["ros"], "comp", scene(14, (0, 128, 255)))
    main.put_frame("comp", MAIN_CAMERAS["comp"], msg)
    answer = main.ask("Is the door open?", camera="comp")
    assert_ok(answer, main)
    assert answer.header == msg.header and answer.camera == "comp"


def send_goal(main, question: str, max_new_tokens: int, feedback: list):
    ros = main.ros
    assert main.query_client.wait_for_server(timeout_sec=DEADLINE_S)
    goal = Query.Goal(camera="front", question=question, max_age_s=-1.0, max_new_tokens=max_new_tokens)
    handle = ros.wait_future(main.query_client.send_goal_async(goal, feedback_callback=lambda m: feedback.append(m.feedback)),
                             DEADLINE_S, "send goal")
    assert handle.accepted
    return handle


def test_action_streams_feedback(cluster, main):
    main.put_frame("front", MAIN_CAMERAS["front"], frame(cluster["ros"], "front", scene(15, (9, 9, 9))))
    feedback = []
    handle = send_goal(main, "Is the door open?", 8, feedback)
    result = main.ros.wait_future(handle.get_result_async(), DEADLINE_S, "query result")
    assert result.status == GoalStatus.STATUS_SUCCEEDED, result.result.error
    assert result.result.success and result.result.timing.new_tokens == 8
    # One feedback per token, in order. rclpy's action client drops feedback that arrives after
    # the result, so on a loaded machine the last ones may be missing here.
    assert feedback and [f.tokens for f in feedback] == list(range(1, len(feedback) + 1))
    assert all(result.result.answer.startswith(f.text) for f in feedback)
    # The text only grows, by each feedback's delta: a streaming client can append the deltas.
    assert all(b.text == a.text + b.delta for a, b in zip([Query.Feedback()] + feedback, feedback))


def test_action_cancel_stops_generation(cluster, main):
    main.put_frame("front", MAIN_CAMERAS["front"], frame(cluster["ros"], "front", scene(16, (0, 64, 0))))
    feedback = []
    handle = send_goal(main, "Is the door open?", 320, feedback)
    main.ros.wait_for(lambda: len(feedback) >= 3, 10.0, "feedback before cancel")
    t0 = time.monotonic()
    main.ros.wait_future(handle.cancel_goal_async(), DEADLINE_S, "cancel")
    result = main.ros.wait_future(handle.get_result_async(), DEADLINE_S, "query result")
    assert time.monotonic() - t0 < 1.0
    assert result.status == GoalStatus.STATUS_CANCELED
    assert not result.result.success and result.result.stop_reason == "cancelled"
    assert 3 <= result.result.timing.new_tokens < 320
    assert_ok(main.ask("Is the door open?", max_age_s=-1.0), main)  # the next request is unaffected


def test_queue_full_is_refused(cluster, main):
    main.put_frame("front", MAIN_CAMERAS["front"], frame(cluster["ros"], "front", scene(17, (64, 0, 0))))
    feedback = []
    handle = send_goal(main, "Is the door open?", 320, feedback)  # occupies the worker
    main.ros.wait_for(lambda: feedback, 10.0, "generation started")
    # Two more while it runs: one waits (queue_size 1), the other is refused. Which one is
    # refused depends on which callback thread submits first.
    pending = [main.ask_async("Is the door open?", camera="front") for _ in range(2)]
    first_done = main.ros.wait_for(lambda: [f for f in pending if f.done()], 10.0, "a refusal")
    refused = first_done[0].result()
    assert not refused.success and "queue full (1 waiting)" in refused.error, refused.error
    main.ros.wait_future(handle.cancel_goal_async(), DEADLINE_S, "cancel")
    assert main.ros.wait_future(handle.get_result_async(), DEADLINE_S, "result").status == GoalStatus.STATUS_CANCELED
    waited = next(f for f in pending if f is not first_done[0])
    assert_ok(main.ros.wait_future(waited, DEADLINE_S, "queued ask"), main)


class Streaming:
    """Publishes a frame on each of `cameras` at `rate_hz` from a thread, like running cameras (320x240:
    this client runs with the default transports, which lose most larger frames; see test_intake.py)."""

    def __init__(self, client: Client, cameras: dict[str, str], rate_hz: float = 15.0):
        self.client, self.rate_hz = client, rate_hz
        ros = client.ros
        self.messages = {topic: frame(ros, name, scene(50 + i, (40 * i, 90, 200)))
                         for i, (name, topic) in enumerate(cameras.items())}
        self.publishers = {topic: client.publisher(topic) for topic in cameras.values()}
        self.sent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(1.0 / self.rate_hz):
            for topic, msg in self.messages.items():
                msg.header.stamp = self.client.ros.now()
                self.publishers[topic].publish(msg)
            self.sent += 1

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5.0)


def test_requests_are_served_while_two_cameras_stream(cluster, main):
    with Streaming(main, {"front": MAIN_CAMERAS["front"], "back": MAIN_CAMERAS["back"]}) as cameras:
        main.ros.wait_for(lambda: cameras.sent > 5, 10.0, "frames streaming")
        for camera in ("front", "back", "front"):
            answer = main.ask("Is the door open?", camera=camera, max_new_tokens=4)
            assert_ok(answer, main)
            assert answer.header.frame_id == f"{camera}_optical" and answer.timing.new_tokens == 4
        # Streamed generation, then cancel: it stops at the next token.
        feedback = []
        handle = send_goal(main, "Is the door open?", 320, feedback)
        main.ros.wait_for(lambda: len(feedback) >= 3, 10.0, "feedback while cameras stream")
        t0 = time.monotonic()
        main.ros.wait_future(handle.cancel_goal_async(), DEADLINE_S, "cancel")
        result = main.ros.wait_future(handle.get_result_async(), DEADLINE_S, "query result")
        assert time.monotonic() - t0 < 1.0 and result.status == GoalStatus.STATUS_CANCELED
        assert 3 <= result.result.timing.new_tokens < 320
        # Beyond the queue (one running, queue_size 1 waiting): refused at once.
        handle = send_goal(main, "Is the door open?", 320, feedback := [])
        main.ros.wait_for(lambda: feedback, 10.0, "generation started")
        pending = [main.ask_async("Is the door open?", camera="back") for _ in range(2)]
        first_done = main.ros.wait_for(lambda: [f for f in pending if f.done()], 10.0, "a refusal")
        assert "queue full (1 waiting)" in first_done[0].result().error
        main.ros.wait_future(handle.cancel_goal_async(), DEADLINE_S, "cancel")
        waited = next(f for f in pending if f is not first_done[0])
        assert_ok(main.ros.wait_future(waited, DEADLINE_S, "queued ask"), main)
        status = values(cluster["diagnostics"].wait("/omnitest/omnivision_node: camera back",
                                                    lambda s: float(values(s)["rate_hz"]) > 5, 10.0, main.node))
        assert int(status["frames_received"]) > 5  # the rate above is measured over these frames


def test_qos_override_makes_a_camera_subscription_reliable(cluster):
    ros = cluster["ros"]

    def subscription(topic):
        return next((info for info in ros.node.get_subscriptions_info_by_topic(topic)
                     if info.node_namespace == "/omnitimeout"), None)

    default = ros.wait_for(lambda: subscription("/omnitimeout/cam/image_raw"), DEADLINE_S, "the default camera")
    overridden = ros.wait_for(lambda: subscription(RELIABLE_TOPIC), DEADLINE_S, "the overridden camera")
    assert default.qos_profile.reliability == ReliabilityPolicy.BEST_EFFORT
    assert overridden.qos_profile.reliability == ReliabilityPolicy.RELIABLE
    # What that means to a camera: a reliable publisher matches, a best-effort one is incompatible.
    incompatible = []
    reliable = ros.node.create_publisher(Image, RELIABLE_TOPIC, QoSProfile(depth=2, reliability=ReliabilityPolicy.RELIABLE))
    best_effort = ros.node.create_publisher(Image, RELIABLE_TOPIC, qos_profile_sensor_data,
                                            event_callbacks=PublisherEventCallbacks(incompatible_qos=incompatible.append))
    try:
        ros.wait_for(lambda: reliable.get_subscription_count() == 1, DEADLINE_S, "the reliable publisher matching")
        ros.wait_for(lambda: incompatible, DEADLINE_S, "the best-effort publisher's incompatible-QoS event")
        assert best_effort.get_subscription_count() == 0
    finally:
        ros.node.destroy_publisher(reliable)
        ros.node.destroy_publisher(best_effort)


def test_request_timeout(cluster):
    # request_timeout_s is 0.01 s on this node: shorter than encoding a frame on any CPU, so
    # every request times out, at its first token or already in the queue.
    node = cluster["timeout"]
    node.put_frame("cam", "/omnitimeout/cam/image_raw", frame(cluster["ros"], "cam", scene(18, (0, 0, 64))))
    for _ in range(2):  # the second one hits the caches, still too slow
        response = node.ask("Is the door open?", max_age_s=-1.0, max_new_tokens=200)
        assert not response.success and "timed out after 0.01 s (request_timeout_s)" in response.error, response.error
        assert response.header.frame_id == "cam_optical" and response.timing.new_tokens < 200
    assert node.node.alive()


BAD_IMAGES = [
    ({"data": b"\x00" * 10}, "less than step x height"),
    ({"width": 0, "step": 0, "data": b""}, "zero size"),
    ({"encoding": "yuv422"}, "unsupported image encoding 'yuv422'"),
    ({"width": 100_000, "height": 100_000, "step": 300_000, "data": b""}, "too large"),
]


def test_bad_requests_are_refused_with_reasons(cluster, main):
    ros = cluster["ros"]
    good = frame(ros, "front", scene(19, (200, 200, 0)))
    main.put_frame("front", MAIN_CAMERAS["front"], good)
    cases = [
        (main.ask("Is the door open?", camera="nope"), "unknown camera 'nope'; cameras: front, back, comp, silent"),
        (main.ask("Is the door open?", camera="silent"), "no frame received yet from camera 'silent'"),
        (main.describe("silent"), "no frame received yet from camera 'silent'"),
        (main.ask("   "), "the question is empty"),
        (main.ask("x" * 1001), "the question is too long: 1001 characters"),
        # Within question_max_chars (1000) but beyond the tiny model's context of 512 tokens.
        (main.ask("The quick brown fox jumps over the lazy dog. " * 20), "the question is too long"),
        (main.ask("Is the door open?", max_new_tokens=100_000), "exceed the context"),
        (main.ask("Is the door open?", max_age_s=math.nan), "max_age_s is nan; pass seconds"),
        (main.ask("Is the door open?", max_age_s=math.inf), "max_age_s is inf; pass seconds"),
        (main.describe(max_age_s=-math.inf), "max_age_s is -inf; pass seconds"),
    ]
    for response, reason in cases:
        assert not response.success and reason in response.error, (reason, response.error)
        assert response.answer == ""

    old = frame(ros, "front", scene(20, (1, 1, 1)), offset_s=-60.0)
    main.put_frame("front", MAIN_CAMERAS["front"], old)
    for response in (main.ask("Is the door open?", max_age_s=5.0), main.ask("Is the door open?")):
        assert not response.success and "s old, older than the bound of 5 s" in response.error, response.error
    assert_ok(main.ask("Is the door open?", max_age_s=-1.0), main)  # negative bound: any age

    for change, reason in BAD_IMAGES:
        bad = frame(ros, "front", scene(21, (5, 5, 5), (4, 4)))
        for key, value in change.items():
            setattr(bad, key, value)
        main.put_frame("front", MAIN_CAMERAS["front"], bad)
        response = main.ask("Is the door open?")
        assert not response.success and reason in response.error, (reason, response.error)
        assert response.header == bad.header

    broken = CompressedImage(format="jpeg", data=b"this is not a jpeg")
    broken.header = frame(ros, "comp", scene(22, (0, 0, 0))).header
    main.put_frame("comp", MAIN_CAMERAS["comp"], broken)
    response = main.ask("Is the door open?", camera="comp")
    assert not response.success and "cannot decode the compressed image" in response.error, response.error

    # Still serving.
    assert main.node.alive()
    fine = frame(ros, "front", scene(23, (0, 255, 255)))
    main.put_frame("front", MAIN_CAMERAS["front"], fine)
    assert_ok(main.ask("Is the door open?"), main)


def test_scene_descriptions_at_rate(cluster, model):
    rate = cluster["rate"]
    ros = cluster["ros"]
    pixels = scene(30, (90, 30, 200))
    msg = frame(ros, "cam", pixels)
    rate.put_frame("cam", "/omnirate/cam/image_raw", msg, timeout_s=DEADLINE_S)
    described = ros.wait_for(lambda: [d for d in rate.descriptions if d.header == msg.header], DEADLINE_S,
                             "a scene description of the frame")
    first = described[0]
    assert first.camera == "cam" and first.text and first.timing.new_tokens == 4
    # This node runs task ocr: its descriptions are the OCR prompt's answers, not describe_prompt's.
    from omnivision_ros.runtime.factory import open_model
    from omnivision_ros.runtime.pipeline import Pipeline

    backend, tokenizer = open_model(model)
    ocr = Pipeline(backend, tokenizer, task="ocr").ask(pixels, "", max_new_tokens=4)
    vqa = Pipeline(backend, tokenizer).ask(pixels, "Describe this image.", max_new_tokens=4)
    assert first.text == ocr.text != vqa.text
    assert first.timing.prompt_tokens == ocr.timing.prompt_tokens
    time.sleep(1.0)  # four more ticks: the frame is not described again
    assert len([d for d in rate.descriptions if d.header == msg.header]) == 1
    newer = frame(ros, "cam", scene(31, (30, 200, 90)))
    rate.put_frame("cam", "/omnirate/cam/image_raw", newer)
    ros.wait_for(lambda: any(d.header == newer.header for d in rate.descriptions), DEADLINE_S,
                 "a description of the newer frame")


def test_missing_bundle_keeps_node_up_and_reports_it(cluster):
    missing = cluster["missing"]
    status = cluster["diagnostics"].wait("/omnimissing/omnivision_node: model", lambda s: s.level != DiagnosticStatus.WARN,
                                         DEADLINE_S, missing.node)
    assert status.level == DiagnosticStatus.ERROR and MISSING_MODEL in status.message
    assert values(status)["state"] == "failed"
    for response in (missing.ask("Is the door open?"), missing.describe()):
        assert not response.success and "the model is not loaded" in response.error and MISSING_MODEL in response.error

    assert missing.query_client.wait_for_server(timeout_sec=DEADLINE_S)
    handle = missing.ros.wait_future(missing.query_client.send_goal_async(Query.Goal(question="Is the door open?")),
                                     DEADLINE_S, "send goal")
    result = missing.ros.wait_future(handle.get_result_async(), DEADLINE_S, "result")
    assert result.status == GoalStatus.STATUS_ABORTED and MISSING_MODEL in result.result.error
    assert missing.node.alive()


def test_nodes_shut_down_cleanly_on_sigint(cluster, main):
    # A goal still generating when Ctrl-C comes gets its answer before the node exits.
    main.put_frame("front", MAIN_CAMERAS["front"], frame(cluster["ros"], "front", scene(60, (7, 7, 7))))
    feedback = []
    handle = send_goal(main, "Is the door open?", 320, feedback)
    result = handle.get_result_async()
    main.ros.wait_for(lambda: feedback, 10.0, "generation started")
    main.node.proc.send_signal(signal.SIGINT)
    result = main.ros.wait_future(result, DEADLINE_S, "the result of the goal in flight")
    assert result.status == GoalStatus.STATUS_ABORTED and result.result.error == "the node is shutting down"
    assert 1 <= result.result.timing.new_tokens < 320
    for name in ("main", "rate", "timeout", "missing"):
        process = cluster[name].node
        assert process.stop() == 0, process.log_tail()
