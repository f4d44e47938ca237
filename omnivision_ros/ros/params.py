"""The node's ROS parameters: declared with descriptions, read once into NodeConfig (STYLE 10).

Cameras are `camera_names` (a string array) plus `cameras.<name>.topic` and
`cameras.<name>.transport`, declared after the names are read: ROS parameters cannot hold a
list of dicts.
"""
from __future__ import annotations

from dataclasses import dataclass

from rcl_interfaces.msg import ParameterDescriptor

from omnivision_ros.errors import OmniVisionError
from omnivision_ros.model.prompt import TASKS
from omnivision_ros.ros.frames import TRANSPORTS
from omnivision_ros.runtime.backend import BACKENDS


# name, default, description (one line per parameter; config/omnivision.yaml documents each).
PARAMETERS = (
    ("model", "", "Model bundle directory (from omnivision-export), folder of GGUF files, or preset name "
                  "(tiny, omnivision-968m: random weights, torch backend); empty = none yet (the node "
                  "says how to give it one)."),
    ("backend", "auto", "Inference backend: auto (TensorRT when usable, else ONNX Runtime; torch for presets), "
                        "onnxruntime, tensorrt, torch."),
    ("threads", 0, "CPU threads for inference; 0 = the library default."),
    ("precision", "", "Bundle variant to run: fp32, fp16, int8, int4; empty = the backend's default "
                      "(int8 on the CPU when the bundle has it, else fp32; fp16 on a GPU)."),
    ("task", "vqa", "vqa: answer the question of each request; ocr: the OCR model's prompt, which reads the "
                    "image's text and has no question (requests' questions and describe_prompt are not used)."),
    ("lm_file", "", "Language-model file of a GGUF folder that holds several; empty = the F16 one of the first "
                    "release (Nano-Vlm-Processor-494M-F16.gguf)."),
    ("mmproj_file", "", "mmproj file of a GGUF folder that holds several; empty = the f16 one of the language "
                        "model's release."),
    ("camera_names", ["camera"], "Names of the cameras; each needs cameras.<name>.topic (and optionally "
                                 "cameras.<name>.transport)."),
    ("default_camera", "", "Camera used when a request leaves `camera` empty; empty = the first of camera_names."),
    ("describe_prompt", "Describe this image.", "Prompt of ~/describe and of the periodic scene descriptions."),
    ("describe_rate_hz", 0.0, "Rate of scene descriptions per camera on ~/scene_description; 0 = off. "
                              "A frame is described once; a busy model skips ticks instead of queueing."),
    ("max_new_tokens", 64, "Default most tokens per answer (requests may ask for another limit)."),
    ("temperature", 0.0, "Sampling temperature; 0 = greedy (deterministic)."),
    ("top_p", 1.0, "Nucleus sampling mass in (0, 1]; 1 = off. Only used when temperature > 0."),
    ("seed", -1, "Sampling seed; -1 = a random seed."),
    ("max_frame_age_s", 2.0, "Default freshness bound: refuse frames whose stamp is older than this (seconds); "
                             "requests may pass their own bound; negative = no bound."),
    ("queue_size", 4, "Requests that may wait behind the running one; more are refused with 'queue full'."),
    ("request_timeout_s", 30.0, "Longest time a request may take, queue wait included (seconds); 0 = no limit."),
    ("max_image_pixels", 4096 * 4096, "Largest frame accepted (width x height); larger frames are refused."),
    ("vision_cache_size", 8, "Frames whose image embeddings are kept, so more questions on a frame skip the encoder."),
    ("prefix_cache_size", 4, "Frames whose prompt prefix (system + image) KV cache is kept for reuse."),
    ("question_max_chars", 2000, "Longest question accepted, in characters (the model's context also bounds it)."),
)


@dataclass(frozen=True)
class CameraConfig:
    name: str
    topic: str
    transport: str  # raw | compressed


@dataclass(frozen=True)
class NodeConfig:
    model: str
    backend: str
    threads: int | None
    precision: str | None
    task: str
    lm_file: str | None
    mmproj_file: str | None
    cameras: tuple[CameraConfig, ...]
    default_camera: str
    describe_prompt: str
    describe_rate_hz: float
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    max_frame_age_s: float
    queue_size: int
    request_timeout_s: float | None
    max_image_pixels: int
    vision_cache_size: int
    prefix_cache_size: int
    question_max_chars: int


