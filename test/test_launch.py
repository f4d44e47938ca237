"""The package as a user runs it: built with colcon into an install prefix, its local_setup.bash
sourced over the environment's ROS 2, then `ros2 launch omnivision_ros vlm.launch.py ...`,
`ros2 param`, `ros2 service call`, `ros2 action send_goal --feedback`, `ros2 topic echo` and
Ctrl-C, each a subprocess with a deadline, over real DDS (domain and discovery range from
conftest.py).

The `ros2` command comes from the venv (scripts/setup.sh installs it from ../shared/ros2cli when
that folder exists) or from a sourced ROS 2; where neither provides it the CLI tests skip and
say so. The launch-argument parsing and the torch-free start from the shipped config are tested
everywhere.
"""
from __future__ import annotations

import ast
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from omnivision_ros.errors import OmniVisionError
from omnivision_ros.launch_args import check_log_level, parameter_overrides, parse_bool, parse_cameras

ROOT = Path(__file__).resolve().parents[1]
LAUNCH_FILE = ROOT / "launch" / "vlm.launch.py"
SHIPPED_CONFIG = ROOT / "config" / "omnivision.yaml"
DEADLINE_S = 60.0
CLI_S = 30.0
LAUNCH_ARGUMENTS = {"model", "precision", "backend", "camera_topic", "cameras", "namespace", "params_file",
                    "log_level", "respawn", "respawn_delay", "dds_profile"}
# A Fast DDS profile that changes nothing about the transports (the test's own participants have no
# profile): dds_profile is checked to reach the node's environment without changing discovery.
NEUTRAL_PROFILE = """<?xml version="1.0" encoding="UTF-8" ?>
<dds xmlns="http://www.eprosima.com">
  <profiles>
    <participant profile_name="omnivision_launch_test" is_default_profile="true"><rtps/></participant>
  </profiles>
</dds>
"""
HEAVY_MODULES = ("torch", "transformers")


# --- launch arguments (no ROS) -----------------------------------------------------------------


def test_cameras_argument():
    parsed = parse_cameras("front=/front/image_raw, back=/back/image_raw/compressed,side=/side/jpeg:compressed")
    assert parsed == {
        "camera_names": ["front", "back", "side"],
        "default_camera": "front",
        "cameras": {"front": {"topic": "/front/image_raw", "transport": "raw"},
                    "back": {"topic": "/back/image_raw/compressed", "transport": "compressed"},
                    "side": {"topic": "/side/jpeg", "transport": "compressed"}},
    }
    assert parse_cameras("cam=image:raw")["cameras"]["cam"] == {"topic": "image", "transport": "raw"}


@pytest.mark.parametrize("text, message", [
    ("front", "not NAME=TOPIC"),
    ("=/x", "not NAME=TOPIC"),
    ("front=", "not NAME=TOPIC"),
    ("front-left=/x", "letters, digits and underscores"),
    ("a=/x,a=/y", "given twice"),
    ("a=/x:jpeg", "transport 'jpeg'"),
    (" , ", "no camera given"),
])
def test_bad_cameras_argument(text, message):
    with pytest.raises(OmniVisionError, match=message):
        parse_cameras(text)


def test_empty_arguments_keep_the_params_file():
    assert parameter_overrides() == {}
    assert parameter_overrides(model=" /m ", precision="int8", backend="onnxruntime") == {
        "model": "/m", "precision": "int8", "backend": "onnxruntime"}
    with pytest.raises(OmniVisionError, match="precision 'int3'"):
        parameter_overrides(precision="int3")
    with pytest.raises(OmniVisionError, match="backend 'cuda'"):
        parameter_overrides(backend="cuda")


def test_bool_and_log_level_arguments():
    assert parse_bool("respawn", "True") is True and parse_bool("respawn", "0") is False
    with pytest.raises(OmniVisionError, match="respawn is 'maybe'"):
        parse_bool("respawn", "maybe")
    assert check_log_level("WARN") == "warn"
    with pytest.raises(OmniVisionError, match="log_level 'loud'"):
        check_log_level("loud")


