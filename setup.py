from glob import glob

from setuptools import find_packages, setup

package_name = 'omnivision_ros'

# One 'command = module:function' per line; `pip install -e .` puts them in .venv/bin,
# `colcon build` in lib/omnivision_ros (so `ros2 run omnivision_ros <command>` finds them).
console_scripts = [
    'omnivision-ask = omnivision_ros.cli.ask:main',
    'omnivision-eval = omnivision_ros.cli.eval:main',
    'omnivision-make-test-model = omnivision_ros.export.make_test_model:main',
    'omnivision-export = omnivision_ros.export.cli:main',
    'omnivision-build-engines = omnivision_ros.export.tensorrt_build:main',
    'omnivision-verify = omnivision_ros.cli.verify:main',
    'omnivision_node = omnivision_ros.node:main',
    'omnivision-demo = omnivision_ros.demo:main',
    'omnivision-bench = omnivision_ros.cli.bench:main',
    'omnivision-bench-intake = omnivision_ros.cli.bench_intake:main',
]

setup(
    name=package_name,
    version='0.1.0',
    packages=find_packages(include=[package_name, package_name + '.*']),
    package_data={package_name: ['data/*']},
    data_files=[
        ('share/ament_index/resource_index/packages', ['resource/' + package_name]),
        ('share/' + package_name, ['package.xml']),
        ('share/' + package_name + '/launch', glob('launch/*.launch.py')),
        ('share/' + package_name + '/config', glob('config/*.yaml') + glob('config/*.xml')),
    ],
    install_requires=['setuptools'],
    # llama.cpp is a baseline of omnivision-bench only; it compiles from source (~20 min on 2 cores).
    extras_require={'bench': ['llama-cpp-python==0.3.36']},
    zip_safe=True,
    maintainer='OmniVision ROS maintainers',
    maintainer_email='omnivision@example.com',
    description='OmniVision-968M vision-language model as a ROS 2 node.',
    license='Apache-2.0',
    entry_points={'console_scripts': console_scripts},
)
