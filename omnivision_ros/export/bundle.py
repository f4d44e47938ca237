"""Write a model bundle: config, tokenizer, ONNX graphs per precision, manifest (see model/bundle.py).

The bundle is assembled in a scratch directory beside the destination and moved into place at the
end, so an interrupted export never leaves a half-written bundle that looks complete.
"""
from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import shutil
import tempfile
from pathlib import Path

import onnx
from tqdm import tqdm

from omnivision_ros.errors import OmniVisionError
from omnivision_ros.export.onnx_export import OPSET, export_decoder, export_vision
from omnivision_ros.model.reference import OmniVisionReference
from omnivision_ros.model.tokenizer import TextTokenizer
from omnivision_ros.model.bundle import (
    CONFIG_FILE,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    PRECISIONS,
    STAMP,
    TOKENIZER_FILE,
    sha256_file,
    stamp_entry,
    variant_dir,
)

_ONNX_DTYPES = {
    onnx.TensorProto.FLOAT: "float32",
    onnx.TensorProto.FLOAT16: "float16",
    onnx.TensorProto.INT32: "int32",
    onnx.TensorProto.INT64: "int64",
}


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def graph_io(path: Path) -> dict:
    """{"inputs": {name: {"dtype", "shape"}}, "outputs": {...}} of an ONNX file (weights not loaded)."""
    graph = onnx.load(str(path), load_external_data=False).graph

    def describe(values):
        return {
            v.name: {
                "dtype": _ONNX_DTYPES.get(v.type.tensor_type.elem_type, str(v.type.tensor_type.elem_type)),
                "shape": [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim],
            }
            for v in values
        }

    return {"inputs": describe(graph.input), "outputs": describe(graph.output)}


def _prepare_destination(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise OmniVisionError(f"--out {out} is a file; give a directory for the bundle")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise OmniVisionError(f"--out {out} exists and is not empty; pass --force to replace a bundle there")
        if not (out / MANIFEST).is_file():
            raise OmniVisionError(f"--out {out} is not empty and holds no bundle ({MANIFEST}); refusing to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)


def export_bundle(
    model: OmniVisionReference,
    tokenizer: TextTokenizer,
    out: str | Path,
    precisions: tuple[str, ...] = ("fp32",),
    source: str = "",
    opset: int = OPSET,
    force: bool = False,
    progress: bool = True,
) -> Path:
    """Export `model` into the bundle directory `out`; fp32 is always written (the source of truth)."""
    out = Path(out)
    unknown = sorted(set(precisions) - set(PRECISIONS))
    if unknown:
        raise OmniVisionError(f"unknown precision(s) {unknown}; choose from {', '.join(PRECISIONS)}")
    precisions = tuple(p for p in PRECISIONS if p == "fp32" or p in precisions)
    _prepare_destination(out, force)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        steps = 2 * len(precisions) + 1
        with tqdm(total=steps, desc="export", unit="step", disable=not progress) as bar:
            model.config.save(staging / CONFIG_FILE)
            tokenizer.save(staging / TOKENIZER_FILE)
            variants = {}
            for precision in precisions:
                folder = variant_dir(precision)
                (staging / folder).mkdir(exist_ok=True)
                entry = {"precision": precision, "vision": folder + "vision.onnx", "decoder": folder + "decoder.onnx"}
                bar.set_description(f"{precision} vision")
                export_vision(model, staging / entry["vision"], precision, opset)
                bar.update()
                bar.set_description(f"{precision} decoder")
                export_decoder(model, staging / entry["decoder"], precision, opset)
                bar.update()
                entry["data"] = [entry["vision"] + ".data", entry["decoder"] + ".data"]
                entry["io"] = {g: graph_io(staging / entry[g]) for g in ("vision", "decoder")}
                variants[precision] = entry
            bar.set_description("hashing")
            files, stamp = {}, {}
            for path in sorted(p for p in staging.rglob("*") if p.is_file()):
                rel = path.relative_to(staging).as_posix()
                os.chmod(path, 0o644)  # onnx writes external data 0600; bundles are read by other users
                digest = sha256_file(path)
                files[rel] = {"sha256": digest, "size": path.stat().st_size}
                stamp[rel] = stamp_entry(path, digest)
            bar.update()
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "model": model.config.name,
            "source": source,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "opset": opset,
            "exporter": "torch.onnx.export (TorchScript-based, dynamo=False)",
            "versions": {
                "omnivision_ros": _version("omnivision_ros"),
                "python": platform.python_version(),
                **{pkg: _version(pkg) for pkg in ("torch", "transformers", "onnx", "onnxruntime")},
            },
            "variants": variants,
            "files": files,
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        (staging / STAMP).write_text(json.dumps(stamp, indent=1, sort_keys=True))
        os.chmod(staging, 0o755)  # mkdtemp makes it 0700
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / "bundle")
            os.replace(staging, out)
            shutil.rmtree(old)
        else:
            os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out