def test_launch_file_declares_the_documented_arguments():
    tree = ast.parse(LAUNCH_FILE.read_text())
    table = next(node.value for node in tree.body
                 if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "ARGUMENTS")
    assert {entry.elts[0].value for entry in table.elts} == LAUNCH_ARGUMENTS
    readme = (ROOT / "docs" / "node.md").read_text()
    for name in LAUNCH_ARGUMENTS:
        assert f"`{name}`" in readme, f"docs/node.md does not document the launch argument {name}"


# --- the node from the shipped config, without the CLI -------------------------------------------


def imported_modules(lines: list[str]) -> set[str]:
    """Module names from `python -X importtime` lines ('import time: self | cumulative | module')."""
    names = set()
    for line in lines:
        _, sep, rest = line.partition("import time:")
        if sep and "|" in rest:
            names.add(rest.rsplit("|", 1)[1].strip())
    return names


def assert_no_heavy_imports(lines: list[str], where: str) -> None:
    modules = imported_modules(lines)
    # The import log is really there: the node's own modules are in it.
    assert {"rclpy", "omnivision_ros.ros.params"} <= modules, f"{where}: no import log of the node process"
    heavy = sorted(m for m in modules if m.split(".")[0] in HEAVY_MODULES)
    assert not heavy, f"{where} imported {heavy[:5]}"


def test_shipped_config_starts_without_torch_and_says_how_to_give_a_model(tmp_path):
    log_path = tmp_path / "node.log"
    cmd = [sys.executable, "-X", "importtime", "-m", "omnivision_ros.node", "--ros-args",
           "-r", "__ns:=/shipped", "--params-file", str(SHIPPED_CONFIG)]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                env=dict(os.environ, PYTHONUNBUFFERED="1", RCUTILS_COLORIZED_OUTPUT="0"))
    try:
        text = wait_for_text(log_path, "no model configured", DEADLINE_S, proc)
        assert "model:=/path/to/bundle" in text
    finally:
        code = interrupt(proc)
    assert code == 0, log_path.read_text()[-3000:]
    assert_no_heavy_imports(log_path.read_text().splitlines(), "the node started from config/omnivision.yaml")


def wait_for_text(path: Path, pattern: str, timeout_s: float, proc: subprocess.Popen | None = None,
                  count: int = 1) -> str:
    """The file's text once `pattern` (a regular expression) occurs `count` times in it."""
    deadline = time.monotonic() + timeout_s
    while True:
        text = path.read_text(errors="replace")
        if len(re.findall(pattern, text)) >= count:
            return text
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"exited with {proc.returncode} before '{pattern}':\n{text[-4000:]}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"'{pattern}' not within {timeout_s:g} s in {path}:\n{text[-4000:]}")
        time.sleep(0.1)


