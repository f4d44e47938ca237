"""omnivision_node: camera topics in; VQA answers, scene descriptions and diagnostics out.

A thin adapter (STYLE 3, 6): camera callbacks store the newest message per camera; services
and the action validate a request, hand it to the single inference worker (omnivision_ros.worker)
and wait for it on a MultiThreadedExecutor thread, so subscriptions stay responsive. Only the
worker thread runs the model.

    python -m omnivision_ros.node --ros-args --params-file config/omnivision.yaml -p model:=engines/tiny
    ros2 run omnivision_ros omnivision_node --ros-args -p model:=/path/to/bundle
"""
from __future__ import annotations

import functools
import queue
import signal
import sys
import threading
import time
from dataclasses import dataclass

import rclpy
import rclpy.exceptions
from diagnostic_msgs.msg import DiagnosticArray
from rclpy.action import ActionServer, CancelResponse, GoalResponse
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor
from rclpy.node import Node
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import CompressedImage, Image

from omnivision_interfaces.action import Query
from omnivision_interfaces.msg import SceneDescription
from omnivision_interfaces.srv import Ask, Describe
from omnivision_ros.errors import OmniVisionError
from omnivision_ros.ros import diagnostics as diag
from omnivision_ros.ros.frames import CameraFeed, Frame
from omnivision_ros.ros.image_convert import to_bgr
from omnivision_ros.ros.params import NodeConfig, declare_and_read
from omnivision_ros.runtime.factory import open_model
from omnivision_ros.runtime.generator import GenerationConfig
from omnivision_ros.runtime.pipeline import Answer, Pipeline
from omnivision_ros.worker import CANCELLED, DONE, FAILED, LOADING, READY, InferenceWorker, Job

NODE_NAME = "omnivision_node"
NO_MODEL = ("no model configured: set the node's `model` parameter to a model bundle directory written by "
            "omnivision-export, e.g. `ros2 launch omnivision_ros vlm.launch.py model:=/path/to/bundle` or "
            "`ros2 run omnivision_ros omnivision_node --ros-args -p model:=/path/to/bundle` "
            "(`model:=tiny` runs a random-weight test model on torch)")
# Bad parameter values or types (the names differ between rclpy releases).
_PARAMETER_ERRORS = (OmniVisionError,) + tuple(
    getattr(rclpy.exceptions, name) for name in
    ("ParameterException", "InvalidParameterTypeException", "InvalidParameterValueException")
    if hasattr(rclpy.exceptions, name))


@dataclass
class Outcome:
    """What the worker hands back for one request."""

    answer: Answer
    convert_ms: float  # ROS message -> BGR array (0 when the frame was converted before)


