"""Start omnivision_node with its parameter file.

    ros2 launch omnivision_ros vlm.launch.py
    ros2 launch omnivision_ros vlm.launch.py params_file:=/path/to/my.yaml namespace:=robot1 \
        camera_topic:=/front_camera/color/image_raw
"""
import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node


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
