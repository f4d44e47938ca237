"""Standing yes/no watches on camera frames, without ROS: definitions, the hysteresis rule and scheduling.

A watch asks one yes/no question about one camera's frames at `rate_hz` and keeps a boolean state:

    each evaluation votes yes when p_yes >= on_threshold, no when p_yes < off_threshold (off <= on),
    and neither in between; the state flips after `min_frames` consecutive votes against it.

The state starts false, so a watch whose question is true from the start flips once, after
`min_frames` evaluations. The node (omnivision_ros.node) calls `Watches.tick()` every TICK_S: each
due watch whose camera holds a fresh frame it has not evaluated joins one cycle, a single
low-priority job on the inference worker (Orchestrator.submit_checks): frames of several cameras
are encoded in one batched vision call, watches on one frame share its encoding and prompt-prefix
cache. Requests come first: a cycle is only started when the worker is idle, and a request arriving
during a cycle stops it before its next check; watches that could not run skip their cycle
(counted), they never queue. A due watch without a new frame waits for one.
"""
from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from typing import Callable, Sequence

from omnivision_ros.errors import OmniVisionError, check_name
from omnivision_ros.worker import DONE

TICK_S = 0.05  # how often the node looks for due watches
MAX_RATE_HZ = 1.0 / TICK_S
DEFAULTS = {"rate_hz": 1.0, "on_threshold": 0.6, "off_threshold": 0.4, "min_frames": 2}


@dataclass(frozen=True)
class WatchSpec:
    """A standing yes/no question about one camera."""

    name: str
    camera: str  # empty = the node's default camera
    question: str
    rate_hz: float = DEFAULTS["rate_hz"]  # evaluations per second, at most one per new frame
    on_threshold: float = DEFAULTS["on_threshold"]  # p_yes at or above this votes for true
    off_threshold: float = DEFAULTS["off_threshold"]  # p_yes below this votes for false; <= on_threshold
    min_frames: int = DEFAULTS["min_frames"]  # consecutive votes needed to flip the state


def check_watch(spec: WatchSpec, cameras: Sequence[str], default_camera: str, question_max_chars: int) -> WatchSpec:
    """The watch with its camera resolved, or an OmniVisionError saying what is wrong with it."""
    name = spec.name
    check_name("watch name", name)
    camera = spec.camera or default_camera
    if camera not in cameras:
        raise OmniVisionError(f"watch '{name}': unknown camera '{camera}'; cameras: {', '.join(cameras)}")
    if not spec.question.strip():
        raise OmniVisionError(f"watch '{name}': the question is empty")
    if len(spec.question) > question_max_chars:
        raise OmniVisionError(f"watch '{name}': the question is too long: {len(spec.question)} characters, the limit "
                              f"is {question_max_chars} (question_max_chars)")
    if not (math.isfinite(spec.rate_hz) and 0 < spec.rate_hz <= MAX_RATE_HZ):
        raise OmniVisionError(f"watch '{name}': rate_hz is {spec.rate_hz}; pass evaluations per second in "
                              f"(0, {MAX_RATE_HZ:g}]")
    for what, value in (("on_threshold", spec.on_threshold), ("off_threshold", spec.off_threshold)):
        if not (math.isfinite(value) and 0 <= value <= 1):
            raise OmniVisionError(f"watch '{name}': {what} is {value}; pass a probability in [0, 1]")
    if spec.off_threshold > spec.on_threshold:
        raise OmniVisionError(f"watch '{name}': off_threshold {spec.off_threshold:g} is above on_threshold "
                              f"{spec.on_threshold:g}; it must be at most on_threshold (equal: no hysteresis band)")
    if spec.min_frames < 1:
        raise OmniVisionError(f"watch '{name}': min_frames is {spec.min_frames}; it must be at least 1")
    return WatchSpec(name, camera, spec.question, float(spec.rate_hz), float(spec.on_threshold),
                     float(spec.off_threshold), int(spec.min_frames))


class Hysteresis:
    """The state of one watch under the rule in the module docstring."""

    def __init__(self, on_threshold: float, off_threshold: float, min_frames: int):
        self.on_threshold, self.off_threshold, self.min_frames = on_threshold, off_threshold, min_frames
        self.state = False
        self.streak = 0  # consecutive votes against the state

    def update(self, probability: float) -> bool:
        """Take one evaluation; True when it flipped the state."""
        vote = True if probability >= self.on_threshold else False if probability < self.off_threshold else None
        if vote is None or vote == self.state:
            self.streak = 0
            return False
        self.streak += 1
        if self.streak < self.min_frames:
            return False
        self.state, self.streak = vote, 0
        return True


@dataclass
class WatchEvaluation:
    """One watch evaluated on one frame: the fields of omnivision_interfaces/WatchState (and WatchEvent)."""

    name: str
    camera: str
    header: object  # std_msgs/Header of the frame
    probability: float
    yes_no_mass: float
    state: bool
    previous_state: bool
    timing: dict  # omnivision_interfaces/Timing field -> value

    @property
    def flipped(self) -> bool:
        return self.state != self.previous_state


@dataclass
class Watch:
    spec: WatchSpec
    hysteresis: Hysteresis
    next_due: float  # clock() time of the next evaluation
    last_key: tuple | None = None  # the frame evaluated last: never evaluated twice
    evaluations: int = 0
    skipped: int = 0  # cycles lost to requests (the model was busy)
    events: int = 0
    failures: int = 0
    last_probability: float = math.nan
    last_yes_no_mass: float = math.nan
    last_stamp: str = ""
    last_error: str = ""


