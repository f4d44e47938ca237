"""Which inference backend a bundle runs on: TensorRT where it can, ONNX Runtime everywhere else."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from omnivision_ros.errors import OmniVisionError
from omnivision_ros.runtime import trt_engines as te
from omnivision_ros.runtime.backend import BUNDLE_BACKENDS


def tensorrt_readiness(bundle_path: str | Path, precision: str = "fp16") -> tuple[bool, str]:
    """(ready, reason): TensorRT imports, a GPU is visible, and engines exist or can be built.

    "Can be built" means the bundle has the graphs of `precision` (the builder is part of the
    tensorrt package). Cheap: no hashing; opening the backend does the full engine check.
    """
    from omnivision_ros.runtime.tensorrt_backend import probe_tensorrt

    try:
        version, gpu = probe_tensorrt()
    except OmniVisionError as exc:
        return False, str(exc)
    detail = f"TensorRT {version} on {gpu.name} (sm {gpu.compute_capability})"
    root = Path(bundle_path)
    engines = root / te.ENGINES_DIR
    built = []
    if engines.is_dir():
        for path in sorted(engines.glob(f"*/{te.ENGINE_MANIFEST}")):
            try:
                manifest = te.read_manifest(path.parent)
            except OmniVisionError:
                continue
            if (manifest.get("tensorrt"), manifest.get("compute_capability"), manifest.get("precision")) == (
                version, gpu.compute_capability, precision
            ):
                built.append(path.parent.name)
    if built:
        return True, f"{detail}; engines in {te.ENGINES_DIR}/{built[-1]}"
    try:
        from omnivision_ros.model.bundle import open_bundle

        variants = open_bundle(root, verify="sizes").variants
    except OmniVisionError as exc:
        return False, f"{detail}, but the bundle cannot be read: {exc}"
    if precision not in variants:
        return False, (
            f"{detail}, but the bundle has no {precision} graphs to build engines from (it has: {', '.join(variants)}); "
            f"re-export with the {precision} variant"
        )
    return True, f"{detail}; no engines yet, they will be built from the {precision} graphs (takes minutes)"


def select_backend(
    requested: str,
    bundle_path: str | Path,
    log: Callable[[str], None] | None = None,
    precision: str = "fp16",
) -> tuple[str, str]:
    """(backend, reason) for a bundle. `auto` takes TensorRT when it is ready, else ONNX Runtime;
    an explicit `tensorrt` that cannot run raises OmniVisionError naming what is missing."""
    if requested not in BUNDLE_BACKENDS:
        raise OmniVisionError(f"unknown backend '{requested}' for a bundle; choose one of {', '.join(BUNDLE_BACKENDS)}")
    if requested == "onnxruntime":
        choice = ("onnxruntime", "requested")
    else:
        ready, reason = tensorrt_readiness(bundle_path, precision)
        if requested == "tensorrt" and not ready:
            raise OmniVisionError(f"backend 'tensorrt' cannot run: {reason}")
        choice = ("tensorrt", reason) if ready else ("onnxruntime", f"TensorRT not used: {reason}")
    if log is not None:
        log(f"backend: {choice[0]} ({choice[1]})")
    return choice
