"""Start omnivision_node with its parameter file.

    ros2 launch omnivision_ros vlm.launch.py
    ros2 launch omnivision_ros vlm.launch.py params_file:=/path/to/my.yaml namespace:=robot1 \
        camera_topic:=/front_camera/color/image_raw
    ros2 launch omnivision_ros vlm.launch.py dds_profile:=large_data   # 640x480+ raw frames
"""
import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction, SetEnvironmentVariable
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node

# Shipped Fast DDS profiles (config/*.xml); docs/node.md says what the camera driver needs too.
DDS_PROFILES = {'large_data': 'fastdds_large_data.xml', 'shm': 'fastdds_shm.xml'}


def dds_profile_environment(context):
    """The dds_profile argument as the variable Fast DDS reads (2.x: Humble, Jazzy; 3.x: Kilted on)."""
    profile = LaunchConfiguration('dds_profile').perform(context)
    if not profile:
        return []
    if profile in DDS_PROFILES:
        profile = os.path.join(get_package_share_directory('omnivision_ros'), 'config', DDS_PROFILES[profile])
    old = os.environ.get('ROS_DISTRO', '') in ('humble', 'iron', 'jazzy')
    return [SetEnvironmentVariable('FASTRTPS_DEFAULT_PROFILES_FILE' if old else 'FASTDDS_DEFAULT_PROFILES_FILE',
                                   profile)]


def generate_launch_description():
    default_params = os.path.join(get_package_share_directory('omnivision_ros'), 'config', 'omnivision.yaml')
    return LaunchDescription([
        DeclareLaunchArgument(
            'params_file', default_value=default_params,
            description='YAML file with the parameters of omnivision_node (model bundle, cameras, ...)'),
        DeclareLaunchArgument(
            'namespace', default_value='',
            description='Namespace of the node (its services become <namespace>/omnivision_node/ask, ...)'),
        DeclareLaunchArgument(
            'camera_topic', default_value='camera/image_raw',
            description='Image topic of the default camera of the shipped config '
                        '(remaps its topic camera/image_raw)'),
        DeclareLaunchArgument(
            'dds_profile', default_value='',
            description='Fast DDS profile for the node: large_data (Jazzy and later) or shm (Humble) for '
                        'raw frames of 640x480 and more, or a path to an XML profile; empty = none. The '
                        'camera driver needs the same profile'),
        OpaqueFunction(function=dds_profile_environment),
        Node(
            package='omnivision_ros',
            executable='omnivision_node',
            name='omnivision_node',
            namespace=LaunchConfiguration('namespace'),
            parameters=[LaunchConfiguration('params_file')],
            remappings=[('camera/image_raw', LaunchConfiguration('camera_topic'))],
            output='screen',
            emulate_tty=True,
        ),
    ])