class Watches:
    """The watches of one node, scheduled on its orchestrator (omnivision_ros.orchestration.Orchestrator).

    `on_evaluated(evaluations)` receives each finished cycle's evaluations (on the worker thread); `log` a
    logger with info/warning. add/remove/tick/snapshot may be called from any thread."""

    def __init__(self, orchestrator, on_evaluated: Callable[[list[WatchEvaluation]], None], log,
                 clock: Callable[[], float] = time.monotonic):
        self.orchestrator = orchestrator
        self.on_evaluated = on_evaluated
        self.log = log
        self.clock = clock
        self.watches: dict[str, Watch] = {}
        self.cycles = 0
        self._cycle = None  # the job of the cycle in flight
        self._lock = threading.Lock()

    def add(self, spec: WatchSpec) -> WatchSpec:
        """Validate and start a watch (first evaluation at the next tick); OmniVisionError when refused."""
        cfg = self.orchestrator.config
        spec = check_watch(spec, [c.name for c in cfg.cameras], cfg.default_camera, cfg.question_max_chars)
        unavailable = self.orchestrator.check_unavailable()
        if unavailable:
            raise OmniVisionError(f"watch '{spec.name}': {unavailable}")
        with self._lock:
            if spec.name in self.watches:
                raise OmniVisionError(f"a watch named '{spec.name}' exists; remove it first")
            self.watches[spec.name] = Watch(spec, Hysteresis(spec.on_threshold, spec.off_threshold, spec.min_frames),
                                            self.clock())
        self.log.info(f"watch '{spec.name}' on camera '{spec.camera}' at {spec.rate_hz:g} Hz: '{spec.question}' "
                      f"(on {spec.on_threshold:g}, off {spec.off_threshold:g}, {spec.min_frames} frames to flip)")
        return spec

    def remove(self, name: str) -> None:
        with self._lock:
            if self.watches.pop(name, None) is None:
                known = ", ".join(self.watches) or "none"
                raise OmniVisionError(f"no watch named '{name}'; watches: {known}")
        self.log.info(f"watch '{name}' removed")

    def tick(self) -> int:
        """Start a cycle of the due watches that have a new frame; the number of watches in it."""
        orchestrator = self.orchestrator
        if not orchestrator.ready:
            return 0
        unavailable = orchestrator.check_unavailable()  # e.g. a vocabulary without yes/no tokens: said once at load
        now = self.clock()
        with self._lock:
            if unavailable:
                for watch in self.watches.values():
                    watch.last_error = unavailable
                return 0
            if self._cycle is not None and not self._cycle.done:
                return 0  # the previous cycle still runs: due watches wait for the next tick, never queue
            ready = []
            for watch in self.watches.values():
                if now < watch.next_due:
                    continue
                frame = orchestrator.fresh_frame(watch.spec.camera)
                if frame is None or frame.key == watch.last_key:
                    continue  # wait for a new frame
                period = 1.0 / watch.spec.rate_hz
                following = watch.next_due + period  # keep the rhythm unless it fell behind
                watch.next_due = following if following > now else now + period
                ready.append((watch, frame))
            if not ready:
                return 0
            try:
                self._cycle = orchestrator.submit_checks([(f, w.spec.question) for w, f in ready],
                                                         lambda job: self._finished(ready, job))
            except OmniVisionError:  # a request runs or waits: this cycle is skipped
                for watch, _ in ready:
                    watch.skipped += 1
                return 0
            self.cycles += 1
        return len(ready)

    def _finished(self, ready: list, job) -> None:
        results = job.result if job.state == DONE else [None] * len(ready)
        evaluations, failures = [], []
        with self._lock:
            for (watch, frame), result in zip(ready, results):
                if self.watches.get(watch.spec.name) is not watch:
                    continue  # removed meanwhile
                if result is None and job.state == DONE:
                    watch.skipped += 1  # a request arrived first
                    continue
                watch.last_key = frame.key
                if result is None or isinstance(result, OmniVisionError):
                    watch.failures += 1
                    watch.last_error = str(result) if result is not None else job.error
                    failures.append(f"watch '{watch.spec.name}': {watch.last_error}")
                    continue
                previous = watch.hysteresis.state
                if watch.hysteresis.update(result.probability):
                    watch.events += 1
                watch.evaluations += 1
                watch.last_probability, watch.last_yes_no_mass = result.probability, result.yes_no_mass
                stamp = frame.msg.header.stamp
                watch.last_stamp, watch.last_error = f"{stamp.sec}.{stamp.nanosec:09d}", ""
                evaluations.append(WatchEvaluation(watch.spec.name, watch.spec.camera, frame.msg.header,
                                                   result.probability, result.yes_no_mass, watch.hysteresis.state,
                                                   previous, result.timing.message_fields(job.queue_s * 1e3)))
        for failure in failures:
            self.log.warning(failure)
        if evaluations:
            self.on_evaluated(evaluations)

    def snapshot(self) -> list[dict]:
        """Every watch's definition, state and counters (for /diagnostics)."""
        with self._lock:
            return [{"name": w.spec.name, "camera": w.spec.camera, "question": w.spec.question,
                     "rate_hz": w.spec.rate_hz, "on_threshold": w.spec.on_threshold,
                     "off_threshold": w.spec.off_threshold, "min_frames": w.spec.min_frames,
                     "state": w.hysteresis.state, "last_probability": w.last_probability,
                     "last_yes_no_mass": w.last_yes_no_mass, "last_frame_stamp": w.last_stamp or "-",
                     "evaluations": w.evaluations, "skipped_busy": w.skipped, "events": w.events,
                     "failures": w.failures, "last_error": w.last_error or "-"} for w in self.watches.values()]
