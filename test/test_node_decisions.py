"""Check, Choose and standing watches on the real node (a subprocess) over real DDS: the tiny bundle on
ONNX Runtime; probabilities and scores compared with ones computed here from the same bundle's logits."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from diagnostic_msgs.msg import DiagnosticStatus
from ros_helpers import DecisionsClient, Diagnostics, NodeProcess, values
from test_decisions import next_token_logits, probabilities, single_token_ids

from omnivision_ros.ros.client import BackgroundNode, image_msg
from omnivision_ros.runtime.decisions import NO_WORDS, YES_WORDS

NS = "/omnidecide"
CAMERAS = {"left": f"{NS}/left/image_raw", "right": f"{NS}/right/image_raw"}
QUESTION = "Is the door open?"
DEADLINE_S = 30.0


def picture(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)
    img[:60] = (53 * seed % 256, 255 - 29 * seed % 256, 120)
    return img


@pytest.fixture(scope="module")
def opened(tiny_bundle):
    from omnivision_ros.runtime.factory import open_model

    return open_model(str(tiny_bundle), "onnxruntime", 1, precision="fp32")


@pytest.fixture(scope="module")
def node(tiny_bundle, tmp_path_factory):
    process = NodeProcess(NS, tmp_path_factory.mktemp("decide_logs"), params={
        "model": str(tiny_bundle), "precision": "fp32",
        "camera_names": list(CAMERAS), "cameras": {name: {"topic": topic} for name, topic in CAMERAS.items()},
        "max_frame_age_s": -1.0, "max_new_tokens": 4, "choose_max_options": 4, "choose_max_option_tokens": 8,
        "watch_names": ["yaml_door"],
        "watches": {"yaml_door": {"camera": "right", "question": QUESTION, "rate_hz": 2.0, "on_threshold": 0.7,
                                  "off_threshold": 0.3, "min_frames": 1}},
    })
    ros = BackgroundNode("omnivision_decisions_client")
    client = DecisionsClient(ros, process)
    client.diagnostics = Diagnostics(ros)
    try:
        client.diagnostics.wait(f"{NS}/omnivision_node: model", lambda s: s.level == DiagnosticStatus.OK, 60.0, process)
        yield client
    finally:
        ros.close()
        assert process.stop() == 0, process.log_tail()


def put(node: DecisionsClient, camera: str, pixels: np.ndarray):
    """Publish a new frame (a new stamp) until the node holds it; returns the message."""
    msg = image_msg(pixels, node.ros.now(), f"{camera}_optical")
    node.put_frame(camera, CAMERAS[camera], msg)
    return msg


def assert_ok(response, node):
    assert response.success, f"{response.error}\n" + node.node.log_tail()


def test_yaml_watch_is_in_diagnostics(node):
    status = node.diagnostics.wait(f"{NS}/omnivision_node: watch yaml_door", lambda s: True, DEADLINE_S, node.node)
    v = values(status)
    assert (v["camera"], v["question"], v["rate_hz"], v["on_threshold"], v["min_frames"]) == \
        ("right", QUESTION, "2", "0.7", "1")
    assert {"state", "last_probability", "evaluations", "skipped_busy", "events", "failures"} <= v.keys()


def test_check_reads_the_probability_from_the_logits(node, opened):
    backend, tokenizer = opened
    yes, no = single_token_ids(tokenizer, YES_WORDS), single_token_ids(tokenizer, NO_WORDS)
    image = picture(1)
    msg = put(node, "left", image)
    first = node.check(QUESTION, camera="left")
    assert_ok(first, node)
    p = probabilities(next_token_logits(backend, tokenizer, image, QUESTION))
    assert first.probability == pytest.approx(p[yes].sum() / (p[yes].sum() + p[no].sum()), abs=1e-5)
    assert first.yes_no_mass == pytest.approx(p[yes].sum() + p[no].sum(), rel=1e-3) and 0 < first.yes_no_mass <= 1
    assert first.header == msg.header and first.camera == "left" and first.answer == (first.probability >= 0.5)
    assert not first.timing.vision_cache_hit and first.timing.encode_ms > 0 and first.timing.new_tokens == 0
    # The frame is cached now: no vision encoder, one short prefill; the answer follows the request's threshold.
    at = node.check(QUESTION, camera="left", threshold=first.probability)
    above = node.check(QUESTION, camera="left", threshold=min(first.probability + 1e-6, 1.0))
    assert at.answer and not above.answer and at.probability == first.probability == above.probability
    t = above.timing
    assert t.vision_cache_hit and t.prefix_cache_hit and t.encode_ms == 0.0
    assert t.prompt_tokens < first.timing.prompt_tokens - 81 and 0 < t.prefill_ms <= t.ttft_ms


def test_choose_ranks_by_teacher_forced_log_probability(node, opened):
    backend, tokenizer = opened
    image, question, options = picture(2), "What state is the door in?", ["open", "closed", "ajar"]
    msg = put(node, "left", image)
    response = node.choose(question, options, camera="left")
    assert_ok(response, node)
    totals = []
    for option in options:
        ids = tokenizer.encode(option)
        totals.append(sum(float(np.log(probabilities(next_token_logits(backend, tokenizer, image, question,
                                                                       ids[:i])))[ids[i]]) for i in range(len(ids))))
    assert list(response.scores) == pytest.approx([t / len(tokenizer.encode(o)) for t, o in zip(totals, options)],
                                                  abs=1e-3)
    assert list(response.probabilities) == pytest.approx(list(probabilities(np.asarray(totals))), abs=1e-4)
    assert response.index == int(np.argmax(totals)) and response.option == options[response.index]
    assert response.header == msg.header and response.timing.decode_ms > 0


def test_bad_checks_and_choices_are_refused_with_reasons(node):
    put(node, "left", picture(3))
    cases = [
        (node.check(QUESTION, threshold=1.5), "threshold is 1.5"),
        (node.check(QUESTION, camera="rear"), "unknown camera 'rear'; cameras: left, right"),
        (node.check("  "), "the question is empty"),
        (node.choose(QUESTION, []), "no options given"),
        (node.choose(QUESTION, ["open", " "]), "option 1 is empty"),
        (node.choose(QUESTION, ["open", "open"]), "option 1 'open' repeats option 0"),
        (node.choose(QUESTION, ["a", "b", "c", "d", "e"]), "too many options: 5, the limit is 4"),
        (node.choose(QUESTION, ["open", "wide " * 10]), "tokens long, the limit is 8"),
    ]
    for response, reason in cases:
        assert not response.success and reason in response.error, (reason, response.error)
    refused = node.choose(QUESTION, [])
    assert refused.index == -1 and list(refused.scores) == [] and refused.option == ""
    assert_ok(node.check(QUESTION), node)  # still serving


def wait_state(node, name: str, header, timeout_s: float = 10.0):
    return node.ros.wait_for(lambda: next((m for m in node.watch_messages("states", name) if m.header == header), None),
                             timeout_s, f"the state of watch '{name}' on frame {header.stamp}")


def test_a_watch_flips_exactly_when_the_hysteresis_rule_says(node):
    # Two pictures the model tells apart: measured here, thresholds set between them.
    measured = {}
    for seed in (10, 11, 12, 13):
        put(node, "left", picture(seed))
        measured[seed] = node.check(QUESTION, camera="left").probability
    low, high = min(measured, key=measured.get), max(measured, key=measured.get)
    p_low, p_high = measured[low], measured[high]
    assert p_low < p_high
    gap = p_high - p_low
    on, off = p_low + 0.75 * gap, p_low + 0.25 * gap
    added = node.call("add_watch", name="door", camera="left", question=QUESTION, rate_hz=10.0, on_threshold=on,
                      off_threshold=off, min_frames=2)
    assert_ok(added, node)
    sequence = "LHLHHHLHLLL"  # min_frames 2: flips to true at the 2nd H in a row (index 4), to false at index 9
    expected_states = [False, False, False, False, True, True, True, True, True, False, False]
    headers, states = [], []
    for kind in sequence:
        msg = put(node, "left", picture(low if kind == "L" else high))
        state = wait_state(node, "door", msg.header)
        assert state.probability == pytest.approx(p_low if kind == "L" else p_high, abs=1e-4)
        assert state.camera == "left" and state.timing.new_tokens == 0
        headers.append(msg.header)
        states.append(state.state)
    assert states == expected_states
    time.sleep(0.3)
    events = node.watch_messages("events", "door")
    assert [e.header for e in events] == [headers[4], headers[9]]
    assert [(e.previous_state, e.state) for e in events] == [(False, True), (True, False)]
    assert events[0].probability == pytest.approx(p_high, abs=1e-4)
    # A stable picture: evaluated on every new frame, never an event.
    for _ in range(4):
        msg = put(node, "left", picture(low))
        assert wait_state(node, "door", msg.header).state is False
    time.sleep(0.3)
    assert len(node.watch_messages("events", "door")) == 2
    status = values(node.diagnostics.wait(f"{NS}/omnivision_node: watch door",
                                          lambda s: int(values(s)["evaluations"]) >= 15, DEADLINE_S, node.node))
    assert status["state"] == "False" and status["events"] == "2" and status["camera"] == "left"
    # Removed: no more evaluations; a second removal is refused.
    assert_ok(node.call("remove_watch", name="door"), node)
    msg = put(node, "left", picture(high))
    time.sleep(0.5)
    assert not [m for m in node.watch_messages("states", "door") if m.header == msg.header]
    again = node.call("remove_watch", name="door")
    assert not again.success and "no watch named 'door'" in again.error


@pytest.mark.parametrize("change, reason", [
    ({"camera": "rear"}, "unknown camera 'rear'; cameras: left, right"),
    ({"on_threshold": 0.4, "off_threshold": 0.6}, "off_threshold 0.6 is above on_threshold 0.4"),
    ({"rate_hz": 0.0}, "rate_hz is 0.0"),
    ({"rate_hz": -2.0}, "rate_hz is -2.0"),
    ({"min_frames": 0}, "min_frames is 0"),
    ({"name": "yaml_door"}, "a watch named 'yaml_door' exists"),
    ({"question": ""}, "the question is empty"),
])
def test_bad_watches_are_refused(node, change, reason):
    request = dict(name="refused", camera="left", question=QUESTION, rate_hz=1.0, on_threshold=0.6,
                   off_threshold=0.4, min_frames=2)
    request.update(change)
    response = node.call("add_watch", **request)
    assert not response.success and reason in response.error, response.error


def test_requests_are_answered_while_four_watches_run_on_two_cameras(node):
    messages = {camera: image_msg(picture(20 + i), node.ros.now(), f"{camera}_optical")
                for i, camera in enumerate(CAMERAS)}
    stop = threading.Event()

    def stream():  # both cameras at 15 Hz, a new stamp each time
        while not stop.wait(1 / 15):
            for camera, msg in messages.items():
                msg.header.stamp = node.ros.now()
                node.publisher(CAMERAS[camera]).publish(msg)

    names = ["w_left_door", "w_left_person", "w_right_door", "w_right_person"]
    for name in names:
        camera = name.split("_")[1]
        question = QUESTION if name.endswith("door") else "Is anyone there?"
        assert_ok(node.call("add_watch", name=name, camera=camera, question=question, rate_hz=5.0, on_threshold=0.6,
                            off_threshold=0.4, min_frames=2), node)
    streamer = threading.Thread(target=stream, daemon=True)
    streamer.start()
    try:
        node.ros.wait_for(lambda: all(node.watch_messages("states", n) for n in names), DEADLINE_S, "every watch running")
        for round_ in range(3):
            for camera in CAMERAS:
                assert_ok(node.ask(QUESTION, camera=camera, max_age_s=-1.0, max_new_tokens=4, timeout_s=DEADLINE_S), node)
                assert_ok(node.check(QUESTION, camera=camera), node)
            assert_ok(node.choose("What state is the door in?", ["open", "closed"]), node)
        before = {n: len(node.watch_messages("states", n)) for n in names}
        node.ros.wait_for(lambda: all(len(node.watch_messages("states", n)) > before[n] + 2 for n in names),
                          DEADLINE_S, "the watches still running after the requests")
    finally:
        stop.set()
        streamer.join(5.0)
        for name in names:
            node.call("remove_watch", name=name)
    for name in names:  # each watch evaluated each frame at most once
        stamps = [(m.header.stamp.sec, m.header.stamp.nanosec) for m in node.watch_messages("states", name)]
        assert len(stamps) == len(set(stamps)), name
    assert node.node.alive()
