#!/usr/bin/env bash
# Reproducible development environment for omnivision_ros.
#
#   .venv/      Python virtual environment with every pin of requirements*.txt
#   build/colcon/, install/, log/
#               colcon build of omnivision_interfaces (the generated messages) and, where the
#               ROS 2 command-line tools are built from source, composition_interfaces
#
# Two modes:
#   - no ROS 2 sourced (ROS_DISTRO unset): ROS 2 comes from PyPI wheels into the venv.
#     ROS_DISTRO_WHEELS picks the distribution: kilted (default, requirements-ros.txt, Python
#     3.11 only) or jazzy (requirements-ros-jazzy.txt, Python 3.10, 3.11 or 3.12).
#   - a ROS 2 install sourced (ROS_DISTRO set): its rclpy and build tools are used; the venv
#     is created with --system-site-packages on the system Python that ROS 2 was built for.
#
# Settings (environment variables):
#   PYTHON=python3.12        the interpreter the venv is made from
#   VENV=.venv-jazzy-py312   the venv (default .venv); any other venv keeps its colcon build
#                            in build/<venv name>/ so that several can live side by side
#   WITH_TORCH=0|1           install torch, transformers and the export tools (requirements.txt);
#                            default 1 on Python 3.11 (the only Python the pinned CPU build of
#                            torch exists for), else 0: the node and the ONNX Runtime backend
#                            only (requirements-node.txt), as on a robot
#   ROS2CLI_SRC=DIR          sources of the ROS 2 command-line tools and launch (default
#                            ../shared/ros2cli): installed into the venv when the folder exists
#                            and no ROS 2 is sourced, so `ros2 launch ...` runs from the venv
#
#   ROS_DISTRO_WHEELS=jazzy PYTHON=python3.12 VENV=.venv-jazzy-py312 scripts/setup.sh
#
# After it, `.venv/bin/python` imports rclpy and omnivision_interfaces with no sourcing, and
# the console scripts are in .venv/bin. Each step is skipped when the hash of its inputs is
# the one recorded in .venv/.setup-stamps, so a second run takes seconds and changes nothing.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

