"""The Fast DDS profiles shipped in config/ and the environment variables that apply them to a process
(docs/node.md, "Camera intake"). Without rclpy: the launch file and the benchmarks import it too."""
from __future__ import annotations

import os
from pathlib import Path

PROFILES = {"large_data": "fastdds_large_data.xml", "shm": "fastdds_shm.xml"}
PROFILE_VARIABLES = ("FASTDDS_DEFAULT_PROFILES_FILE", "FASTRTPS_DEFAULT_PROFILES_FILE")
SOURCE_CONFIG = Path(__file__).resolve().parents[2] / "config"


def profiles_dir() -> Path:
    """The package's config/ folder: in a source checkout, else the installed share directory."""
    if (SOURCE_CONFIG / PROFILES["shm"]).is_file():
        return SOURCE_CONFIG
    from ament_index_python.packages import get_package_share_directory

    return Path(get_package_share_directory("omnivision_ros")) / "config"


def profile_variables() -> tuple[str, ...]:
    """The variable naming a Fast DDS XML profile: FASTRTPS_DEFAULT_PROFILES_FILE for Fast DDS 2.x
    (Humble, Jazzy), FASTDDS_DEFAULT_PROFILES_FILE for 3.x (Kilted on); both when unknown (3.x reads
    both, warning about the old name)."""
    distro = os.environ.get("ROS_DISTRO", "")
    if distro:
        return PROFILE_VARIABLES[1:] if distro in ("humble", "iron", "jazzy") else PROFILE_VARIABLES[:1]
    major = fast_dds_major()
    if major == 0:
        return PROFILE_VARIABLES
    return PROFILE_VARIABLES[:1] if major >= 3 else PROFILE_VARIABLES[1:]


def fast_dds_major() -> int:
    """Major version of the Fast DDS wheel (PyPI's ros-fastdds on Kilted, ros-fastrtps on Jazzy); 0 when
    unknown (a ROS 2 install)."""
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("ros-fastdds", "ros-fastrtps"):
        try:
            return int(version(dist).split(".")[0])
        except (PackageNotFoundError, ValueError):
            continue
    return 0


def profile_environment(profile: str, directory: Path | None = None) -> dict[str, str]:
    """{variable: path} applying a shipped profile by name (`shm`, `large_data`) or an XML file by path;
    {} for an empty profile."""
    if not profile:
        return {}
    path = str((directory or profiles_dir()) / PROFILES[profile]) if profile in PROFILES else profile
    return {name: path for name in profile_variables()}