class OmniVisionNode(Node):
    def __init__(self, **kwargs):
        super().__init__(NODE_NAME, **kwargs)
        self.config: NodeConfig = declare_and_read(self)
        cfg = self.config

        self.request_group = ReentrantCallbackGroup()
        self.timer_group = MutuallyExclusiveCallbackGroup()
        self.feeds: dict[str, CameraFeed] = {}
        self.camera_subscriptions = []
        for camera in cfg.cameras:
            msg_type = CompressedImage if camera.transport == "compressed" else Image
            feed = CameraFeed(camera.name, camera.topic, camera.transport)
            subscription = self.create_subscription(
                msg_type, camera.topic, functools.partial(self.image_callback, feed), qos_profile_sensor_data)
            feed.topic = subscription.topic_name  # resolved: namespace and remappings applied
            self.feeds[camera.name] = feed
            self.camera_subscriptions.append(subscription)

        self.ask_service = self.create_service(Ask, "~/ask", self.ask_callback, callback_group=self.request_group)
        self.describe_service = self.create_service(
            Describe, "~/describe", self.describe_callback, callback_group=self.request_group)
        self.query_server = ActionServer(
            self, Query, "~/query", execute_callback=self.query_execute_callback,
            goal_callback=self.query_goal_callback, cancel_callback=self.query_cancel_callback,
            callback_group=self.request_group)
        self.description_publisher = self.create_publisher(SceneDescription, "~/scene_description", 10)
        self.diagnostics_publisher = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self.diagnostics_timer = self.create_timer(1.0, self.diagnostics_callback, callback_group=self.timer_group)
        self.describe_timer = None
        if cfg.describe_rate_hz > 0:
            self.describe_timer = self.create_timer(
                1.0 / cfg.describe_rate_hz, self.describe_timer_callback, callback_group=self.timer_group)

        # Worker-thread state: the newest converted image per camera, so several questions about
        # one frame decode it once.
        self._converted: dict[str, tuple[tuple, object]] = {}
        # Periodic descriptions: the frame last described and the pending job, per camera.
        self._described: dict[str, tuple] = {}
        self._describe_jobs: dict[str, Job] = {}
        self._stats_lock = threading.Lock()
        self.served = 0
        self.failed = 0
        self.last_ttft_ms = 0.0
        self.last_tokens_per_second = 0.0
        self.backend_name = ""
        self.backend_description = ""
        # Blocked request callbacks hold executor threads: the running one and every queued one.
        self.executor_threads = cfg.queue_size + 4

        self._log_start()
        self.worker = InferenceWorker(self._load_model, cfg.queue_size, on_loaded=self._model_loaded).start()

    # --- startup ---------------------------------------------------------------------------

    def _log_start(self) -> None:
        cfg, log = self.config, self.get_logger()
        log.info(f"model '{cfg.model}', backend '{cfg.backend}', threads {cfg.threads or 'default'}: "
                 "loading in the background")
        for name, feed in self.feeds.items():
            kind = "CompressedImage" if feed.transport == "compressed" else "Image"
            default = " (default)" if name == cfg.default_camera else ""
            log.info(f"camera '{name}'{default}: {feed.topic} (sensor_msgs/{kind}, sensor-data QoS, newest frame only)")
        rate = f"at {cfg.describe_rate_hz:g} Hz per camera" if cfg.describe_rate_hz > 0 else "off (describe_rate_hz 0)"
        base = self.get_fully_qualified_name()
        log.info(f"services {base}/ask and {base}/describe, action {base}/query; scene descriptions {rate}; "
                 f"queue {cfg.queue_size}, request timeout {cfg.request_timeout_s or 'none'} s")

    def _load_model(self) -> Pipeline:
        cfg = self.config
        if not cfg.model.strip():
            raise OmniVisionError(NO_MODEL)
        # open_model logs which backend it chose and why.
        backend, tokenizer = open_model(
            cfg.model, cfg.backend, cfg.threads, precision=cfg.precision, log=self.get_logger().info,
            lm_file=cfg.lm_file, mmproj_file=cfg.mmproj_file,
        )
        generation = GenerationConfig(cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.seed).validate()
        self.backend_name = backend.name
        self.backend_description = getattr(backend, "description", "")
        return Pipeline(backend, tokenizer, generation, cfg.vision_cache_size, cfg.prefix_cache_size, task=cfg.task)

    def _model_loaded(self, worker: InferenceWorker) -> None:
        if worker.state == READY:
            self.get_logger().info(
                f"model ready in {worker.load_s:.1f} s: {self.backend_name} ({self.backend_description})")
        elif worker.state == FAILED:
            self.get_logger().error(f"model not loaded, every request will be refused: {worker.load_error}")

    # --- subscriptions ---------------------------------------------------------------------

    def image_callback(self, feed: CameraFeed, msg) -> None:
        # Keep only the newest frame; decoding waits until a request needs it.
        feed.store(msg, self.get_clock().now().nanoseconds)

    # --- requests ----------------------------------------------------------------------------

    def ask_callback(self, request, response):
        return self._serve("ask", request.camera, request.question, request.max_age_s, request.max_new_tokens,
                           response)

    def describe_callback(self, request, response):
        return self._serve("describe", request.camera, self.config.describe_prompt, request.max_age_s,
                           request.max_new_tokens, response)

    def _serve(self, kind: str, camera: str, question: str, max_age_s: float, max_new_tokens: int, response):
        name = camera or self.config.default_camera
        frame = None
        try:
            frame = self._frame_for(name, max_age_s)
            self._check_question(question)
            job = self._submit(frame, question, max_new_tokens)
        except OmniVisionError as exc:
            return self._refuse(kind, response, name, frame, str(exc))
        self.worker.wait(job)
        return self._respond(kind, response, name, frame, job)

    def query_goal_callback(self, goal_request) -> GoalResponse:
        # Accept every goal: a refused goal carries no reason; a bad one ends aborted with its error.
        return GoalResponse.ACCEPT

    def query_cancel_callback(self, goal_handle) -> CancelResponse:
        return CancelResponse.ACCEPT

    def query_execute_callback(self, goal_handle):
        goal = goal_handle.request
        result = Query.Result()
        name = goal.camera or self.config.default_camera
        frame = None
        try:
            frame = self._frame_for(name, goal.max_age_s)
            self._check_question(goal.question)
            job = self._submit(frame, goal.question, goal.max_new_tokens, stream=True)
        except OmniVisionError as exc:
            self._refuse("query", result, name, frame, str(exc))
            goal_handle.abort()
            return result
        while True:
            if not self.context.ok():  # shutting down: the goal can no longer be reported
                self.worker.cancel(job)
                return result
            if goal_handle.is_cancel_requested and not job.cancel_requested:
                self.worker.cancel(job)  # generation stops at the next token
            try:
                event = job.events.get(timeout=0.05)
            except queue.Empty:
                self.worker.expire(job)
                continue
            if event is None:
                break
            text, tokens = event
            goal_handle.publish_feedback(Query.Feedback(text=text, tokens=tokens))
        self._respond("query", result, name, frame, job)
        if not self.context.ok():
            return result
        if job.state == CANCELLED and goal_handle.is_cancel_requested:
            goal_handle.canceled()
        elif job.state == DONE:
            goal_handle.succeed()
        else:
            goal_handle.abort()
        return result

    def _frame_for(self, camera: str, max_age_s: float) -> Frame:
        """The frame a request is about, checked at arrival: model loaded, known camera, fresh frame."""
        if self.worker.state == FAILED:
            raise OmniVisionError(f"the model is not loaded: {self.worker.load_error}")
        feed = self.feeds.get(camera)
        if feed is None:
            raise OmniVisionError(f"unknown camera '{camera}'; cameras: {', '.join(self.feeds)}")
        frame = feed.latest()
        if frame is None:
            raise OmniVisionError(f"no frame received yet from camera '{camera}' on {feed.topic}; "
                                  "is the camera publishing there (and with sensor-data compatible QoS)?")
        bound = self.config.max_frame_age_s if max_age_s == 0 else max_age_s
        if bound >= 0:
            age = frame.age_s(self.get_clock().now().nanoseconds)
            if age > bound:
                raise OmniVisionError(
                    f"the newest frame of camera '{camera}' is {age:.2f} s old, older than the bound of {bound:g} s; "
                    "is the camera still publishing (and are the clocks in sync)? Pass max_age_s < 0 to accept it")
        return frame

    def _check_question(self, question: str) -> None:
        if not question.strip():
            raise OmniVisionError("the question is empty")
        limit = self.config.question_max_chars
        if len(question) > limit:
            raise OmniVisionError(f"the question is too long: {len(question)} characters, the limit is {limit} "
                                  "(question_max_chars)")

    def _submit(self, frame: Frame, question: str, max_new_tokens: int, stream: bool = False,
                on_done=None) -> Job:
        max_pixels = self.config.max_image_pixels

        def work(pipeline: Pipeline, job: Job) -> Outcome:
            t0 = time.perf_counter()
            image = self._frame_image(frame, max_pixels)
            convert_ms = (time.perf_counter() - t0) * 1e3
            tokens = 0

            def feedback(text: str) -> None:  # once per generated token
                nonlocal tokens
                tokens += 1
                job.events.put((text, tokens))

            answer = pipeline.ask(image, question, frame_key=frame.key, max_new_tokens=max_new_tokens or None,
                                  on_text=feedback if stream else None, should_stop=job.should_stop)
            return Outcome(answer, convert_ms)

        def done(job: Job) -> None:
            self._record(job)
            if on_done is not None:
                on_done(job)

        return self.worker.submit(work, self.config.request_timeout_s, done)

    def _frame_image(self, frame: Frame, max_pixels: int):
        """BGR array of a frame (worker thread only); the newest conversion per camera is reused."""
        cached = self._converted.get(frame.camera)
        if cached is not None and cached[0] == frame.key:
            return cached[1]
        try:
            image = to_bgr(frame.msg, max_pixels)
        except OmniVisionError as exc:
            raise OmniVisionError(f"camera '{frame.camera}' frame: {exc}") from exc
        self._converted[frame.camera] = (frame.key, image)
        return image

    def _record(self, job: Job) -> None:
        with self._stats_lock:
            if job.state == DONE:
                self.served += 1
                outcome: Outcome = job.result
                self.last_ttft_ms = self._ttft_ms(job, outcome)
                self.last_tokens_per_second = outcome.answer.timing.tokens_per_second
            else:
                self.failed += 1

    @staticmethod
    def _ttft_ms(job: Job, outcome: Outcome) -> float:
        # From the request arriving: queue wait + image conversion + the pipeline's time to first token.
        return job.queue_s * 1e3 + outcome.convert_ms + outcome.answer.timing.ttft_ms

    def _refuse(self, kind: str, response, camera: str, frame: Frame | None, error: str):
        self.get_logger().warning(f"{kind} on camera '{camera}' refused: {error}")
        response.success = False
        response.error = error
        response.camera = camera
        if frame is not None:
            response.header = frame.msg.header
        return response

    def _respond(self, kind: str, response, camera: str, frame: Frame, job: Job):
        """Fill an Ask/Describe response or a Query result (same fields) from a finished job."""
        response.camera = camera
        response.header = frame.msg.header
        response.success = job.state == DONE
        response.error = job.error
        if job.result is not None:
            response.answer = job.result.answer.text
            response.stop_reason = job.result.answer.stop_reason
        self._fill_timing(response.timing, job)
        stamp = f"{frame.msg.header.stamp.sec}.{frame.msg.header.stamp.nanosec:09d}"
        if response.success:
            self.get_logger().debug(
                f"{kind} on camera '{camera}' frame {stamp}: {response.timing.new_tokens} tokens, "
                f"ttft {response.timing.ttft_ms:.1f} ms, {response.timing.tokens_per_second:.1f} tok/s")
        elif job.state == CANCELLED:
            self.get_logger().info(f"{kind} on camera '{camera}' frame {stamp}: {job.error}")
        else:
            self.get_logger().warning(f"{kind} on camera '{camera}' frame {stamp} failed: {job.error}")
        return response

    # --- periodic scene descriptions -------------------------------------------------------

    def describe_timer_callback(self) -> None:
        if self.worker.state != READY:
            return
        now_ns = self.get_clock().now().nanoseconds
        for name, feed in self.feeds.items():
            frame = feed.latest()
            if frame is None or self._described.get(name) == frame.key:
                continue  # nothing new to describe
            pending = self._describe_jobs.get(name)
            if pending is not None and not pending.done:
                continue  # at most one description per camera in flight: never pile up work
            bound = self.config.max_frame_age_s
            if bound >= 0 and frame.age_s(now_ns) > bound:
                continue
            try:
                job = self._submit(frame, self.config.describe_prompt, 0,
                                   on_done=functools.partial(self._publish_description, frame))
            except OmniVisionError as exc:
                self.get_logger().debug(f"scene description of camera '{name}' skipped: {exc}")
                continue
            self._described[name] = frame.key
            self._describe_jobs[name] = job

    def _publish_description(self, frame: Frame, job: Job) -> None:
        # Runs on the worker thread when the job ends.
        if job.state != DONE:
            self.get_logger().warning(f"scene description of camera '{frame.camera}' failed: {job.error}",
                                   throttle_duration_sec=10.0)
            return
        msg = SceneDescription(header=frame.msg.header, camera=frame.camera, text=job.result.answer.text)
        self._fill_timing(msg.timing, job)
        self.description_publisher.publish(msg)

    def _fill_timing(self, timing, job: Job) -> None:
        """omnivision_interfaces/Timing from a finished job (only the queue time when the model did not run)."""
        timing.queue_ms = job.queue_s * 1e3
        outcome: Outcome | None = job.result
        if outcome is None:
            return
        t = outcome.answer.timing
        timing.encode_ms = outcome.convert_ms + t.encode_ms
        timing.prefill_ms = t.prefill_ms
        timing.ttft_ms = self._ttft_ms(job, outcome)
        timing.decode_ms = t.decode_ms
        timing.prompt_tokens = t.prompt_tokens
        timing.new_tokens = t.new_tokens
        timing.tokens_per_second = t.tokens_per_second
        timing.vision_cache_hit = t.vision_cache_hit
        timing.prefix_cache_hit = t.prefix_cache_hit

    # --- diagnostics -------------------------------------------------------------------------

    def diagnostics_callback(self) -> None:
        now = self.get_clock().now()
        array = DiagnosticArray()
        array.header.stamp = now.to_msg()
        array.status = [self._model_status(), self._request_status()]
        array.status += [self._camera_status(feed, now.nanoseconds) for feed in self.feeds.values()]
        self.diagnostics_publisher.publish(array)

    def _model_status(self):
        cfg, worker = self.config, self.worker
        values = {"model": cfg.model, "backend_requested": cfg.backend, "backend": self.backend_name or "-",
                  "backend_description": self.backend_description or "-", "state": worker.state,
                  "load_time_s": round(worker.loading_s, 2)}
        name = f"{self.get_fully_qualified_name()}: model"
        if worker.state == READY:
            return diag.status(name, diag.OK, f"ready on {self.backend_name}", values)
        if worker.state == LOADING:
            return diag.status(name, diag.WARN, f"loading ({worker.loading_s:.0f} s)", values)
        values["error"] = worker.load_error or "-"
        return diag.status(name, diag.ERROR, f"model not loaded: {worker.load_error or worker.state}", values)

    def _request_status(self):
        cfg, worker = self.config, self.worker
        depth = worker.depth
        with self._stats_lock:
            values = {"queue_depth": depth, "queue_size": cfg.queue_size, "busy": worker.running is not None,
                      "served": self.served, "failed": self.failed, "last_ttft_ms": round(self.last_ttft_ms, 1),
                      "last_tokens_per_second": round(self.last_tokens_per_second, 1),
                      "rss_mb": round(diag.process_rss_bytes() / 2**20, 1)}
        name = f"{self.get_fully_qualified_name()}: requests"
        if depth >= cfg.queue_size:
            return diag.status(name, diag.WARN, f"queue full ({depth} waiting)", values)
        return diag.status(name, diag.OK, f"{depth} waiting", values)

    def _camera_status(self, feed: CameraFeed, now_ns: int):
        frame = feed.latest()
        values = {"topic": feed.topic, "transport": feed.transport, "frames_received": feed.count,
                  "rate_hz": round(feed.rate_hz(), 2)}
        name = f"{self.get_fully_qualified_name()}: camera {feed.name}"
        if frame is None:
            return diag.status(name, diag.WARN, "no frame received yet", values)
        age = frame.age_s(now_ns)
        values["frame_age_s"] = round(age, 3)
        bound = self.config.max_frame_age_s
        if bound >= 0 and age > bound:
            return diag.status(name, diag.WARN, f"stale: newest frame {age:.1f} s old", values)
        return diag.status(name, diag.OK, f"{values['rate_hz']:g} Hz", values)

    # --- shutdown ----------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the worker (the running request ends at its next token)."""
        self.worker.stop()


