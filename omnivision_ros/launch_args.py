"""The arguments of launch/vlm.launch.py turned into node parameters and options.

Plain Python (no launch, no rclpy), so the launch file stays declarative and this is tested on
its own. An empty argument leaves the value of the parameter file in force.
"""
from __future__ import annotations


from omnivision_ros.errors import OmniVisionError, check_name
from omnivision_ros.model.variants import PRECISIONS
from omnivision_ros.ros.frames import TRANSPORTS
from omnivision_ros.runtime.backend import BACKENDS

LOG_LEVELS = ("debug", "info", "warn", "error", "fatal")
_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def parse_cameras(text: str) -> dict:
    """`NAME=TOPIC[:TRANSPORT],...` -> camera parameters of the node.

    The transport is `compressed` for a topic ending in `/compressed` (image_transport's naming),
    else `raw`, unless given after a colon (ROS topic names cannot hold one). The first camera
    becomes the default camera."""
    cameras: dict[str, dict[str, str]] = {}
    for entry in (part.strip() for part in text.split(",")):
        if not entry:
            continue
        name, sep, topic = entry.partition("=")
        name, topic = name.strip(), topic.strip()
        if not sep or not name or not topic:
            raise OmniVisionError(f"cameras: '{entry}' is not NAME=TOPIC (e.g. front=/front/image_raw)")
        check_name("cameras: camera name", name)
        if name in cameras:
            raise OmniVisionError(f"cameras: camera '{name}' is given twice")
        topic, sep, transport = topic.partition(":")
        if not sep:
            transport = "compressed" if topic.endswith("/compressed") else "raw"
        if transport not in TRANSPORTS:
            raise OmniVisionError(f"cameras: transport '{transport}' of camera '{name}'; choose raw or compressed")
        cameras[name] = {"topic": topic, "transport": transport}
    if not cameras:
        raise OmniVisionError("cameras: no camera given (e.g. front=/front/image_raw,back=/back/image_raw/compressed)")
    return {"camera_names": list(cameras), "default_camera": next(iter(cameras)), "cameras": cameras}


def parameter_overrides(model: str = "", precision: str = "", backend: str = "", cameras: str = "") -> dict:
    """Node parameters set by launch arguments; empty arguments are left out."""
    overrides: dict = {}
    if model.strip():
        overrides["model"] = model.strip()
    if precision.strip():
        if precision.strip() not in PRECISIONS:
            raise OmniVisionError(f"precision '{precision}'; choose one of {', '.join(PRECISIONS)}")
        overrides["precision"] = precision.strip()
    if backend.strip():
        if backend.strip() not in BACKENDS:
            raise OmniVisionError(f"backend '{backend}'; choose one of {', '.join(BACKENDS)}")
        overrides["backend"] = backend.strip()
    if cameras.strip():
        overrides.update(parse_cameras(cameras))
    return overrides


def parse_bool(name: str, text: str) -> bool:
    value = text.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise OmniVisionError(f"{name} is '{text}'; use true or false")


def check_log_level(text: str) -> str:
    value = text.strip().lower()
    if value not in LOG_LEVELS:
        raise OmniVisionError(f"log_level '{text}'; choose one of {', '.join(LOG_LEVELS)}")
    return value
