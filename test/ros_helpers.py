"""Helpers of test_node.py: omnivision_node as a subprocess, and a client that talks to it over DDS."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml
from diagnostic_msgs.msg import DiagnosticArray
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import CompressedImage, Image

from omnivision_interfaces.action import Query
from omnivision_interfaces.msg import SceneDescription
from omnivision_interfaces.srv import Ask, Describe
from omnivision_ros.ros.client import BackgroundNode

ROOT = Path(__file__).resolve().parents[1]
SHUTDOWN_S = 15.0


class NodeProcess:
    """`python -m omnivision_ros.node` in namespace `namespace` with the given parameters, logging to a file."""

    def __init__(self, namespace: str, log_dir: Path, params: dict | None = None,
                 params_file: Path | None = None, overrides: dict | None = None):
        self.namespace = namespace
        self.name = f"{namespace}/omnivision_node"
        self.log_path = log_dir / f"{namespace.strip('/')}.log"
        cmd = [sys.executable, "-m", "omnivision_ros.node", "--ros-args", "-r", f"__ns:={namespace}"]
        if params is not None:
            path = log_dir / f"{namespace.strip('/')}.yaml"
            path.write_text(yaml.safe_dump({"/**/omnivision_node": {"ros__parameters": params}}))
            cmd += ["--params-file", str(path)]
        if params_file is not None:
            cmd += ["--params-file", str(params_file)]
        for key, value in (overrides or {}).items():
            cmd += ["-p", f"{key}:={value}"]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)

    def log_tail(self, lines: int = 40) -> str:
        text = self.log_path.read_text(errors="replace").splitlines()
        return f"--- last lines of {self.log_path} ---\n" + "\n".join(text[-lines:])

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> int:
        """SIGINT (as Ctrl-C) and wait; the exit code (-9 when it had to be killed)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(SHUTDOWN_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


class Client:
    """Service/action clients of one node, camera publishers, and collected topic messages."""

    def __init__(self, ros: BackgroundNode, node: NodeProcess):
        self.ros = ros
        self.node = node
        n = ros.node
        self.ask_client = n.create_client(Ask, f"{node.name}/ask")
        self.describe_client = n.create_client(Describe, f"{node.name}/describe")
        self.query_client = ros.action_client(Query, f"{node.name}/query")
        self.publishers = {}
        self.descriptions: list[SceneDescription] = []
        self._lock = threading.Lock()
        n.create_subscription(SceneDescription, f"{node.name}/scene_description", self._description, 10)

    def _description(self, msg) -> None:
        with self._lock:
            self.descriptions.append(msg)

    def ask(self, question: str, camera: str = "", max_age_s: float = 0.0, max_new_tokens: int = 0,
            timeout_s: float = 30.0):
        request = Ask.Request(camera=camera, question=question, max_age_s=max_age_s, max_new_tokens=max_new_tokens)
        return self.ros.call(self.ask_client, request, timeout_s)

    def ask_async(self, question: str, camera: str = "", max_new_tokens: int = 0):
        request = Ask.Request(camera=camera, question=question, max_age_s=-1.0, max_new_tokens=max_new_tokens)
        return self.ask_client.call_async(request)

    def describe(self, camera: str = "", max_age_s: float = 0.0, max_new_tokens: int = 0, timeout_s: float = 30.0):
        request = Describe.Request(camera=camera, max_age_s=max_age_s, max_new_tokens=max_new_tokens)
        return self.ros.call(self.describe_client, request, timeout_s)

    def publisher(self, topic: str, msg_type=Image):
        if topic not in self.publishers:
            self.publishers[topic] = self.ros.node.create_publisher(msg_type, topic, qos_profile_sensor_data)
        return self.publishers[topic]

    def put_frame(self, camera: str, topic: str, msg, timeout_s: float = 10.0) -> None:
        """Publish `msg` until the node holds it as the newest frame of `camera`.

        Probes with an empty question: the node checks the frame before the question and
        answers without running the model, with the header of the frame it holds."""
        pub = self.publisher(topic, CompressedImage if isinstance(msg, CompressedImage) else Image)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            pub.publish(msg)
            time.sleep(0.02)
            probe = self.ask("", camera=camera, max_age_s=-1.0, timeout_s=5.0)
            if probe.header == msg.header:
                return
        raise TimeoutError(f"the node did not receive the frame on {topic} within {timeout_s:g} s\n"
                           + self.node.log_tail())


class Diagnostics:
    """Collects /diagnostics status entries by name (the newest of each)."""

    def __init__(self, ros: BackgroundNode):
        self.ros = ros
        self.latest: dict[str, object] = {}
        self._lock = threading.Lock()
        ros.node.create_subscription(DiagnosticArray, "/diagnostics", self._callback, 10)

    def _callback(self, msg) -> None:
        with self._lock:
            for status in msg.status:
                self.latest[status.name] = status

    def get(self, name: str):
        with self._lock:
            return self.latest.get(name)

    def wait(self, name: str, predicate, timeout_s: float, node: NodeProcess | None = None):
        try:
            return self.ros.wait_for(lambda: (s := self.get(name)) is not None and predicate(s) and s,
                                     timeout_s, f"diagnostics '{name}'")
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}; last: {self.get(name)}\n" + (node.log_tail() if node else "")) from None


def values(status) -> dict[str, str]:
    return {kv.key: kv.value for kv in status.values}


class DecisionsClient(Client):
    """Client plus Check, Choose and the watch services of one node, and its watch topics collected."""

    def __init__(self, ros: BackgroundNode, node: NodeProcess):
        super().__init__(ros, node)
        from omnivision_interfaces.msg import WatchEvent, WatchState
        from omnivision_interfaces.srv import AddWatch, Check, Choose, RemoveWatch

        self.types = {"check": Check, "choose": Choose, "add_watch": AddWatch, "remove_watch": RemoveWatch}
        self.clients = {name: ros.node.create_client(t, f"{node.name}/{name}") for name, t in self.types.items()}
        self.states: list = []
        self.events: list = []
        ros.node.create_subscription(WatchState, f"{node.name}/watch_states", self._collect(self.states), 50)
        ros.node.create_subscription(WatchEvent, f"{node.name}/watch_events", self._collect(self.events), 50)

    def _collect(self, into: list):
        def callback(msg) -> None:
            with self._lock:
                into.append(msg)
        return callback

    def call(self, service: str, timeout_s: float = 30.0, **fields):
        return self.ros.call(self.clients[service], self.types[service].Request(**fields), timeout_s)

    def check(self, question: str, camera: str = "", threshold: float = 0.0, max_age_s: float = -1.0):
        return self.call("check", camera=camera, question=question, threshold=threshold, max_age_s=max_age_s)

    def choose(self, question: str, options: list[str], camera: str = "", max_age_s: float = -1.0):
        return self.call("choose", camera=camera, question=question, options=options, max_age_s=max_age_s)

    def watch_messages(self, kind: str, name: str) -> list:
        with self._lock:
            return [m for m in (self.states if kind == "states" else self.events) if m.name == name]
