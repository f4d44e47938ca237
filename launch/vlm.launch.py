"""Start omnivision_node with its parameter file; the common settings are launch arguments.

    ros2 launch omnivision_ros vlm.launch.py model:=/path/to/bundle
    ros2 launch omnivision_ros vlm.launch.py model:=/path/to/bundle precision:=int8 namespace:=robot1 \
        camera_topic:=/front_camera/color/image_raw
    ros2 launch omnivision_ros vlm.launch.py model:=/path/to/bundle \
        cameras:=front=/front/image_raw,back=/back/image_raw/compressed
    ros2 launch omnivision_ros vlm.launch.py model:=/path/to/bundle dds_profile:=shm   # 640x480+ raw frames
    ros2 launch omnivision_ros vlm.launch.py --show-args

An argument left empty keeps the value of params_file (the shipped config/omnivision.yaml by
default). The shipped config names no model: the node then stays up and says in its log, on
/diagnostics and in every response how to give it one.
"""
import os
from pathlib import Path

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction, SetEnvironmentVariable
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node

from omnivision_ros.launch_args import check_log_level, parameter_overrides, parse_bool
from omnivision_ros.ros.dds import profile_environment

ARGUMENTS = (
    ("model", "", "Model bundle directory written by omnivision-export (or a folder of GGUF files, or a "
                  "preset name: tiny, omnivision-968m); empty = the model of params_file"),
    ("precision", "", "Bundle variant: fp32, fp16, int8, int4; empty = params_file's (default: int8 on "
                      "the CPU when the bundle has it, else fp32; fp16 on a GPU)"),
    ("backend", "", "auto, onnxruntime, tensorrt or torch; empty = params_file's (default auto)"),
    ("camera_topic", "camera/image_raw", "Image topic of the default camera of the shipped config "
                                         "(remaps its topic camera/image_raw)"),
    ("cameras", "", "Several cameras instead of the shipped one: NAME=TOPIC[:TRANSPORT],... e.g. "
                    "front=/front/image_raw,back=/back/image_raw/compressed (topics ending in /compressed "
                    "are CompressedImage; the first camera is the default)"),
    ("namespace", "", "Namespace of the node (its services become <namespace>/omnivision_node/ask, ...)"),
    ("params_file", None, "YAML file with the parameters of omnivision_node"),
    ("log_level", "info", "Log level of the node: debug, info, warn, error, fatal"),
    ("respawn", "false", "Restart the node when it exits (true/false)"),
    ("respawn_delay", "2.0", "Seconds to wait before restarting the node (with respawn:=true)"),
    ("dds_profile", "", "Fast DDS profile for the node, for raw frames of 640x480 and more: shm (Humble, "
                        "Jazzy, Kilted), large_data (Kilted and later), or a path to an XML profile; empty = "
                        "none. The camera driver needs the same profile (docs/node.md, Camera intake)"),
)


def dds_profile_environment(profile: str) -> list:
    """The dds_profile argument as the variable(s) Fast DDS reads (omnivision_ros.ros.dds)."""
    share = Path(get_package_share_directory("omnivision_ros")) / "config"
    return [SetEnvironmentVariable(name, path) for name, path in profile_environment(profile, share).items()]


def launch_node(context):
    def value(name: str) -> str:
        return LaunchConfiguration(name).perform(context)

    overrides = parameter_overrides(value("model"), value("precision"), value("backend"), value("cameras"))
    respawn = parse_bool("respawn", value("respawn"))
    try:
        respawn_delay = float(value("respawn_delay"))
    except ValueError:
        raise ValueError(f"respawn_delay is '{value('respawn_delay')}'; give seconds, e.g. 2.0") from None
    return dds_profile_environment(value("dds_profile")) + [Node(
        package="omnivision_ros",
        executable="omnivision_node",
        name="omnivision_node",
        namespace=value("namespace"),
        parameters=[value("params_file")] + ([overrides] if overrides else []),
        remappings=[("camera/image_raw", value("camera_topic"))],
        arguments=["--ros-args", "--log-level", check_log_level(value("log_level"))],
        respawn=respawn,
        respawn_delay=respawn_delay,
        output="screen",
        emulate_tty=True,
    )]


def generate_launch_description():
    default_params = os.path.join(get_package_share_directory("omnivision_ros"), "config", "omnivision.yaml")
    return LaunchDescription([
        DeclareLaunchArgument(name, default_value=default_params if default is None else default,
                              description=description)
        for name, default, description in ARGUMENTS
    ] + [OpaqueFunction(function=launch_node)])