def init_ros(args=None) -> None:
    """rclpy.init without rclpy's signal handlers: Ctrl-C (SIGINT) and SIGTERM raise KeyboardInterrupt
    in main(), which ends the requests in flight while ROS can still answer them, then shuts down."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        from rclpy.signals import SignalHandlerOptions

        rclpy.init(args=args, signal_handler_options=SignalHandlerOptions.NO)
    except (ImportError, TypeError):  # an rclpy without the option: its handler shuts the context down
        rclpy.init(args=args)


def main(args=None) -> int:
    init_ros(args)
    node = executor = None
    code = 0
    try:
        node = OmniVisionNode()
        executor = MultiThreadedExecutor(num_threads=node.executor_threads)
        executor.add_node(node)
        # spin_once with a timeout, so KeyboardInterrupt is raised within 0.1 s of a signal.
        while rclpy.ok():
            executor.spin_once(timeout_sec=0.1)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    except _PARAMETER_ERRORS as exc:  # bad parameters: say which and exit
        print(f"{NODE_NAME}: error: {exc}", file=sys.stderr)
        code = 2
    finally:
        if node is not None:
            node.close()  # ends running and queued requests, so no callback stays blocked
        if executor is not None:
            executor.shutdown(timeout_sec=5.0)
        if node is not None:
            node.destroy_node()
        rclpy.try_shutdown()
    return code


if __name__ == "__main__":
    sys.exit(main())
