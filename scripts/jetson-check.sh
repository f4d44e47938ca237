#!/usr/bin/env bash
# One-time device check for a Jetson (or any machine with TensorRT): versions, memory, then TensorRT
# engines for a tiny bundle and a full-size one, each checked against ONNX Runtime with omnivision-verify.
# Everything goes to a one-page report to attach to a bug report.
#
#   scripts/jetson-check.sh TINY_BUNDLE [FULL_BUNDLE] [REPORT]
#
# TINY_BUNDLE: `omnivision-export --model tiny --out tiny-bundle --fp16 --gpu-int4` (made on any machine with
# torch, copied over); FULL_BUNDLE: the real bundle exported the same way. Steps that fail are recorded and the
# script goes on; its exit status is the number of failed steps.
set -u
TINY=${1:?usage: jetson-check.sh TINY_BUNDLE [FULL_BUNDLE] [REPORT]}
FULL=${2:-}
REPORT=${3:-jetson-report-$(date +%Y%m%d-%H%M%S).txt}
FAILED=0
PY=${PYTHON:-python3}

section() { printf '\n== %s\n' "$*" | tee -a "$REPORT"; }
step() {  # step LABEL COMMAND...: run, keep the last 40 lines of its output in the report
    local label=$1; shift
    local out rc start=$SECONDS
    out=$("$@" 2>&1); rc=$?
    printf -- '-- %s: exit %d in %ds\n' "$label" "$rc" "$((SECONDS - start))" | tee -a "$REPORT"
    printf '%s\n' "$out" | tail -n 40 >> "$REPORT"
    [ "$rc" -eq 0 ] || FAILED=$((FAILED + 1))
}

: > "$REPORT"
section "versions"
{
    echo "date: $(date -Is)"
    echo "host: $(uname -a)"
    echo "L4T: $(head -n 1 /etc/nv_tegra_release 2>/dev/null || echo 'not a Jetson (no /etc/nv_tegra_release)')"
    echo "JetPack: $(dpkg-query -W -f='${Version}' nvidia-jetpack 2>/dev/null || echo 'nvidia-jetpack not installed')"
    echo "model: $(tr -d '\0' < /proc/device-tree/model 2>/dev/null || echo '?')"
    echo "power mode: $(nvpmodel -q 2>/dev/null | head -n 2 | tr '\n' ' ' || echo '?')"
    echo "CUDA toolkit: $(cat /usr/local/cuda/version.json 2>/dev/null | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["cuda"]["version"])' 2>/dev/null || nvcc --version 2>/dev/null | tail -n 1 || echo '?')"
    echo "python: $("$PY" --version 2>&1)"
    "$PY" - <<'PYEOF' 2>&1
import importlib.metadata as md
for name in ("tensorrt", "cuda-python", "cuda-bindings", "onnxruntime", "onnxruntime-gpu", "onnx", "numpy", "omnivision_ros"):
    try:
        print(f"{name}: {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"{name}: not installed")
try:
    import tensorrt
    print(f"tensorrt imports: {tensorrt.__version__}")
except Exception as exc:
    print(f"tensorrt does not import: {exc}")
from omnivision_ros.runtime.trt_env import tensorrt_status
print("tensorrt_status:", tensorrt_status())
PYEOF
} | tee -a "$REPORT"

section "memory"
{
    grep -E '^(MemTotal|MemAvailable|CmaTotal|CmaFree|SwapTotal|SwapFree)' /proc/meminfo
    echo "kernel command line cma=: $(grep -o 'cma=[^ ]*' /proc/cmdline || echo 'not set (default pool)')"
} | tee -a "$REPORT"

section "tiny bundle: $TINY"
step "build fp16 engines (tiny)" omnivision-build-engines "$TINY" --max-context 512
step "verify fp16 with CUDA graphs (tiny)" omnivision-verify "$TINY" --steps 8 --cuda-graphs --no-build
step "build int4 engines (tiny)" omnivision-build-engines "$TINY" --precision int4 --max-context 512
step "verify int4 (tiny)" omnivision-verify "$TINY" --precision int4 --steps 8 --no-build

if [ -n "$FULL" ]; then
    section "full bundle: $FULL"
    step "build fp16 engines (full)" omnivision-build-engines "$FULL" --max-context 1024
    step "verify fp16 (full)" omnivision-verify "$FULL" --steps 16 --cuda-graphs --no-build
    step "build int4 engines (full)" omnivision-build-engines "$FULL" --precision int4 --max-context 1024
    step "verify int4 (full)" omnivision-verify "$FULL" --precision int4 --steps 16 --no-build
    section "memory after the full-size runs"
    grep -E '^(MemAvailable|CmaFree)' /proc/meminfo | tee -a "$REPORT"
fi

section "summary: $FAILED failed step(s); report in $REPORT"
exit "$FAILED"
