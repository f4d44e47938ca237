"""Writing a bundle's manifest.json and verification stamp: the one writer the exporters use.

`omnivision-export` writes a new bundle's manifest, `--cpu-variants` adds variants to it; both describe a
variant with `variant_entry` and record files with `commit`, so every manifest carries the same fields
(see model/bundle.py for the format and how it is read and verified).
"""
from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import json
import os
import platform
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import onnx

from omnivision_ros.model.bundle import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    OPSET,
    STAMP,
    sha256_file,
    stamp_entry,
)
from omnivision_ros.model.config import OmniVisionConfig
from omnivision_ros.model.variants import VariantSpec

_ONNX_DTYPES = {
    onnx.TensorProto.FLOAT: "float32",
    onnx.TensorProto.FLOAT16: "float16",
    onnx.TensorProto.INT32: "int32",
    onnx.TensorProto.INT64: "int64",
}
GRAPHS = ("vision", "decoder")


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


def variant_entry(root: Path, spec: VariantSpec, graphs: dict[str, str] | None = None, **details) -> dict:
    """The manifest entry of a variant whose graphs are already in `root`/spec.folder; `graphs` names a
    graph another variant holds instead ({"vision": "fp16/vision.onnx"}: shared, not copied)."""
    entry = {"precision": spec.io}
    for graph in GRAPHS:
        entry[graph] = (graphs or {}).get(graph, f"{spec.folder}{graph}.onnx")
    entry["data"] = [entry[graph] + ".data" for graph in GRAPHS]
    if spec.quantization is not None:
        entry["quantization"] = dataclasses.asdict(spec.quantization)  # what was built, not a second copy of it
    entry.update(details)
    entry["io"] = {graph: graph_io(root / entry[graph]) for graph in GRAPHS}
    return entry


def variant_files(entry: dict) -> list[str]:
    return [*(entry[graph] for graph in GRAPHS), *entry["data"]]


def new_manifest(config: OmniVisionConfig, source: str, **details) -> dict:
    """The fields of a new bundle's manifest; variants and files are added by the exporter and `commit`."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": config.name,
        "source": source,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "opset": OPSET,
        **details,
        "versions": {
            "omnivision_ros": _version("omnivision_ros"),
            "python": platform.python_version(),
            **{pkg: _version(pkg) for pkg in ("torch", "onnx", "onnxruntime")},
        },
        "variants": {},
        "files": {},
    }


def save_graph(model: onnx.ModelProto, path: Path) -> None:
    """An ONNX graph with its weights in one external file next to it (`<name>.data`)."""
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=path.name + ".data", size_threshold=1024)


@contextmanager
def staged_variant(root: Path, name: str) -> Iterator[Path]:
    """A scratch folder inside the bundle `root` to write one variant's files into: it replaces
    root/name when the block ends, and is removed when the block raises, so no reader ever sees a
    half-written variant."""
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.partial-", dir=root))
    try:
        yield staging
        os.chmod(staging, 0o755)  # mkdtemp makes it 0700
        target = Path(root) / name
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def read_manifest(root: Path) -> dict:
    return json.loads((Path(root) / MANIFEST).read_text())


def commit(root: Path, manifest: dict, files: Iterable[str]) -> None:
    """Hash `files` (relative to root) into the manifest and the stamp, then write both, each atomically.

    Files become world-readable (onnx writes external data 0600; bundles are read by other users).
    """
    root = Path(root)
    try:
        stamp = json.loads((root / STAMP).read_text())
    except (OSError, ValueError):
        stamp = {}
    for rel in files:
        path = root / rel
        os.chmod(path, 0o644)
        digest = sha256_file(path)
        manifest["files"][rel] = {"sha256": digest, "size": path.stat().st_size}
        stamp[rel] = stamp_entry(path, digest)
    manifest["files"] = dict(sorted(manifest["files"].items()))
    for name, text in ((STAMP, json.dumps(stamp, indent=1, sort_keys=True)), (MANIFEST, json.dumps(manifest, indent=2) + "\n")):
        tmp = root / (name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, root / name)  # the manifest last: it names the new files only once they are hashed