VENV="${VENV:-.venv}"
[[ "$VENV" == /* ]] || VENV="$ROOT/$VENV"
VENV_NAME="$(basename "$VENV")"
PY="$VENV/bin/python"
STAMPS="$VENV/.setup-stamps"
if [[ "$VENV" == "$ROOT/.venv" ]]; then
    BUILD_DIR="$ROOT/build"
    COLCON_INSTALL="$ROOT/install"
    COLCON_LOG="$ROOT/log"
else
    BUILD_DIR="$ROOT/build/$VENV_NAME"
    COLCON_INSTALL="$BUILD_DIR/install"
    COLCON_LOG="$BUILD_DIR/log"
fi
SETUP_BUILD="$BUILD_DIR/setup"          # setup's own scratch files and logs
COLCON_BUILD="$BUILD_DIR/colcon"
ROS_DISTRO_WHEELS="${ROS_DISTRO_WHEELS:-kilted}"
ROS2CLI_SRC="${ROS2CLI_SRC:-$ROOT/../shared/ros2cli}"

export PIP_DISABLE_PIP_VERSION_CHECK=1
export PIP_NO_INPUT=1

log() { echo "[setup] $*"; }
die() { echo "[setup] error: $*" >&2; exit 1; }

sha() { sha256sum | cut -c1-16; }
stamp_ok() { [[ -f "$STAMPS/$1" && "$(cat "$STAMPS/$1")" == "$2" ]]; }
stamp_set() { mkdir -p "$STAMPS"; echo "$2" > "$STAMPS/$1"; }

# pip with its progress noise removed. The machines' pip.conf names local indexes that do not
# hold every package, and pip warns 'Location ... is ignored' for each of those misses.
pip_install() {
    "$PY" -m pip install -q "$@" 2>&1 \
        | { grep -v -e "is ignored: it is neither a file nor a directory" || true; }
}

# The exact requirement line ('torch==2.13.0') for one package of a requirements file.
pin_of() {
    local line
    line="$(grep -i -E "^$1==" "$2" || true)"
    [[ -n "$line" ]] || die "no pin for $1 in $2"
    echo "$line"
}

# With a sourced ROS 2: write the requirements and constraints for the system Python.
# Only the direct pins of the requirements file apply (the transitive ones of requirements.txt
# were resolved for Python 3.11), and packages the system already provides are kept: NumPy because the ROS 2
# message modules are compiled against it, torch because it may be a platform build (NVIDIA's
# CUDA build on a Jetson), OpenCV with them.
system_requirements() {  # requirements_in, requirements_out, constraints_out
    local direct="$SETUP_BUILD/direct.txt" version
    sed '/^# transitive/,$d' "$1" > "$direct"
    shift
    cp "$direct" "$1"
    cp "$direct" "$2"
    for module in numpy torch cv2; do
        version="$("$PY" -c "import $module; print($module.__version__)" 2>/dev/null)" || continue
        local dist="$module"
        [[ "$module" == cv2 ]] && dist=opencv-python-headless
        log "keeping the system's $module $version"
        sed -i -E "/^$dist==/Id" "$1" "$2"
        [[ "$module" == cv2 ]] || echo "$dist==$version" >> "$2"
    done
    # The pinned OpenCV needs NumPy 2; with an older system NumPy let pip pick a release
    # that works with it.
    if grep -q -i -E '^numpy==1\.' "$2" && grep -q -i -E '^opencv-python-headless==' "$1"; then
        sed -i -E '/^opencv-python-headless==/Id' "$1" "$2"
        echo "opencv-python-headless" >> "$1"
    fi
}

# --- mode and interpreter ---------------------------------------------------------------

if [[ -n "${ROS_DISTRO:-}" ]]; then
    MODE="system-ros-$ROS_DISTRO"
    # ROS 2's rclpy is built for the distribution's Python, not for a pyenv or conda one.
    if [[ -n "${PYTHON:-}" ]]; then
        BASE_PY="$PYTHON"
    elif [[ -x /usr/bin/python3 ]]; then
        BASE_PY=/usr/bin/python3
    else
        BASE_PY="$(command -v python3)"
    fi
    VENV_ARGS=(--system-site-packages)
else
    case "$ROS_DISTRO_WHEELS" in
        kilted) ROS_REQUIREMENTS=requirements-ros.txt; WHEEL_PYTHONS="3.11" ;;
        jazzy) ROS_REQUIREMENTS=requirements-ros-jazzy.txt; WHEEL_PYTHONS="3.10 3.11 3.12" ;;
        *) die "ROS_DISTRO_WHEELS is '$ROS_DISTRO_WHEELS'; choose kilted or jazzy" ;;
    esac
    MODE="ros-wheels-$ROS_DISTRO_WHEELS"
    BASE_PY="${PYTHON:-python3}"
    VENV_ARGS=()
    command -v "$BASE_PY" >/dev/null || die "Python interpreter '$BASE_PY' not found (PYTHON)"
    version="$("$BASE_PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)" \
        || die "Python interpreter '$BASE_PY' does not run (PYTHON); scripts/find-python.sh X.Y finds one"
    if [[ " $WHEEL_PYTHONS " != *" $version "* ]]; then
        # The ROS 2 Kilted wheels are built for CPython 3.11 only.
        if [[ -z "${PYTHON:-}" && "$WHEEL_PYTHONS" == 3.11 ]] && command -v python3.11 >/dev/null \
                && python3.11 -c pass 2>/dev/null; then
            BASE_PY="$(command -v python3.11)"
        else
            die "the ROS 2 $ROS_DISTRO_WHEELS wheels need Python $WHEEL_PYTHONS, '$BASE_PY' is $version (set PYTHON=/path/to/python, or source a ROS 2 install)"
        fi
    fi
fi
BASE_PY_REAL="$("$BASE_PY" -c 'import os, sys; print(os.path.realpath(sys.executable))')"
BASE_PY_VERSION="$("$BASE_PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
WITH_TORCH="${WITH_TORCH:-auto}"
if [[ "$WITH_TORCH" == auto ]]; then
    WITH_TORCH=0
    # A sourced ROS 2 on another Python keeps the torch it has (e.g. NVIDIA's build on a Jetson).
    if [[ "$BASE_PY_VERSION" == 3.11 ]] || { [[ "$MODE" == system-ros-* ]] && "$BASE_PY" -c 'import torch' 2>/dev/null; }; then
        WITH_TORCH=1
    fi
fi
[[ "$WITH_TORCH" == 0 || "$WITH_TORCH" == 1 ]] || die "WITH_TORCH is '$WITH_TORCH'; use 0 or 1"
if [[ "$WITH_TORCH" == 1 ]]; then
    PY_REQUIREMENTS=requirements.txt
else
    PY_REQUIREMENTS=requirements-node.txt
fi
ENV_KEY="$(echo "$MODE $BASE_PY_REAL $WITH_TORCH" | sha)"

# --- virtual environment ----------------------------------------------------------------

if [[ -x "$PY" ]] && ! stamp_ok venv "$ENV_KEY"; then
    log "environment changed ($MODE, $BASE_PY_REAL, torch $WITH_TORCH): recreating $VENV_NAME"
    rm -rf "$VENV"
fi
if [[ ! -x "$PY" ]] || ! "$PY" -c 'pass' 2>/dev/null; then
    log "creating $VENV_NAME ($MODE, $("$BASE_PY" --version 2>&1))"
    rm -rf "$VENV"
    "$BASE_PY" -m venv "${VENV_ARGS[@]}" "$VENV"
    stamp_set venv "$ENV_KEY"
fi
SITE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"

# --- Python packages ----------------------------------------------------------------------

DEPS_KEY="$(cat "$PY_REQUIREMENTS" "${ROS_REQUIREMENTS:-requirements-ros.txt}" | sha)-$ENV_KEY"
if ! stamp_ok deps "$DEPS_KEY"; then
    mkdir -p "$SETUP_BUILD"
    CONSTRAINTS="$SETUP_BUILD/constraints.txt"
    REQUIREMENTS="$SETUP_BUILD/requirements.txt"
    cp "$PY_REQUIREMENTS" "$CONSTRAINTS"
    cp "$PY_REQUIREMENTS" "$REQUIREMENTS"

    if [[ "$MODE" == system-ros-* ]]; then
        system_requirements "$PY_REQUIREMENTS" "$REQUIREMENTS" "$CONSTRAINTS"
    fi

    # torch first and alone, exactly pinned, so that nothing depending on torch can bring
    # another build of it.
    if grep -q -i -E '^torch==' "$REQUIREMENTS"; then
        TORCH_PIN="$(pin_of torch "$REQUIREMENTS")"
        log "installing $TORCH_PIN ..."
        pip_install -c "$CONSTRAINTS" "$TORCH_PIN"
    fi

    if [[ "$MODE" == ros-wheels-* ]]; then
        log "installing ROS 2 $ROS_DISTRO_WHEELS wheels and build tools ($ROS_REQUIREMENTS) ..."
        pip_install -c "$CONSTRAINTS" -r "$ROS_REQUIREMENTS"
    elif ! command -v colcon >/dev/null; then
        log "installing colcon (not found with the sourced ROS 2) ..."
        pip_install -c "$CONSTRAINTS" -c requirements-ros.txt \
            "$(pin_of colcon-common-extensions requirements-ros.txt)"
    fi

    log "installing Python dependencies ($PY_REQUIREMENTS) ..."
    pip_install -c "$CONSTRAINTS" -r "$REQUIREMENTS"
    stamp_set deps "$DEPS_KEY"
else
    log "Python packages up to date"
fi

# --- wheel path defects -------------------------------------------------------------------

# The ROS 2 wheels' exported CMake targets for the generated Python code name the include
# directories of the machine they were built on. Point them at this venv's Python headers
# and NumPy. Re-checked on every run because reinstalling a wheel restores the originals.
if [[ "$MODE" == ros-wheels-* ]]; then
    PY_TAG="cp${BASE_PY_VERSION/./}"
    WHEEL_PREFIX="/opt/python/$PY_TAG-$PY_TAG"
    mapfile -t broken < <(grep -rl --include='*.cmake' "$WHEEL_PREFIX" "$VENV/share" 2>/dev/null || true)
    if (( ${#broken[@]} )); then
        PY_INCLUDE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
        NP_INCLUDE="$("$PY" -c 'import numpy; print(numpy.get_include())')"
        [[ -f "$PY_INCLUDE/Python.h" ]] || die "Python headers not found in $PY_INCLUDE (install the python3-dev package)"
        log "pointing ${#broken[@]} wheel CMake files at $PY_INCLUDE and $NP_INCLUDE"
        PY_DIR="python${BASE_PY_VERSION/./\\.}"
        sed -i \
            -e "s|$WHEEL_PREFIX/include/$PY_DIR|$PY_INCLUDE|g" \
            -e "s|$WHEEL_PREFIX/lib/$PY_DIR/site-packages/numpy/_core/include|$NP_INCLUDE|g" \
            "${broken[@]}"
        if left="$(grep -rl --include='*.cmake' "$WHEEL_PREFIX" "$VENV/share")"; then
            die "unhandled $WHEEL_PREFIX paths left in: $left"
        fi
    fi
fi

# --- interface packages (colcon) -------------------------------------------------------------

if [[ "$MODE" == ros-wheels-* ]]; then
    COLCON="$VENV/bin/colcon"
    build_env=(AMENT_PREFIX_PATH="$VENV" CMAKE_PREFIX_PATH="$VENV" PATH="$VENV/bin:$PATH")
else
    COLCON="$(command -v colcon || echo "$VENV/bin/colcon")"
    build_env=()
fi

# colcon_build NAME KEY SOURCE_DIR: build one ament_cmake package into $COLCON_INSTALL/NAME,
# unless the stamp says it is up to date.
colcon_build() {
    local name="$1" key="$2" src="$3" install="$COLCON_INSTALL/$1"
    if stamp_ok "$name" "$key" && [[ -d "$install" ]]; then
        log "$name up to date"
        return
    fi
    # A build tree configured for another interpreter or ROS 2 is not reused.
    if [[ "$(cat "$COLCON_BUILD/.env-key" 2>/dev/null)" != "$ENV_KEY" ]]; then
        rm -rf "$COLCON_BUILD" "$COLCON_INSTALL"
        mkdir -p "$COLCON_BUILD"
        echo "$ENV_KEY" > "$COLCON_BUILD/.env-key"
    fi
    mkdir -p "$SETUP_BUILD"
    log "building $name (colcon) ..."
    # colcon is given the package's path: it does not look inside the root package for more
    # packages. The install RPATH lets the generated libraries and Python extensions find
    # each other without LD_LIBRARY_PATH.
    if ! env "${build_env[@]}" "$COLCON" --log-base "$COLCON_LOG" build \
            --build-base "$COLCON_BUILD" --install-base "$COLCON_INSTALL" \
            --paths "$src" \
            --event-handlers console_direct+ desktop_notification- status- terminal_title- \
            --cmake-args -DBUILD_TESTING=OFF -DPython3_EXECUTABLE="$PY" \
                "-DCMAKE_INSTALL_RPATH=$install/lib" \
            > "$SETUP_BUILD/colcon-$name.log" 2>&1; then
        tail -n 40 "$SETUP_BUILD/colcon-$name.log" >&2
        die "building $name failed (full log: $SETUP_BUILD/colcon-$name.log)"
    fi
    stamp_set "$name" "$key"
}

# Make a generated package importable from the venv with no sourcing: a .pth file adds its
# Python directory to sys.path and loads its shared libraries before its first import (see
# scripts/_omnivision_interfaces_preload.py for why).
install_if_changed() {  # content, destination
    if [[ "$(cat "$2" 2>/dev/null)" != "$1" ]]; then echo "$1" > "$2"; fi
}
link_into_venv() {  # package name
    local install="$COLCON_INSTALL/$1" init
    init="$(find "$install" -path "*-packages/$1/__init__.py" | head -n 1)"
    [[ -n "$init" ]] || die "generated Python package $1 not found under $install"
    install_if_changed "$(cat scripts/_omnivision_interfaces_preload.py)" \
        "$SITE/_omnivision_interfaces_preload.py"
    install_if_changed "$(dirname "$(dirname "$init")")
import _omnivision_interfaces_preload; _omnivision_interfaces_preload.install('$install/lib', '$1')" \
        "$SITE/$1.pth"
}

tree_hash() { (cd "$1" && find . -type f -print0 | sort -z | xargs -0 sha256sum) | sha; }

colcon_build omnivision_interfaces "$(tree_hash omnivision_interfaces)-$DEPS_KEY" "$ROOT/omnivision_interfaces"
link_into_venv omnivision_interfaces

# --- ROS 2 command-line tools and launch (from source) ---------------------------------------

# ros2cli, launch and launch_ros are not published as wheels; ROS2CLI_SRC holds their sources
# (see its README). They are pure Python, installed with pip on top of the wheels, except
# composition_interfaces (an interface package that launch_ros imports), built like ours.
if [[ "$MODE" == ros-wheels-* && -d "$ROS2CLI_SRC/src" ]]; then
    CLI_KEY="$(tree_hash "$ROS2CLI_SRC/src")-$DEPS_KEY"
    if ! stamp_ok ros2cli "$CLI_KEY"; then
        # pip builds a package in its own folder, which may be read-only: build from a copy.
        CLI_COPY="$BUILD_DIR/ros2cli-src"
        rm -rf "$CLI_COPY"
        mkdir -p "$BUILD_DIR"
        cp -r "$ROS2CLI_SRC/src" "$CLI_COPY"
        chmod -R u+w "$CLI_COPY"
        if [[ "$ROS_DISTRO_WHEELS" != kilted ]]; then
            # These sources are ros2cli 0.36 (Kilted): `ros2 service call` runs `with rclpy.init():`,
            # which needs rclpy >= 8 (Jazzy's rclpy 7 returns None). There, fall back to a no-op
            # context; the command's process ends right after the call anyway.
            CALL_PY="$CLI_COPY/ros2cli/ros2service/ros2service/verb/call.py"
            grep -q '^    with rclpy.init():$' "$CALL_PY" || die "$CALL_PY changed: review the rclpy 7 adaptation"
            sed -i 's/^    with rclpy.init():$/    with rclpy.init() or __import__("contextlib").nullcontext():/' "$CALL_PY"
        fi
        mapfile -t cli_packages < <(find "$CLI_COPY" -name setup.py -not -path '*/test/*' -printf '%h\n' | sort)
        log "installing the ROS 2 CLI and launch from $ROS2CLI_SRC (${#cli_packages[@]} packages) ..."
        pip_install --no-deps --no-build-isolation "${cli_packages[@]}"
        stamp_set ros2cli "$CLI_KEY"
    else
        log "ROS 2 CLI and launch up to date"
    fi
    COMPOSITION_SRC="$ROS2CLI_SRC/src/rcl_interfaces/composition_interfaces"
    colcon_build composition_interfaces "$(tree_hash "$COMPOSITION_SRC")-$DEPS_KEY" "$COMPOSITION_SRC"
    link_into_venv composition_interfaces
elif [[ "$MODE" == ros-wheels-* ]]; then
    log "no ROS 2 CLI sources in $ROS2CLI_SRC: the launch and command-line tests will skip"
fi

# --- omnivision_ros -----------------------------------------------------------------------

PKG_KEY="$(cat setup.py setup.cfg package.xml | sha)-$DEPS_KEY"
if ! stamp_ok package "$PKG_KEY"; then
    log "installing omnivision_ros (editable) ..."
    # Dependencies are all pinned above; no build isolation keeps it offline and fast. PEP 517
    # (an editable wheel) puts the console scripts in the venv's bin; pip's older 'setup.py
    # develop' path would follow setup.cfg's script_dir, which is meant for colcon.
    pip_install --no-deps --no-build-isolation --use-pep517 -e "$ROOT"
    stamp_set package "$PKG_KEY"
else
    log "omnivision_ros up to date"
fi

log "ready: ${VENV#$ROOT/}/bin/python ($MODE, Python $BASE_PY_VERSION, torch $([[ $WITH_TORCH == 1 ]] && echo yes || echo no))"