def interrupt(proc: subprocess.Popen, timeout_s: float = 20.0) -> int:
    """SIGINT (Ctrl-C) and wait; -9 when it had to be killed."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            return -9
    return proc.returncode


# --- the ROS 2 CLI ---------------------------------------------------------------------------------


class Workspace:
    """The package built by colcon into an install prefix, and commands run the way a user runs
    them: `source <underlay>/local_setup.bash; source install/local_setup.bash; ros2 ...`."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        bin_dir = str(Path(sys.executable).parent)
        self.env = dict(os.environ, PATH=bin_dir + os.pathsep + os.environ.get("PATH", ""), PYTHONUNBUFFERED="1",
                        RCUTILS_COLORIZED_OUTPUT="0", ROS_LOG_DIR=str(tmp / "ros_log"))
        if not os.environ.get("ROS_DISTRO"):
            # The ROS 2 wheels in the venv are the underlay, as /opt/ros/<distro> is on an install.
            self.env["AMENT_PREFIX_PATH"] = sys.prefix
            self.env["CMAKE_PREFIX_PATH"] = sys.prefix
        self.ros2 = shutil.which("ros2", path=self.env["PATH"])
        colcon = shutil.which("colcon", path=self.env["PATH"])
        if self.ros2 is None or colcon is None:
            missing = "ros2" if self.ros2 is None else "colcon"
            pytest.skip(f"the ROS 2 command-line tools are not installed ({missing} not found): scripts/setup.sh "
                        "installs them when ../shared/ros2cli exists, or source a ROS 2 install")
        import omnivision_interfaces

        # <prefix>/omnivision_interfaces/lib/pythonX.Y/site-packages/omnivision_interfaces/__init__.py
        interfaces_prefix = Path(omnivision_interfaces.__file__).resolve().parents[5]
        self.sources = [interfaces_prefix / "local_setup.bash"]
        if not self.sources[0].is_file():
            pytest.skip(f"omnivision_interfaces was not built by colcon ({self.sources[0]} is missing)")
        result = subprocess.run(
            [colcon, "--log-base", str(tmp / "log"), "build", "--paths", str(ROOT),
             "--build-base", str(tmp / "build"), "--install-base", str(tmp / "install"),
             "--event-handlers", "console_direct-", "desktop_notification-", "status-", "terminal_title-"],
            env=self.env, capture_output=True, text=True, timeout=120, cwd=tmp)
        assert result.returncode == 0, f"colcon build failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        self.sources.append(tmp / "install" / "local_setup.bash")

    def command(self, args: list[str]) -> list[str]:
        script = 'for f in "${@:1:$N}"; do source "$f" || exit 97; done; shift $N; exec "$@"'
        return ["bash", "-c", script.replace("$N", str(len(self.sources))), "bash",
                *map(str, self.sources), *args]

    def run(self, args: list[str], timeout_s: float = CLI_S, env: dict | None = None) -> str:
        """Run a command to its end; its output (stdout + stderr). Fails on a non-zero exit or the deadline."""
        try:
            result = subprocess.run(self.command(args), env=env or self.env, capture_output=True, text=True,
                                    timeout=timeout_s)
        except subprocess.TimeoutExpired as exc:
            raise AssertionError(f"{' '.join(args)}: no end within {timeout_s:g} s\n{exc.stdout}\n{exc.stderr}") from None
        output = result.stdout + result.stderr
        assert result.returncode == 0, f"{' '.join(args)} exited with {result.returncode}:\n{output[-4000:]}"
        return output

    def launch(self, name: str, arguments: dict[str, str], importtime: bool = True) -> "Launch":
        env = dict(self.env, PYTHONPROFILEIMPORTTIME="1") if importtime else self.env
        args = ["ros2", "launch", "omnivision_ros", "vlm.launch.py", *(f"{k}:={v}" for k, v in arguments.items())]
        return Launch(self.tmp / f"{name}.log", self.command(args), env)


class Launch:
    """A running `ros2 launch`, its output in a file."""

    def __init__(self, log_path: Path, cmd: list[str], env: dict):
        self.log_path = log_path
        with open(log_path, "w") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)

    def text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for(self, pattern: str, timeout_s: float = DEADLINE_S, count: int = 1) -> str:
        return wait_for_text(self.log_path, pattern, timeout_s, self.proc, count)

    def node_lines(self) -> list[str]:
        """What the node process wrote (launch prefixes it with the process name)."""
        return [line.split("] ", 1)[1] for line in self.text().splitlines() if line.startswith("[omnivision_node-1] ")]

    def node_pids(self) -> list[int]:
        return [int(p) for p in re.findall(r"\[omnivision_node-1\]: process started with pid \[(\d+)\]", self.text())]

    def stop(self) -> int:
        return interrupt(self.proc)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return Workspace(tmp_path_factory.mktemp("colcon_ws"))


def test_show_args_lists_every_argument(workspace):
    output = workspace.run(["ros2", "launch", "omnivision_ros", "vlm.launch.py", "--show-args"])
    for name in LAUNCH_ARGUMENTS:
        assert f"'{name}':" in output, output


