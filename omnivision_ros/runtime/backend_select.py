"""Which inference backend a bundle runs on: TensorRT where it can, ONNX Runtime everywhere else."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from omnivision_ros.errors import OmniVisionError
from omnivision_ros.model.variants import TENSORRT_PRECISIONS, tensorrt_variant
from omnivision_ros.runtime import trt_engines as te
from omnivision_ros.runtime.backend import BUNDLE_BACKENDS
from omnivision_ros.runtime.trt_env import TensorRTProbe, probe_tensorrt


@dataclass(frozen=True)
class Selection:
    """The backend chosen for a bundle, why, and (for TensorRT) what the probe found, so opening the
    backend does not probe TensorRT and the GPU again."""

    backend: str
    reason: str
    probe: TensorRTProbe | None = None


def tensorrt_readiness(bundle, precision: str = "fp16") -> tuple[bool, str, TensorRTProbe | None]:
    """(ready, reason, probe): TensorRT runs here (a Runtime can be created on a visible GPU), and engines
    of `precision` exist or can be built from the bundle's graphs. `bundle`: an opened Bundle (or its path).
    Cheap: no hashing; opening the backend does the full engine check."""
    if precision not in TENSORRT_PRECISIONS:
        return False, (f"TensorRT engines come in {', '.join(TENSORRT_PRECISIONS)}, not {precision} "
                       "(that precision is a CPU variant)"), None
    try:
        probe = probe_tensorrt()
    except OmniVisionError as exc:
        return False, str(exc), None
    detail = probe.detail
    if not hasattr(bundle, "manifest"):
        from omnivision_ros.model.bundle import open_bundle

        try:
            bundle = open_bundle(bundle, verify="sizes")
        except OmniVisionError as exc:
            return False, f"{detail}, but the bundle cannot be read: {exc}", probe
    engines = Path(bundle.path) / te.ENGINES_DIR
    built = []
    if engines.is_dir():
        for path in sorted(engines.glob(f"*/{te.ENGINE_MANIFEST}")):
            try:
                manifest = te.read_manifest(path.parent)
            except OmniVisionError:
                continue
            if (manifest.get("tensorrt"), manifest.get("compute_capability"), manifest.get("precision")) == (
                probe.version, probe.gpu.compute_capability, precision
            ):
                built.append(path.parent.name)
    if built:
        return True, f"{detail}; engines in {te.ENGINES_DIR}/{built[-1]}", probe
    variant = tensorrt_variant(precision)
    if variant not in bundle.variants:
        return False, (
            f"{detail}, but the bundle has no {variant} graphs to build {precision} engines from "
            f"(it has: {', '.join(bundle.variants)}); re-export with the {variant} variant"
        ), probe
    return True, f"{detail}; no engines yet, they will be built from the {variant} graphs (takes minutes)", probe


def select_backend(
    requested: str,
    bundle,
    log: Callable[[str], None] | None = None,
    precision: str | None = None,
) -> Selection:
    """The backend for a bundle (an opened Bundle, or its path). `auto` takes TensorRT when it is ready for
    `precision` (None: fp16), else ONNX Runtime; an explicit `tensorrt` that cannot run raises
    OmniVisionError naming what is missing."""
    if requested not in BUNDLE_BACKENDS:
        raise OmniVisionError(f"unknown backend '{requested}' for a bundle; choose one of {', '.join(BUNDLE_BACKENDS)}")
    if requested == "onnxruntime":
        choice = Selection("onnxruntime", "requested")
    else:
        ready, reason, probe = tensorrt_readiness(bundle, precision or "fp16")
        if requested == "tensorrt" and not ready:
            raise OmniVisionError(f"backend 'tensorrt' cannot run: {reason}")
        choice = Selection("tensorrt", reason, probe) if ready else Selection("onnxruntime", f"TensorRT not used: {reason}")
    if log is not None:
        log(f"backend: {choice.backend} ({choice.reason})")
    return choice
