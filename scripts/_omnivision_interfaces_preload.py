"""Load a colcon-built interface package's shared libraries before the package is first imported.

scripts/setup.sh copies this module into the venv's site-packages and calls install() from a
.pth file with the library directory of each interface package it builds (omnivision_interfaces,
and composition_interfaces for launch_ros).

rosidl looks a message package's typesupport libraries up at run time with dlopen by file
name, and the dynamic loader searches LD_LIBRARY_PATH only as it was when the process
started. A library already loaded under that name (its SONAME) is found without a search, so
loading them by full path first makes `from omnivision_interfaces.msg import ...` work without
sourcing a setup file.
"""

import ctypes
import glob
import os
import sys


class _PreloadFinder:
    """Meta path finder that only loads the libraries, then lets the normal import run."""

    def __init__(self, lib_dir, package):
        self.lib_dir = lib_dir
        self.package = package
        self.loaded = False

    def find_spec(self, name, path=None, target=None):
        if name == self.package and not self.loaded:
            self.loaded = True
            for lib in sorted(glob.glob(os.path.join(self.lib_dir, 'lib*.so'))):
                try:
                    ctypes.CDLL(lib)
                except OSError as err:
                    raise ImportError(
                        f'cannot load {lib}: {err}; run scripts/setup.sh again, or source the '
                        'ROS 2 setup file it was built with') from err
        return None


def install(lib_dir, package='omnivision_interfaces'):
    if os.path.isdir(lib_dir):
        sys.meta_path.insert(0, _PreloadFinder(lib_dir, package))
