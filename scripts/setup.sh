#!/usr/bin/env bash
# Reproducible development environment for omnivision_ros.
#
#   .venv/      Python virtual environment with every pin of requirements*.txt
#   build/colcon/, install/, log/
#               colcon build of omnivision_interfaces (the generated messages)
#
# Two modes:
#   - no ROS 2 sourced (ROS_DISTRO unset): ROS 2 Kilted comes from PyPI wheels
#     (requirements-ros.txt) into .venv; Python 3.11 is required.
#   - a ROS 2 install sourced (ROS_DISTRO set): its rclpy and build tools are used; the venv
#     is created with --system-site-packages on the system Python that ROS 2 was built for.
#
# After it, `.venv/bin/python` imports rclpy and omnivision_interfaces with no sourcing, and
# the console scripts are in .venv/bin. Each step is skipped when the hash of its inputs is
# the one recorded in .venv/.setup-stamps, so a second run takes seconds and changes nothing.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

VENV="$ROOT/.venv"
PY="$VENV/bin/python"
STAMPS="$VENV/.setup-stamps"
SETUP_BUILD="$ROOT/build/setup"         # setup's own scratch files and logs
COLCON_BUILD="$ROOT/build/colcon"
COLCON_INSTALL="$ROOT/install"
COLCON_LOG="$ROOT/log"

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
# Only the direct pins of requirements.txt apply (the transitive ones were resolved for
# Python 3.11), and packages the system already provides are kept: NumPy because the ROS 2
# message modules are compiled against it, torch because it may be a platform build (NVIDIA's
# CUDA build on a Jetson), OpenCV with them.
system_requirements() {  # requirements_out, constraints_out
    local direct="$SETUP_BUILD/direct.txt" version
    sed '/^# transitive/,$d' requirements.txt > "$direct"
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
    MODE="ros-wheels"
    BASE_PY="${PYTHON:-python3}"
    VENV_ARGS=()
    # The ROS 2 Kilted wheels are built for CPython 3.11 only.
    if [[ "$("$BASE_PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')" != "3.11" ]]; then
        if command -v python3.11 >/dev/null; then
            BASE_PY="$(command -v python3.11)"
        else
            die "the ROS 2 wheels need Python 3.11 (set PYTHON=/path/to/python3.11, or source a ROS 2 install)"
        fi
    fi
fi
BASE_PY_REAL="$("$BASE_PY" -c 'import os, sys; print(os.path.realpath(sys.executable))')"
ENV_KEY="$(echo "$MODE $BASE_PY_REAL" | sha)"

# --- virtual environment ----------------------------------------------------------------

if [[ -x "$PY" ]] && ! stamp_ok venv "$ENV_KEY"; then
    log "environment changed ($MODE, $BASE_PY_REAL): recreating .venv"
    rm -rf "$VENV"
fi
if [[ ! -x "$PY" ]] || ! "$PY" -c 'pass' 2>/dev/null; then
    log "creating .venv ($MODE, $("$BASE_PY" --version 2>&1))"
    rm -rf "$VENV"
    "$BASE_PY" -m venv "${VENV_ARGS[@]}" "$VENV"
    stamp_set venv "$ENV_KEY"
fi
SITE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"

# --- Python packages ----------------------------------------------------------------------

DEPS_KEY="$(cat requirements.txt requirements-ros.txt | sha)-$ENV_KEY"
if ! stamp_ok deps "$DEPS_KEY"; then
    mkdir -p "$SETUP_BUILD"
    CONSTRAINTS="$SETUP_BUILD/constraints.txt"
    REQUIREMENTS="$SETUP_BUILD/requirements.txt"
    cp requirements.txt "$CONSTRAINTS"
    cp requirements.txt "$REQUIREMENTS"

    if [[ "$MODE" != ros-wheels ]]; then
        system_requirements "$REQUIREMENTS" "$CONSTRAINTS"
    fi

    # torch first and alone, exactly pinned, so that nothing depending on torch can bring
    # another build of it.
    if grep -q -i -E '^torch==' "$REQUIREMENTS"; then
        TORCH_PIN="$(pin_of torch "$REQUIREMENTS")"
        log "installing $TORCH_PIN ..."
        pip_install -c "$CONSTRAINTS" "$TORCH_PIN"
    fi

    if [[ "$MODE" == ros-wheels ]]; then
        log "installing ROS 2 Kilted wheels and build tools (requirements-ros.txt) ..."
        pip_install -c "$CONSTRAINTS" -r requirements-ros.txt
    elif ! command -v colcon >/dev/null; then
        log "installing colcon (not found with the sourced ROS 2) ..."
        pip_install -c "$CONSTRAINTS" -c requirements-ros.txt \
            "$(pin_of colcon-common-extensions requirements-ros.txt)"
    fi

    log "installing Python dependencies (requirements.txt) ..."
    pip_install -c "$CONSTRAINTS" -r "$REQUIREMENTS"
    stamp_set deps "$DEPS_KEY"
else
    log "Python packages up to date"
fi

# --- wheel path defects -------------------------------------------------------------------

# The ROS 2 wheels' exported CMake targets for the generated Python code name the include
# directories of the machine they were built on. Point them at this venv's Python headers
# and NumPy. Re-checked on every run because reinstalling a wheel restores the originals.
if [[ "$MODE" == ros-wheels ]]; then
    WHEEL_PREFIX=/opt/python/cp311-cp311
    mapfile -t broken < <(grep -rl --include='*.cmake' "$WHEEL_PREFIX" "$VENV/share" 2>/dev/null || true)
    if (( ${#broken[@]} )); then
        PY_INCLUDE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
        NP_INCLUDE="$("$PY" -c 'import numpy; print(numpy.get_include())')"
        [[ -f "$PY_INCLUDE/Python.h" ]] || die "Python headers not found in $PY_INCLUDE (install the python3-dev package)"
        log "pointing ${#broken[@]} wheel CMake files at $PY_INCLUDE and $NP_INCLUDE"
        sed -i \
            -e "s|$WHEEL_PREFIX/include/python3\.11|$PY_INCLUDE|g" \
            -e "s|$WHEEL_PREFIX/lib/python3\.11/site-packages/numpy/_core/include|$NP_INCLUDE|g" \
            "${broken[@]}"
        if left="$(grep -rl --include='*.cmake' "$WHEEL_PREFIX" "$VENV/share")"; then
            die "unhandled $WHEEL_PREFIX paths left in: $left"
        fi
    fi
fi

# --- omnivision_interfaces ------------------------------------------------------------------

IFACE_KEY="$( (cd omnivision_interfaces && find . -type f -print0 | sort -z | xargs -0 sha256sum) | sha)-$DEPS_KEY"
IFACE_INSTALL="$COLCON_INSTALL/omnivision_interfaces"
if ! stamp_ok interfaces "$IFACE_KEY" || [[ ! -d "$IFACE_INSTALL" ]]; then
    # A build tree configured for another interpreter or ROS 2 is not reused.
    if [[ "$(cat "$COLCON_BUILD/.env-key" 2>/dev/null)" != "$ENV_KEY" ]]; then
        rm -rf "$COLCON_BUILD" "$IFACE_INSTALL"
        mkdir -p "$COLCON_BUILD"
        echo "$ENV_KEY" > "$COLCON_BUILD/.env-key"
    fi
    if [[ "$MODE" == ros-wheels ]]; then
        COLCON="$VENV/bin/colcon"
        build_env=(AMENT_PREFIX_PATH="$VENV" CMAKE_PREFIX_PATH="$VENV" PATH="$VENV/bin:$PATH")
    else
        COLCON="$(command -v colcon || echo "$VENV/bin/colcon")"
        build_env=()
    fi
    mkdir -p "$SETUP_BUILD"
    log "building omnivision_interfaces (colcon) ..."
    # colcon is given the package's path: it does not look inside the root package for more
    # packages. The install RPATH lets the generated libraries and Python extensions find
    # each other without LD_LIBRARY_PATH.
    if ! env "${build_env[@]}" "$COLCON" --log-base "$COLCON_LOG" build \
            --build-base "$COLCON_BUILD" --install-base "$COLCON_INSTALL" \
            --paths "$ROOT/omnivision_interfaces" \
            --event-handlers console_direct+ desktop_notification- status- terminal_title- \
            --cmake-args -DBUILD_TESTING=OFF -DPython3_EXECUTABLE="$PY" \
                "-DCMAKE_INSTALL_RPATH=$IFACE_INSTALL/lib" \
            > "$SETUP_BUILD/colcon.log" 2>&1; then
        tail -n 40 "$SETUP_BUILD/colcon.log" >&2
        die "building omnivision_interfaces failed (full log: $SETUP_BUILD/colcon.log)"
    fi
    stamp_set interfaces "$IFACE_KEY"
else
    log "omnivision_interfaces up to date"
fi

# Make the generated package importable from the venv with no sourcing: a .pth file adds its
# Python directory to sys.path and loads its shared libraries before its first import (see
# scripts/_omnivision_interfaces_preload.py for why).
IFACE_PY="$(find "$IFACE_INSTALL" -path '*-packages/omnivision_interfaces/__init__.py' | head -n 1)"
[[ -n "$IFACE_PY" ]] || die "generated Python package not found under $IFACE_INSTALL"
install_if_changed() {  # content, destination
    if [[ "$(cat "$2" 2>/dev/null)" != "$1" ]]; then echo "$1" > "$2"; fi
}
install_if_changed "$(cat scripts/_omnivision_interfaces_preload.py)" \
    "$SITE/_omnivision_interfaces_preload.py"
install_if_changed "$(dirname "$(dirname "$IFACE_PY")")
import _omnivision_interfaces_preload; _omnivision_interfaces_preload.install('$IFACE_INSTALL/lib')" \
    "$SITE/omnivision_interfaces.pth"

# --- omnivision_ros -----------------------------------------------------------------------

PKG_KEY="$(cat setup.py setup.cfg package.xml | sha)-$DEPS_KEY"
if ! stamp_ok package "$PKG_KEY"; then
    log "installing omnivision_ros (editable) ..."
    # Dependencies are all pinned above; no build isolation keeps it offline and fast. PEP 517
    # (an editable wheel) puts the console scripts in .venv/bin; pip's older 'setup.py
    # develop' path would follow setup.cfg's script_dir, which is meant for colcon.
    pip_install --no-deps --no-build-isolation --use-pep517 -e "$ROOT"
    stamp_set package "$PKG_KEY"
else
    log "omnivision_ros up to date"
fi

log "ready: .venv/bin/python ($MODE)"