class TestShippedConfig:
    """`ros2 launch omnivision_ros vlm.launch.py` with the shipped config: no model configured."""

    NAMESPACE = "/lt_shipped"
    CAMERA_TOPIC = "/lt_shipped/elsewhere/image"

    @pytest.fixture(scope="class")
    @classmethod
    def launched(cls, workspace):
        launch = workspace.launch("shipped", {"namespace": cls.NAMESPACE, "camera_topic": cls.CAMERA_TOPIC,
                                              "log_level": "warn"})
        try:
            launch.wait_for("no model configured")
            yield launch
        finally:
            launch.stop()

    def test_log_says_how_to_give_a_model_at_the_chosen_level(self, launched):
        errors = [line for line in launched.node_lines() if "no model configured" in line]
        assert errors and "[ERROR]" in errors[0] and "model:=/path/to/bundle" in errors[0], errors
        # log_level:=warn reached the node: its start-up INFO lines are not there.
        assert not [line for line in launched.node_lines() if line.startswith("[INFO]")], launched.text()[-3000:]

    def test_diagnostics_say_it_and_camera_topic_is_remapped(self, workspace, launched):
        output = workspace.run(["ros2", "topic", "echo", "--no-daemon", "/diagnostics",
                                "diagnostic_msgs/msg/DiagnosticArray", "--once", "--full-length"])
        status = yaml.safe_load(output.split("---")[0])["status"]
        by_name = {s["name"]: s for s in status}
        model = by_name[f"{self.NAMESPACE}/omnivision_node: model"]
        assert "no model configured" in model["message"] and "model:=/path/to/bundle" in model["message"]
        camera = {kv["key"]: kv["value"] for kv in by_name[f"{self.NAMESPACE}/omnivision_node: camera camera"]["values"]}
        assert camera["topic"] == self.CAMERA_TOPIC

    def test_every_response_says_it(self, workspace, launched):
        output = workspace.run(["ros2", "service", "call", f"{self.NAMESPACE}/omnivision_node/ask",
                                "omnivision_interfaces/srv/Ask", "{question: 'Is the door open?'}"])
        assert "success=False" in output and "no model configured" in output and "model:=/path/to/bundle" in output

    def test_sigint_exits_cleanly_without_having_imported_torch(self, launched):
        assert launched.stop() == 0, launched.text()[-3000:]
        assert "process has finished cleanly" in launched.text()
        assert_no_heavy_imports(launched.node_lines(), "the node launched with the shipped config")


def picture(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)
    img[:48] = (30 * seed % 256, 200, 90)
    return img


def response_fields(output: str) -> dict:
    """The fields of the response `ros2 service call` prints as a Python expression
    (`pkg.srv.Ask_Response(success=True, answer='...', ...)`), scalars only."""
    line = next(line for line in output.splitlines() if "_Response(" in line)
    call = ast.parse(line.strip(), mode="eval").body
    fields = {}
    for keyword in call.keywords:
        try:
            fields[keyword.arg] = ast.literal_eval(keyword.value)
        except ValueError:  # a nested message
            fields[keyword.arg] = ast.unparse(keyword.value)
    return fields


