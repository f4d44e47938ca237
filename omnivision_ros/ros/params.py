"""The node's ROS parameters: declared with descriptions, read once into NodeConfig (STYLE 10).

Cameras are `camera_names` (a string array) plus `cameras.<name>.topic` and
`cameras.<name>.transport`, declared after the names are read: ROS parameters cannot hold a
list of dicts. Standing watches likewise: `watch_names` plus `watches.<name>.camera`, `.question`,
`.rate_hz`, `.on_threshold`, `.off_threshold`, `.min_frames`.
"""
from __future__ import annotations

from dataclasses import dataclass

from rcl_interfaces.msg import ParameterDescriptor

from omnivision_ros.errors import OmniVisionError, check_name
from omnivision_ros.model.prompt import TASKS
from omnivision_ros.ros.frames import TRANSPORTS
from omnivision_ros.runtime.backend import BACKENDS
from omnivision_ros.watches import DEFAULTS as WATCH_DEFAULTS
from omnivision_ros.watches import MAX_RATE_HZ, WatchSpec, check_watch


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
    ("check_threshold", 0.5, "~/check answers yes when p_yes reaches this, unless the request passes its own threshold."),
    ("choose_max_options", 16, "Most options a ~/choose request may list."),
    ("choose_max_option_tokens", 64, "Longest option of a ~/choose request, in tokens."),
)
# Declared with dynamic typing: an empty list default is typed as bytes, and a list of names is strings.
WATCH_NAMES = ("watch_names", "Names of the standing yes/no watches started with the node; each needs "
                              "watches.<name>.question (and optionally camera, rate_hz, on_threshold, "
                              "off_threshold, min_frames). More can be added at run time with ~/add_watch.")
WATCH_PARAMETERS = (
    ("camera", "", "Camera of watch '{name}'; empty = default_camera."),
    ("question", "", "Yes/no question of watch '{name}'."),
    ("rate_hz", WATCH_DEFAULTS["rate_hz"], f"Evaluations per second of watch '{{name}}', at most {MAX_RATE_HZ:g}; "
                                           "each frame is evaluated at most once."),
    ("on_threshold", WATCH_DEFAULTS["on_threshold"], "Watch '{name}' votes true when p_yes is at least this."),
    ("off_threshold", WATCH_DEFAULTS["off_threshold"], "Watch '{name}' votes false when p_yes is below this "
                                                       "(at most on_threshold)."),
    ("min_frames", WATCH_DEFAULTS["min_frames"], "Consecutive votes that flip the state of watch '{name}'."),
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
    check_threshold: float = 0.5
    choose_max_options: int = 16
    choose_max_option_tokens: int = 64
    watches: tuple[WatchSpec, ...] = ()


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
        check_name("camera name", cam)
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
    for name in ("queue_size", "max_new_tokens", "max_image_pixels", "question_max_chars", "choose_max_options",
                 "choose_max_option_tokens"):
        if values[name] < 1:
            raise OmniVisionError(f"{name} must be at least 1, got {values[name]}")
    for name in ("describe_rate_hz", "request_timeout_s", "temperature", "vision_cache_size", "prefix_cache_size"):
        if values[name] < 0:
            raise OmniVisionError(f"{name} must not be negative, got {values[name]}")
    if not 0 < values["top_p"] <= 1:
        raise OmniVisionError(f"top_p must be in (0, 1], got {values['top_p']}")
    if not str(values["describe_prompt"]).strip():
        raise OmniVisionError("describe_prompt is empty")
    if not 0 < values["check_threshold"] <= 1:
        raise OmniVisionError(f"check_threshold must be in (0, 1], got {values['check_threshold']}")
    watches = _declare_watches(node, names, default_camera, int(values["question_max_chars"]))
    if watches and values["task"] != "vqa":
        raise OmniVisionError(f"watch_names lists watches, but task is '{values['task']}': yes/no watches need task vqa")

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
        check_threshold=float(values["check_threshold"]),
        choose_max_options=int(values["choose_max_options"]),
        choose_max_option_tokens=int(values["choose_max_option_tokens"]),
        watches=watches,
    )


def _declare_watches(node, cameras: list[str], default_camera: str, question_max_chars: int) -> tuple[WatchSpec, ...]:
    # `watch_names: []` in a parameter file sets it to "not set" (None).
    names = node.declare_parameter(WATCH_NAMES[0], [], _descriptor(WATCH_NAMES[0], WATCH_NAMES[1], True)).value or []
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise OmniVisionError(f"watch_names must be a list of names, got {names!r}")
    if len(set(names)) != len(names):
        raise OmniVisionError(f"watch_names has duplicates: {list(names)}")
    watches = []
    for name in names:
        check_name("watch name", name)
        fields = {}
        for field, default, description in WATCH_PARAMETERS:
            key = f"watches.{name}.{field}"
            is_float = isinstance(default, float)
            value = node.declare_parameter(key, default, _descriptor(key, description.format(name=name), is_float)).value
            fields[field] = _number(key, value) if is_float else value
        if not str(fields["question"]).strip():
            raise OmniVisionError(f"watches.{name}.question is empty; give watch '{name}' a yes/no question")
        spec = WatchSpec(name, str(fields["camera"]), str(fields["question"]), fields["rate_hz"], fields["on_threshold"],
                         fields["off_threshold"], int(fields["min_frames"]))
        watches.append(check_watch(spec, cameras, default_camera, question_max_chars))
    return tuple(watches)
