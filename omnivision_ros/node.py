"""omnivision_node: camera topics in; VQA answers, yes/no decisions, choices, standing watches, scene
descriptions and diagnostics out.

A thin adapter (STYLE 3, 6) on one SingleThreadedExecutor thread: camera callbacks store the
newest message per camera; the services and the action are coroutines that hand their request
to omnivision_ros.orchestration and await its reply, so no executor thread ever blocks and
receiving frames costs little. The inference worker hands replies and streamed text back to
the executor thread with `call_soon` (a guard condition).

    python -m omnivision_ros.node --ros-args --params-file config/omnivision.yaml -p model:=engines/tiny
    ros2 run omnivision_ros omnivision_node --ros-args -p model:=/path/to/bundle
"""
from __future__ import annotations

import functools
import signal
import sys

import rclpy
import rclpy.exceptions
from diagnostic_msgs.msg import DiagnosticArray
from rclpy.action import ActionServer, CancelResponse, GoalResponse
from rclpy.callback_groups import ReentrantCallbackGroup
from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node
from rclpy.qos import qos_profile_sensor_data
from rclpy.qos_overriding_options import QoSOverridingOptions
from rclpy.task import Future
from sensor_msgs.msg import CompressedImage, Image

from omnivision_interfaces.action import Query
from omnivision_interfaces.msg import SceneDescription, WatchEvent, WatchState
from omnivision_interfaces.srv import AddWatch, Ask, Check, Choose, Describe, RemoveWatch
from omnivision_ros.errors import OmniVisionError
from omnivision_ros.orchestration import Orchestrator, Reply, Request
from omnivision_ros.ros import diagnostics
from omnivision_ros.ros.frames import CameraFeed
from omnivision_ros.ros.params import NodeConfig, declare_and_read
from omnivision_ros.ros.spinning import CallSoon, Spinner, init_ros
from omnivision_ros.watches import TICK_S, Watches, WatchEvaluation, WatchSpec
from omnivision_ros.worker import CANCELLED

NODE_NAME = "omnivision_node"
# Bad parameter values or types (the names differ between rclpy releases).
_PARAMETER_ERRORS = (OmniVisionError,) + tuple(
    getattr(rclpy.exceptions, name) for name in
    ("ParameterException", "InvalidParameterTypeException", "InvalidParameterValueException")
    if hasattr(rclpy.exceptions, name))