class TestServing:
    """`ros2 launch` with every argument set, serving the tiny bundle to the CLI."""

    NAMESPACE = "/lt"
    FRONT = "/lt/cams/front/image_raw"
    BACK = "/lt/cams/back/image_raw/compressed"
    MAX_NEW_TOKENS = 6

    @pytest.fixture(scope="class")
    @classmethod
    def params_file(cls, tmp_path_factory):
        path = tmp_path_factory.mktemp("params") / "robot.yaml"
        config = yaml.safe_load(SHIPPED_CONFIG.read_text())
        config["/**/omnivision_node"]["ros__parameters"].update(max_new_tokens=cls.MAX_NEW_TOKENS, max_frame_age_s=-1.0)
        path.write_text(yaml.safe_dump(config))
        return path

    @pytest.fixture(scope="class")
    @classmethod
    def cameras(cls):
        """Publishes a fixed picture on both camera topics (raw and JPEG) at 10 Hz."""
        from rclpy.qos import qos_profile_sensor_data
        from sensor_msgs.msg import CompressedImage, Image

        from omnivision_ros.ros.client import BackgroundNode, compressed_msg, image_msg

        ros = BackgroundNode("launch_test_cameras")
        front = ros.node.create_publisher(Image, cls.FRONT, qos_profile_sensor_data)
        back = ros.node.create_publisher(CompressedImage, cls.BACK, qos_profile_sensor_data)

        def publish():
            front.publish(image_msg(picture(1), ros.now(), "front"))
            back.publish(compressed_msg(picture(2), ros.now(), "back"))

        ros.node.create_timer(0.1, publish)
        yield ros
        ros.close()

    @pytest.fixture(scope="class")
    @classmethod
    def launched(cls, workspace, tiny_bundle, params_file, cameras):
        profile = params_file.parent / "neutral_profile.xml"
        profile.write_text(NEUTRAL_PROFILE)
        launch = workspace.launch("serving", {
            "model": str(tiny_bundle), "precision": "fp32", "backend": "onnxruntime",
            "cameras": f"front={cls.FRONT},back={cls.BACK}", "namespace": cls.NAMESPACE,
            "params_file": str(params_file), "log_level": "info", "respawn": "true", "respawn_delay": "0.5",
            "dds_profile": str(profile),
        })
        try:
            launch.wait_for("model ready")
            yield launch
        finally:
            launch.stop()

    def test_every_argument_reaches_the_node(self, workspace, launched, tiny_bundle, params_file):
        node = f"{self.NAMESPACE}/omnivision_node"
        output = workspace.run(["ros2", "param", "get", "--no-daemon", "--timeout", "10", node, "model"])
        assert output.strip() == f"String value is: {tiny_bundle}"
        dumped = yaml.safe_load(workspace.run(["ros2", "param", "dump", "--no-daemon", "--timeout", "10", node]))
        params = dumped[node]["ros__parameters"]
        assert (params["model"], params["precision"], params["backend"]) == (str(tiny_bundle), "fp32", "onnxruntime")
        assert params["camera_names"] == ["front", "back"] and params["default_camera"] == "front"
        assert params["cameras"] == {"front": {"topic": self.FRONT, "transport": "raw"},
                                     "back": {"topic": self.BACK, "transport": "compressed"}}
        assert params["max_new_tokens"] == self.MAX_NEW_TOKENS  # from params_file
        assert "backend: onnxruntime (requested)" in launched.text()
        # dds_profile reaches the node process's environment.
        pid = launched.node_pids()[-1]
        environ = dict(entry.split("=", 1) for entry in
                       Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in entry)
        profile_vars = {k: v for k, v in environ.items() if k.endswith("_DEFAULT_PROFILES_FILE")}
        assert profile_vars and set(profile_vars.values()) == {str(params_file.parent / "neutral_profile.xml")}

    def test_service_call_answers_about_the_camera_frame(self, workspace, launched, tiny_bundle):
        output = workspace.run(["ros2", "service", "call", f"{self.NAMESPACE}/omnivision_node/ask",
                                "omnivision_interfaces/srv/Ask",
                                "{camera: front, question: 'Is the door open?', max_age_s: -1.0}"])
        response = response_fields(output)
        assert response["success"] is True, output
        assert f"new_tokens={self.MAX_NEW_TOKENS}" in response["timing"] and "frame_id='front'" in response["header"]

        # The same bundle and picture here give the same answer.
        from omnivision_ros.runtime.factory import open_model
        from omnivision_ros.runtime.generator import GenerationConfig
        from omnivision_ros.runtime.pipeline import Pipeline

        pipeline = Pipeline(*open_model(str(tiny_bundle), "onnxruntime", precision="fp32"),
                            GenerationConfig(max_new_tokens=self.MAX_NEW_TOKENS))
        assert response["answer"] == pipeline.ask(picture(1), "Is the door open?").text

    def test_action_send_goal_streams_feedback(self, workspace, launched):
        output = workspace.run(["ros2", "action", "send_goal", "--feedback", f"{self.NAMESPACE}/omnivision_node/query",
                                "omnivision_interfaces/action/Query",
                                "{camera: back, question: 'What is there?', max_age_s: -1.0, max_new_tokens: 5}"])
        assert "Goal accepted" in output and "Goal finished with status: SUCCEEDED" in output, output
        # One feedback per token, in order (the client may drop the last ones when the result comes first).
        feedback = re.findall(r"^tokens: (\d+)$", output.split("Goal accepted")[1].split("Result:")[0], re.MULTILINE)
        assert feedback and [int(t) for t in feedback] == list(range(1, len(feedback) + 1)), output
        result = yaml.safe_load(output.split("Result:")[1].split("Goal finished")[0].strip())
        assert result["success"] is True and result["camera"] == "back" and result["header"]["frame_id"] == "back"
        assert result["timing"]["new_tokens"] == 5

    def test_check_and_choose_service_calls(self, workspace, launched):
        output = workspace.run(["ros2", "service", "call", f"{self.NAMESPACE}/omnivision_node/check",
                                "omnivision_interfaces/srv/Check",
                                "{camera: front, question: 'Is the door open?', max_age_s: -1.0}"])
        check = response_fields(output)
        assert check["success"] is True, output
        assert 0 < check["yes_no_mass"] <= 1 and check["answer"] == (check["probability"] >= 0.5)
        assert "frame_id='front'" in check["header"] and "new_tokens=0" in check["timing"]
        output = workspace.run(["ros2", "service", "call", f"{self.NAMESPACE}/omnivision_node/choose",
                                "omnivision_interfaces/srv/Choose",
                                "{camera: back, question: 'What state is the door in?', options: [open, closed, ajar], "
                                "max_age_s: -1.0}"])
        choose = response_fields(output)
        assert choose["success"] is True and choose["option"] in ("open", "closed", "ajar"), output
        assert choose["option"] == ("open", "closed", "ajar")[choose["index"]]

    def test_watch_added_and_echoed(self, workspace, launched):
        node = f"{self.NAMESPACE}/omnivision_node"
        output = workspace.run(["ros2", "service", "call", f"{node}/add_watch", "omnivision_interfaces/srv/AddWatch",
                                "{name: door_open, camera: front, question: 'Is the door open?', rate_hz: 2.0, "
                                "on_threshold: 0.6, off_threshold: 0.4, min_frames: 2}"])
        assert response_fields(output)["success"] is True, output
        output = workspace.run(["ros2", "topic", "echo", "--no-daemon", f"{node}/watch_states",
                                "omnivision_interfaces/msg/WatchState", "--once", "--full-length"])
        state = yaml.safe_load(output.split("---")[0])
        assert state["name"] == "door_open" and state["camera"] == "front" and state["header"]["frame_id"] == "front"
        assert 0 <= state["probability"] <= 1 and state["state"] in (True, False)
        output = workspace.run(["ros2", "service", "call", f"{node}/remove_watch", "omnivision_interfaces/srv/RemoveWatch",
                                "{name: door_open}"])
        assert response_fields(output)["success"] is True, output

    def test_respawn_restarts_a_killed_node(self, workspace, launched):
        (first,) = launched.node_pids()
        os.kill(first, signal.SIGKILL)
        launched.wait_for(r"\[omnivision_node-1\]: process started with pid", count=2)
        launched.wait_for("model ready", count=2)
        assert launched.node_pids()[1] != first
        output = workspace.run(["ros2", "param", "get", "--no-daemon", "--timeout", "10",
                                 f"{self.NAMESPACE}/omnivision_node", "precision"])
        assert output.strip() == "String value is: fp32"

    def test_sigint_exits_cleanly_without_having_imported_torch(self, launched):
        assert launched.stop() == 0, launched.text()[-3000:]
        assert "process has finished cleanly" in launched.text()
        # The bundle ran on ONNX Runtime: neither process of the node imported torch or transformers.
        assert_no_heavy_imports(launched.node_lines(), "the node serving a bundle")
