"""Request orchestration, without ROS: from a request about a camera to its reply.

The node (omnivision_ros.node) only moves requests and replies between ROS and this module.
Here a request is checked when it arrives (model loaded, known camera, fresh frame, sane
question), its work is queued on the one inference worker, the frame is converted only when
the model needs its pixels (a repeat question about a frame hits the vision cache and skips
it), and the finished job becomes a Reply whose `timing` holds the fields of
omnivision_interfaces/Timing.

New kinds of request add a work function `work(pipeline, image, job)` and call `submit_work`
(Check and Choose do); periodic, low-priority work passes `only_if_idle=True` and is refused
(skipped) whenever a request runs or waits. Standing watches (omnivision_ros.watches) run their
yes/no checks of several cameras' frames as one such job (`submit_checks`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

from omnivision_ros.errors import OmniVisionError
from omnivision_ros.ros.frames import CameraFeed, Frame
from omnivision_ros.ros.image_convert import color_order, to_pixels
from omnivision_ros.ros.params import NodeConfig
from omnivision_ros.runtime.factory import open_model
from omnivision_ros.runtime.generator import GenerationConfig
from omnivision_ros.runtime.decisions import check_options
from omnivision_ros.runtime.pipeline import Answer, Choice, Decision, FrameQuestion, Pipeline
from omnivision_ros.worker import CANCELLED, DONE, FAILED, READY, InferenceWorker, Job

NO_MODEL = ("no model configured: set the node's `model` parameter to a model bundle directory written by "
            "omnivision-export, e.g. `ros2 launch omnivision_ros vlm.launch.py model:=/path/to/bundle` or "
            "`ros2 run omnivision_ros omnivision_node --ros-args -p model:=/path/to/bundle` "
            "(`model:=tiny` runs a random-weight test model on torch)")
REFUSED = "refused"  # Reply.state of a request that never reached the worker


@dataclass(frozen=True)
class Request:
    kind: str  # names the request in logs: "ask", "describe", "query", "scene description"
    camera: str  # empty = the default camera
    question: str
    max_age_s: float = 0.0  # 0 = the node's max_frame_age_s, negative = any age
    max_new_tokens: int = 0  # 0 = the node's max_new_tokens


@dataclass
class Reply:
    """What a request gets back; the fields of Ask.Response / Describe.Response / Query.Result."""

    success: bool
    error: str
    camera: str
    state: str = REFUSED  # the job's final state (omnivision_ros.worker) or REFUSED
    header: object | None = None  # std_msgs/Header of the frame used; None when no frame was used
    answer: str = ""
    stop_reason: str = ""
    timing: dict = field(default_factory=dict)  # omnivision_interfaces/Timing field -> value
    result: object = None  # what the work returned (an Answer for Ask/Describe/Query), for other kinds

    def fill(self, msg):
        """Copy into an Ask/Describe response or a Query result (the same fields); returns msg."""
        msg.answer, msg.stop_reason = self.answer, self.stop_reason
        return self.fill_common(msg)

    def fill_common(self, msg):
        """Copy the fields every response has (success, error, camera, header, timing); returns msg."""
        msg.success, msg.error, msg.camera = self.success, self.error, self.camera
        if self.header is not None:
            msg.header = self.header
        self.fill_timing(msg.timing)
        return msg

    def fill_check(self, msg):
        """Copy into a Check response; returns msg."""
        if self.success and isinstance(self.result, Decision):
            msg.answer, msg.probability, msg.yes_no_mass = self.result.answer, self.result.probability, \
                self.result.yes_no_mass
        return self.fill_common(msg)

    def fill_choose(self, msg):
        """Copy into a Choose response (index -1 on failure); returns msg."""
        msg.index = -1
        if self.success and isinstance(self.result, Choice):
            msg.index, msg.option = self.result.index, self.result.option
            msg.scores, msg.probabilities = list(self.result.scores), list(self.result.probabilities)
        return self.fill_common(msg)

    def fill_timing(self, timing) -> None:
        """Copy into an omnivision_interfaces/Timing message."""
        for name, value in self.timing.items():
            setattr(timing, name, value)


@dataclass
class Stats:
    served: int = 0
    failed: int = 0
    last_ttft_ms: float = 0.0
    last_tokens_per_second: float = 0.0


class FrameImage:
    """A camera frame as the model sees it: converted on first use, on the worker thread."""

    def __init__(self, frame: Frame, max_pixels: int):
        self.frame = frame
        self.key = frame.key
        self.color_order = color_order(frame.msg)  # rgb8 stays RGB: no RGB -> BGR -> RGB
        self._max_pixels = max_pixels

    def pixels(self):
        """uint8 [H, W, 3] in `color_order`."""
        try:
            return to_pixels(self.frame.msg, self._max_pixels)
        except OmniVisionError as exc:
            raise OmniVisionError(f"camera '{self.frame.camera}' frame: {exc}") from exc


class TextStream:
    """The streamed answer as text that only grows, so a client may append each delta (speech).

    The model's text so far can shrink or change at its end (an incomplete UTF-8 character, the
    role header being recognised): such text is held back until it extends what was sent."""

    def __init__(self):
        self.text = ""
        self.tokens = 0

    def push(self, text: str) -> str:
        """Take the answer so far after one more token; return what it adds to `text`."""
        self.tokens += 1
        text = text.rstrip("\ufffd")
        if not text.startswith(self.text):
            return ""
        delta, self.text = text[len(self.text):], text
        return delta


def answer_work(question: str, max_new_tokens: int, on_text: Callable[[str, str, int], None] | None = None):
    """The work of Ask, Describe and Query: `on_text(text so far, delta, tokens)` once per token."""
    def work(pipeline: Pipeline, image: FrameImage, job: Job) -> Answer:
        stream = TextStream()

        def feedback(text: str) -> None:
            delta = stream.push(text)
            on_text(stream.text, delta, stream.tokens)

        return pipeline.ask(image.pixels, question, frame_key=image.key, color_order=image.color_order,
                            max_new_tokens=max_new_tokens or None, on_text=feedback if on_text else None,
                            should_stop=job.should_stop)
    return work


def check_work(question: str, threshold: float):
    """The work of Check: yes or no with its probability."""
    def work(pipeline: Pipeline, image: FrameImage, job: Job) -> Decision:
        return pipeline.check(image.pixels, question, frame_key=image.key, color_order=image.color_order,
                              threshold=threshold)
    return work


def choose_work(question: str, options: list[str], max_option_tokens: int):
    """The work of Choose: the options scored; stops between options on cancel or timeout."""
    def work(pipeline: Pipeline, image: FrameImage, job: Job) -> Choice:
        return pipeline.choose(image.pixels, question, options, frame_key=image.key, color_order=image.color_order,
                               max_option_tokens=max_option_tokens, should_stop=job.should_stop)
    return work


class Orchestrator:
    """Owns the inference worker; checks, queues and answers requests about camera frames.

    `now_ns` is the node's clock (ROS time), `log` a logger with debug/info/warning/error
    (the node's ROS logger). `submit*` may be called from any thread; replies arrive on the
    calling thread when refused, else on the worker's thread.
    """

    def __init__(self, config: NodeConfig, feeds: dict[str, CameraFeed], now_ns: Callable[[], int], log):
        self.config = config
        self.feeds = feeds
        self.now_ns = now_ns
        self.log = log
        self.stats = Stats()
        self.backend_name = ""
        self.backend_description = ""
        self._described: dict[str, tuple] = {}  # camera -> key of the frame last described
        self._describing: dict[str, Job] = {}  # camera -> its description job
        self.worker = InferenceWorker(self._load, config.queue_size, on_loaded=self._loaded, log=log.error)

    def start(self) -> "Orchestrator":
        self.worker.start()  # loads the model in the background
        return self

    def close(self) -> None:
        """Refuse new requests, end queued ones, stop the running one at its next token."""
        self.worker.stop()

    # --- model ------------------------------------------------------------------------------

    def _load(self) -> Pipeline:
        cfg = self.config
        if not cfg.model.strip():
            raise OmniVisionError(NO_MODEL)
        backend, tokenizer = open_model(cfg.model, cfg.backend, cfg.threads, precision=cfg.precision,
                                        log=self.log.info,  # it says which backend it chose and why
                                        lm_file=cfg.lm_file, mmproj_file=cfg.mmproj_file)
        generation = GenerationConfig(cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.seed).validate()
        self.backend_name = backend.name
        self.backend_description = getattr(backend, "description", "")
        return Pipeline(backend, tokenizer, generation, cfg.vision_cache_size, cfg.prefix_cache_size,
                        task=cfg.task, log=self.log.info)

    def _loaded(self, worker: InferenceWorker) -> None:
        if worker.state == READY:
            self.log.info(f"model ready in {worker.load_s:.1f} s: {self.backend_name} ({self.backend_description})")
            if worker.model.check_error:
                self.log.warning(f"~/check and standing watches will be refused: {worker.model.check_error}")
        elif worker.state == FAILED:
            self.log.error(f"model not loaded, every request will be refused: {worker.load_error}")

    # --- requests -----------------------------------------------------------------------------

    def submit(self, request: Request, on_reply: Callable[[Reply], None],
               on_text: Callable[[str, str, int], None] | None = None) -> Job | None:
        """Check and queue an Ask/Describe/Query request; `on_reply` gets its Reply exactly once.
        Returns the job (for cancel), or None when the request was refused."""
        return self.submit_work(request, answer_work(request.question, request.max_new_tokens, on_text), on_reply)

    def submit_work(self, request: Request, work: Callable[[Pipeline, FrameImage, Job], Answer],
                    on_reply: Callable[[Reply], None], only_if_idle: bool = False) -> Job | None:
        """Check `request`, then run `work(pipeline, image, job)` on the worker."""
        camera = request.camera or self.config.default_camera
        frame = None
        try:
            frame = self.frame_for(camera, request.max_age_s)
            self.check_question(request.question)
            return self._queue(request, frame, work, on_reply, only_if_idle)
        except OmniVisionError as exc:
            self.log.warning(f"{request.kind} on camera '{camera}' refused: {exc}")
            on_reply(Reply(False, str(exc), camera, header=frame.msg.header if frame else None))
            return None

    def submit_check(self, request: Request, threshold: float, on_reply: Callable[[Reply], None]) -> Job | None:
        """Check: yes or no about the frame; threshold 0 = the node's check_threshold."""
        if not (math.isfinite(threshold) and 0 <= threshold <= 1):
            return self._refuse(request, f"threshold is {threshold}; pass a probability in (0, 1] "
                                         "(0 = the node's check_threshold)", on_reply)
        unavailable = self.check_unavailable()
        if unavailable:
            return self._refuse(request, unavailable, on_reply)
        return self.submit_work(request, check_work(request.question, threshold or self.config.check_threshold),
                                on_reply)

    def submit_choose(self, request: Request, options, on_reply: Callable[[Reply], None]) -> Job | None:
        """Choose: the options scored as answers about the frame."""
        try:
            if self.config.task != "vqa":
                raise OmniVisionError(f"choices need task vqa; this node runs task {self.config.task}, whose prompt "
                                      "takes no question")
            options = check_options(list(options), self.config.choose_max_options)
        except OmniVisionError as exc:
            return self._refuse(request, str(exc), on_reply)
        return self.submit_work(request, choose_work(request.question, options, self.config.choose_max_option_tokens),
                                on_reply)

    def _refuse(self, request: Request, reason: str, on_reply: Callable[[Reply], None]) -> None:
        camera = request.camera or self.config.default_camera
        self.log.warning(f"{request.kind} on camera '{camera}' refused: {reason}")
        on_reply(Reply(False, reason, camera))

    def submit_checks(self, items: list[tuple[Frame, str]], on_done: Callable[[Job], None]) -> Job:
        """Low-priority yes/no checks of (frame, question) pairs as one job (standing watches): refused with
        "the model is busy" unless the worker is idle; frames not cached are encoded in one batched call;
        a request arriving meanwhile stops it before its next check. job.result: one Decision,
        OmniVisionError or None (not run) per item."""
        images = {}
        for frame, _ in items:
            images.setdefault(frame.key, FrameImage(frame, self.config.max_image_pixels))
        threshold = self.config.check_threshold
        worker = self.worker

        def work(pipeline: Pipeline, job: Job):
            questions = [FrameQuestion(images[frame.key].pixels, question, frame.key, images[frame.key].color_order)
                         for frame, question in items]
            return pipeline.check_frames(questions, threshold, should_stop=lambda: worker.depth > 0 or job.should_stop())

        return worker.submit(work, self.config.request_timeout_s, on_done, only_if_idle=True)

    def cancel(self, job: Job) -> None:
        """Cancel a queued or running job: generation stops at the next token."""
        self.worker.cancel(job)

    @property
    def ready(self) -> bool:
        """The model is loaded."""
        return self.worker.state == READY

    def check_unavailable(self) -> str:
        """Why yes/no checks cannot run with this node's model or task; empty when they can (or the model
        is still loading: then its requests will say)."""
        if self.config.task != "vqa":
            return (f"yes/no checks need task vqa; this node runs task {self.config.task}, whose prompt takes "
                    "no question")
        if self.worker.state == FAILED:
            return f"the model is not loaded: {self.worker.load_error}"
        pipeline = self.worker.model if self.worker.state == READY else None
        return pipeline.check_error if pipeline is not None else ""

    def fresh_frame(self, camera: str) -> Frame | None:
        """The newest frame of a camera if it is within the node's max_frame_age_s, else None."""
        frame = self.feeds[camera].latest()
        bound = self.config.max_frame_age_s
        if frame is None or (bound >= 0 and frame.age_s(self.now_ns()) > bound):
            return None
        return frame

    def frame_for(self, camera: str, max_age_s: float) -> Frame:
        """The frame a request is about, checked at arrival: model loaded, known camera, fresh frame."""
        if self.worker.state == FAILED:
            raise OmniVisionError(f"the model is not loaded: {self.worker.load_error}")
        if not math.isfinite(max_age_s):
            raise OmniVisionError(f"max_age_s is {max_age_s}; pass seconds (0 = the node's max_frame_age_s, "
                                  "negative = a frame of any age)")
        feed = self.feeds.get(camera)
        if feed is None:
            raise OmniVisionError(f"unknown camera '{camera}'; cameras: {', '.join(self.feeds)}")
        frame = feed.latest()
        if frame is None:
            raise OmniVisionError(f"no frame received yet from camera '{camera}' on {feed.topic}; "
                                  "is the camera publishing there (and with sensor-data compatible QoS)?")
        bound = self.config.max_frame_age_s if max_age_s == 0 else max_age_s
        if bound >= 0:
            age = frame.age_s(self.now_ns())
            if age > bound:
                raise OmniVisionError(
                    f"the newest frame of camera '{camera}' is {age:.2f} s old, older than the bound of {bound:g} s; "
                    "is the camera still publishing (and are the clocks in sync)? Pass max_age_s < 0 to accept it")
        return frame

    def check_question(self, question: str) -> None:
        if not question.strip():
            raise OmniVisionError("the question is empty")
        limit = self.config.question_max_chars
        if len(question) > limit:
            raise OmniVisionError(f"the question is too long: {len(question)} characters, the limit is {limit} "
                                  "(question_max_chars)")

    def _queue(self, request: Request, frame: Frame, work, on_reply, only_if_idle: bool) -> Job:
        image = FrameImage(frame, self.config.max_image_pixels)

        def done(job: Job) -> None:  # on the worker thread (or wherever the job ended)
            reply = self.reply(request, frame, job)
            self._record(job, reply)
            on_reply(reply)

        return self.worker.submit(lambda pipeline, job: work(pipeline, image, job), self.config.request_timeout_s,
                                  done, only_if_idle=only_if_idle)

    def reply(self, request: Request, frame: Frame, job: Job) -> Reply:
        """The Reply of a finished job, logged."""
        camera = frame.camera
        reply = Reply(job.state == DONE, job.error, camera, job.state, frame.msg.header, timing=self.timing(job),
                      result=job.result)
        if isinstance(job.result, Choice) and job.result.index < 0 and reply.success:  # stopped between options
            reply.success, reply.error = False, "scoring stopped before every option was scored"
        if isinstance(job.result, Answer):
            reply.answer, reply.stop_reason = job.result.text, job.result.stop_reason
        stamp = f"{frame.msg.header.stamp.sec}.{frame.msg.header.stamp.nanosec:09d}"
        what = f"{request.kind} on camera '{camera}' frame {stamp}"
        if reply.success and isinstance(job.result, Decision):
            d = job.result
            self.log.debug(f"{what}: {'yes' if d.answer else 'no'}, p_yes {d.probability:.4f}, "
                           f"yes/no mass {d.yes_no_mass:.3g}, {reply.timing['ttft_ms']:.1f} ms")
        elif reply.success:
            t = reply.timing
            self.log.debug(f"{what}: {t.get('new_tokens', 0)} tokens, ttft {t.get('ttft_ms', 0.0):.1f} ms, "
                           f"{t.get('tokens_per_second', 0.0):.1f} tok/s")
        elif job.state == CANCELLED:
            self.log.info(f"{what}: {job.error}")
        else:
            self.log.warning(f"{what} failed: {job.error}")
        return reply

    @staticmethod
    def timing(job: Job) -> dict:
        """omnivision_interfaces/Timing fields of a finished job (only the queue time when the model did
        not run). The time to first token counts from the request's arrival: queue wait + the model's."""
        queue_ms = job.queue_s * 1e3
        if not isinstance(job.result, (Answer, Decision, Choice)):
            return {"queue_ms": queue_ms}
        return job.result.timing.message_fields(queue_ms)

    def _record(self, job: Job, reply: Reply) -> None:
        stats = self.stats
        if reply.success:
            stats.served += 1
            if isinstance(job.result, Answer):  # Check and Choose generate nothing: no time to first token
                stats.last_ttft_ms = reply.timing["ttft_ms"]
                stats.last_tokens_per_second = reply.timing["tokens_per_second"]
        else:
            stats.failed += 1

    # --- periodic scene descriptions --------------------------------------------------------

    def describe_new_frames(self, on_reply: Callable[[Reply], None]) -> None:
        """Queue a description of every camera's newest frame not described yet; a camera whose
        previous description still runs, or whose frame is stale, is skipped this time."""
        if self.worker.state != READY:
            return
        cfg = self.config
        for name, feed in self.feeds.items():
            frame = feed.latest()
            if frame is None or self._described.get(name) == frame.key:
                continue  # nothing new to describe
            pending = self._describing.get(name)
            if pending is not None and not pending.done:
                continue  # at most one description per camera in flight: never pile up work
            if cfg.max_frame_age_s >= 0 and frame.age_s(self.now_ns()) > cfg.max_frame_age_s:
                continue
            request = Request("scene description", name, cfg.describe_prompt)
            try:
                job = self._queue(request, frame, answer_work(request.question, 0), on_reply, only_if_idle=False)
            except OmniVisionError as exc:
                self.log.debug(f"scene description of camera '{name}' skipped: {exc}")
                continue
            self._described[name] = frame.key
            self._describing[name] = job