def _descriptor(name: str, description: str, dynamic_typing: bool = False) -> ParameterDescriptor:
    # Read once at start: read-only makes a runtime `ros2 param set` fail instead of silently doing nothing.
    return ParameterDescriptor(name=name, description=description, read_only=True, dynamic_typing=dynamic_typing)


def _number(name: str, value) -> float:
    # Float parameters accept integers too (`-p describe_rate_hz:=2`), hence dynamic typing + this check.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise OmniVisionError(f"{name} must be a number, got {value!r}")
    return float(value)


def declare_and_read(node) -> NodeConfig:
    """Declare every parameter on `node` (an rclpy Node) and return them validated as a NodeConfig."""
    values = {}
    for name, default, description in PARAMETERS:
        is_float = isinstance(default, float)
        value = node.declare_parameter(name, default, _descriptor(name, description, is_float)).value
        values[name] = _number(name, value) if is_float else value

    names = [str(n) for n in values["camera_names"]]
    if not names:
        raise OmniVisionError("camera_names is empty; list at least one camera")
    if len(set(names)) != len(names):
        raise OmniVisionError(f"camera_names has duplicates: {names}")
    cameras = []
    for cam in names:
        if not cam or not cam.replace("_", "").isalnum():
            raise OmniVisionError(f"camera name '{cam}' must be letters, digits and underscores")
        topic = node.declare_parameter(
            f"cameras.{cam}.topic", f"{cam}/image_raw",
            _descriptor(f"cameras.{cam}.topic", f"Image topic of camera '{cam}' (relative names follow the "
                                                "node's namespace and remappings).")).value
        transport = node.declare_parameter(
            f"cameras.{cam}.transport", "raw",
            _descriptor(f"cameras.{cam}.transport", f"Message type on the topic of camera '{cam}': raw "
                                                    "(sensor_msgs/Image) or compressed (sensor_msgs/CompressedImage).")).value
        if transport not in TRANSPORTS:
            raise OmniVisionError(f"cameras.{cam}.transport is '{transport}'; choose raw or compressed")
        if not topic:
            raise OmniVisionError(f"cameras.{cam}.topic is empty")
        cameras.append(CameraConfig(cam, str(topic), str(transport)))

    default_camera = values["default_camera"] or names[0]
    if default_camera not in names:
        raise OmniVisionError(f"default_camera '{default_camera}' is not one of camera_names {names}")
    if values["task"] not in TASKS:
        raise OmniVisionError(f"task is '{values['task']}'; choose one of {', '.join(TASKS)}")
    if values["backend"] not in BACKENDS:
        raise OmniVisionError(f"backend is '{values['backend']}'; choose one of {', '.join(BACKENDS)}")
    for name in ("queue_size", "max_new_tokens", "max_image_pixels", "question_max_chars"):
        if values[name] < 1:
            raise OmniVisionError(f"{name} must be at least 1, got {values[name]}")
    for name in ("describe_rate_hz", "request_timeout_s", "temperature", "vision_cache_size", "prefix_cache_size"):
        if values[name] < 0:
            raise OmniVisionError(f"{name} must not be negative, got {values[name]}")
    if not 0 < values["top_p"] <= 1:
        raise OmniVisionError(f"top_p must be in (0, 1], got {values['top_p']}")
    if not str(values["describe_prompt"]).strip():
        raise OmniVisionError("describe_prompt is empty")

    return NodeConfig(
        model=str(values["model"]),
        backend=str(values["backend"]),
        threads=int(values["threads"]) or None,
        precision=str(values["precision"]) or None,
        task=str(values["task"]),
        lm_file=str(values["lm_file"]) or None,
        mmproj_file=str(values["mmproj_file"]) or None,
        cameras=tuple(cameras),
        default_camera=default_camera,
        describe_prompt=str(values["describe_prompt"]),
        describe_rate_hz=float(values["describe_rate_hz"]),
        max_new_tokens=int(values["max_new_tokens"]),
        temperature=float(values["temperature"]),
        top_p=float(values["top_p"]),
        seed=None if values["seed"] < 0 else int(values["seed"]),
        max_frame_age_s=float(values["max_frame_age_s"]),
        queue_size=int(values["queue_size"]),
        request_timeout_s=float(values["request_timeout_s"]) or None,
        max_image_pixels=int(values["max_image_pixels"]),
        vision_cache_size=int(values["vision_cache_size"]),
        prefix_cache_size=int(values["prefix_cache_size"]),
        question_max_chars=int(values["question_max_chars"]),
    )