class OmniVisionNode(Node):
    def __init__(self, **kwargs):
        super().__init__(NODE_NAME, **kwargs)
        self.config: NodeConfig = declare_and_read(self)
        cfg = self.config
        # Coroutine callbacks hold their callback group until they return: in the node's default
        # (mutually exclusive) group one waiting request would block every other callback.
        self.request_group = ReentrantCallbackGroup()
        self.call_soon = CallSoon(self, self.request_group)

        self.feeds: dict[str, CameraFeed] = {}
        self.camera_subscriptions = []
        for camera in cfg.cameras:
            feed = CameraFeed(camera.name, camera.topic, camera.transport)
            # Sensor-data QoS unless qos_overrides.<topic>.subscription.reliability|depth|history say otherwise.
            subscription = self.create_subscription(
                CompressedImage if camera.transport == "compressed" else Image, camera.topic,
                functools.partial(self.image_callback, feed), qos_profile_sensor_data,
                qos_overriding_options=QoSOverridingOptions.with_default_policies())
            feed.topic = subscription.topic_name  # resolved: namespace and remappings applied
            self.feeds[camera.name] = feed
            self.camera_subscriptions.append(subscription)

        self.orchestrator = Orchestrator(cfg, self.feeds, lambda: self.get_clock().now().nanoseconds,
                                         self.get_logger())
        self.goal_jobs = {}  # goal id -> job of a running Query goal, for cancel
        self.ask_service = self.create_service(Ask, "~/ask", self.ask_callback, callback_group=self.request_group)
        self.describe_service = self.create_service(
            Describe, "~/describe", self.describe_callback, callback_group=self.request_group)
        self.check_service = self.create_service(Check, "~/check", self.check_callback, callback_group=self.request_group)
        self.choose_service = self.create_service(Choose, "~/choose", self.choose_callback,
                                                  callback_group=self.request_group)
        self.query_server = ActionServer(
            self, Query, "~/query", execute_callback=self.query_execute_callback, callback_group=self.request_group,
            goal_callback=self.query_goal_callback, cancel_callback=self.query_cancel_callback)
        self.description_publisher = self.create_publisher(SceneDescription, "~/scene_description", 10)
        self.diagnostics_publisher = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self.diagnostics_timer = self.create_timer(1.0, self.diagnostics_callback)
        self.describe_timer = None
        if cfg.describe_rate_hz > 0:
            self.describe_timer = self.create_timer(1.0 / cfg.describe_rate_hz, self.describe_timer_callback)
        self.watches = Watches(self.orchestrator, lambda done: self.call_soon(self._publish_watches, done),
                               self.get_logger())
        self.watch_state_publisher = self.create_publisher(WatchState, "~/watch_states", 10)
        self.watch_event_publisher = self.create_publisher(WatchEvent, "~/watch_events", 10)
        self.add_watch_service = self.create_service(AddWatch, "~/add_watch", self.add_watch_callback)
        self.remove_watch_service = self.create_service(RemoveWatch, "~/remove_watch", self.remove_watch_callback)
        self.watch_timer = None  # created with the first watch
        self._log_start()
        for spec in cfg.watches:
            self._add_watch(spec)
        self.orchestrator.start()  # loads the model in the background

    def _add_watch(self, spec: WatchSpec) -> None:
        self.watches.add(spec)
        if self.watch_timer is None:
            self.watch_timer = self.create_timer(TICK_S, self.watch_timer_callback)

    def _log_start(self) -> None:
        cfg, log = self.config, self.get_logger()
        log.info(f"model '{cfg.model}', backend '{cfg.backend}', threads {cfg.threads or 'default'}: "
                 "loading in the background")
        for subscription, (name, feed) in zip(self.camera_subscriptions, self.feeds.items()):
            kind = "CompressedImage" if feed.transport == "compressed" else "Image"
            default = " (default)" if name == cfg.default_camera else ""
            qos = subscription.qos_profile
            log.info(f"camera '{name}'{default}: {feed.topic} (sensor_msgs/{kind}, {qos.reliability.name.lower()} "
                     f"depth {qos.depth}, newest frame only)")
        rate = f"at {cfg.describe_rate_hz:g} Hz per camera" if cfg.describe_rate_hz > 0 else "off (describe_rate_hz 0)"
        base = self.get_fully_qualified_name()
        log.info(f"services {base}/ask, /describe, /check, /choose, /add_watch, /remove_watch, action {base}/query; "
                 f"scene descriptions {rate}; queue {cfg.queue_size}, request timeout {cfg.request_timeout_s or 'none'} s")

    async def _reply(self, request: Request, on_text=None, goal_id: bytes | None = None) -> Reply:
        """Hand a request to the orchestrator and wait (without blocking the executor) for its reply."""
        replied = Future()
        job = self.orchestrator.submit(request, lambda reply: self.call_soon(replied.set_result, reply), on_text)
        if goal_id is not None and job is not None:
            self.goal_jobs[goal_id] = job
        try:
            return await replied
        finally:
            self.goal_jobs.pop(goal_id, None)

    # --- callbacks ---------------------------------------------------------------------------

    def image_callback(self, feed: CameraFeed, msg) -> None:
        # Keep only the newest frame; decoding waits until a request needs it.
        feed.store(msg, self.get_clock().now().nanoseconds)

    async def ask_callback(self, request, response):
        return (await self._reply(Request("ask", request.camera, request.question, request.max_age_s,
                                          request.max_new_tokens))).fill(response)

    async def describe_callback(self, request, response):
        return (await self._reply(Request("describe", request.camera, self.config.describe_prompt,
                                          request.max_age_s, request.max_new_tokens))).fill(response)

    async def check_callback(self, request, response):
        replied = Future()
        self.orchestrator.submit_check(Request("check", request.camera, request.question, request.max_age_s),
                                       request.threshold, lambda reply: self.call_soon(replied.set_result, reply))
        return (await replied).fill_check(response)

    async def choose_callback(self, request, response):
        replied = Future()
        self.orchestrator.submit_choose(Request("choose", request.camera, request.question, request.max_age_s),
                                        request.options, lambda reply: self.call_soon(replied.set_result, reply))
        return (await replied).fill_choose(response)

    def add_watch_callback(self, request, response):
        spec = WatchSpec(request.name, request.camera, request.question, request.rate_hz, request.on_threshold,
                         request.off_threshold, request.min_frames)
        try:
            self._add_watch(spec)
            response.success = True
        except OmniVisionError as exc:
            self.get_logger().warning(f"add_watch refused: {exc}")
            response.success, response.error = False, str(exc)
        return response

    def remove_watch_callback(self, request, response):
        try:
            self.watches.remove(request.name)
            response.success = True
        except OmniVisionError as exc:
            response.success, response.error = False, str(exc)
        return response

    def query_goal_callback(self, goal_request) -> GoalResponse:
        # Accept every goal: a refused goal carries no reason; a bad one ends aborted with its error.
        return GoalResponse.ACCEPT

    def query_cancel_callback(self, goal_handle) -> CancelResponse:
        job = self.goal_jobs.get(bytes(goal_handle.goal_id.uuid))
        if job is not None:
            self.orchestrator.cancel(job)  # generation stops at the next token
        return CancelResponse.ACCEPT

    async def query_execute_callback(self, goal_handle):
        goal = goal_handle.request
        if goal_handle.is_cancel_requested:  # canceled before it started
            goal_handle.canceled()
            camera = goal.camera or self.config.default_camera
            return Reply(False, "canceled before it started", camera, CANCELLED).fill(Query.Result())

        def feedback(text: str, delta: str, tokens: int) -> None:  # worker thread, once per token
            self.call_soon(goal_handle.publish_feedback, Query.Feedback(text=text, delta=delta, tokens=tokens))

        reply = await self._reply(Request("query", goal.camera, goal.question, goal.max_age_s, goal.max_new_tokens),
                                  feedback, bytes(goal_handle.goal_id.uuid))
        if reply.success:
            goal_handle.succeed()
        elif reply.state == CANCELLED and goal_handle.is_cancel_requested:
            goal_handle.canceled()
        else:
            goal_handle.abort()
        return reply.fill(Query.Result())

    def describe_timer_callback(self) -> None:
        self.orchestrator.describe_new_frames(lambda reply: self.call_soon(self._publish_description, reply))

    def _publish_description(self, reply: Reply) -> None:
        if not reply.success:
            self.get_logger().warning(f"scene description of camera '{reply.camera}' failed: {reply.error}",
                                      throttle_duration_sec=10.0)
            return
        msg = SceneDescription(header=reply.header, camera=reply.camera, text=reply.answer)
        reply.fill_timing(msg.timing)
        self.description_publisher.publish(msg)

    def watch_timer_callback(self) -> None:
        self.watches.tick()

    def _publish_watches(self, evaluations: list[WatchEvaluation]) -> None:
        for e in evaluations:
            state = WatchState(header=e.header, name=e.name, camera=e.camera, probability=e.probability,
                               yes_no_mass=e.yes_no_mass, state=e.state)
            Reply(True, "", e.camera, timing=e.timing).fill_timing(state.timing)
            self.watch_state_publisher.publish(state)
            if e.flipped:
                self.watch_event_publisher.publish(WatchEvent(
                    header=e.header, name=e.name, camera=e.camera, probability=e.probability,
                    yes_no_mass=e.yes_no_mass, state=e.state, previous_state=e.previous_state, timing=state.timing))

    def diagnostics_callback(self) -> None:
        now = self.get_clock().now()
        self.diagnostics_publisher.publish(diagnostics.report(self.get_fully_qualified_name(), self.orchestrator,
                                                              now.to_msg(), now.nanoseconds, self.watches.snapshot()))

    def close(self, timeout_s: float = 5.0) -> None:
        """End every request (queued ones now, the running one at its next token) and give the
        executor, still spinning, up to `timeout_s` to send their answers."""
        self.orchestrator.close()
        self.call_soon.flush(timeout_s)


def main(args=None) -> int:
    init_ros(args)
    node = None
    spinner = Spinner(SingleThreadedExecutor())
    code = 0
    try:
        node = OmniVisionNode()
        spinner.executor.add_node(node)
        spinner.wait()  # until Ctrl-C / SIGTERM (KeyboardInterrupt)
    except KeyboardInterrupt:
        pass
    except _PARAMETER_ERRORS as exc:  # bad parameters: say which and exit
        print(f"{NODE_NAME}: error: {exc}", file=sys.stderr)
        code = 2
    finally:
        # Shutting down takes at most ~15 s (bounded waits below); a second Ctrl-C must not cut it short.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if node is not None:
            node.close(5.0 if spinner.spinning else 0.0)
        spinner.stop()
        if node is not None:
            node.destroy_node()
        rclpy.try_shutdown()
    return code


if __name__ == "__main__":
    sys.exit(main())
