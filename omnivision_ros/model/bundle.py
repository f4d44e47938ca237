"""Model bundle: the graph contract's names, and opening + verifying a bundle directory (no torch).

A bundle is one directory written by `omnivision-export`:

    config.json  tokenizer.json  manifest.json
    vision.onnx(.data)  decoder.onnx(.data)          fp32 graphs, the source of truth
    fp16/vision.onnx(.data)  fp16/decoder.onnx(.data)  optional float16 variant (GPUs)
    <name>/...                                         other variants, e.g. a CPU-quantized one
    engines/<key>/                                     TensorRT engines, built on the target

`manifest.json` lists every file with its sha256 and size, the variants present, the graphs' I/O
and the versions used. Verification on open: every listed file must exist with its listed size
(always checked). sha256 is checked when asked (`verify="full"`), and otherwise (`verify="auto"`)
only for files whose size or modification time differ from `.verified.json`, a stamp kept in the
bundle (written at export, refreshed after a successful hash; skipped when the directory is read-only,
which then means hashing on every open). So an edited or replaced file is caught at the next start
without re-hashing 2 GB each time; corruption that keeps size and mtime needs `verify="full"`.
Graph files are hashed when a variant is first used (`Bundle.variant`), not for variants left unused.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from omnivision_ros.errors import OmniVisionError
from omnivision_ros.model.config import OmniVisionConfig
from omnivision_ros.model.variants import IO_DTYPES

FORMAT = "omnivision-bundle"
# 2: config.json without the generation defaults (gen_max_new_tokens, stop_token_ids), vision graph weights
# named after the model's parameters. Bundles of format 1 still open and run.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
LEGACY_CONFIG_FIELDS = {1: ("gen_max_new_tokens", "stop_token_ids")}  # written by format 1, read no more
MANIFEST = "manifest.json"
STAMP = ".verified.json"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
VERIFY_MODES = ("auto", "full", "sizes")

# Graph contract (DESIGN §3); shared by the exporter, the CPU variants, ONNX Runtime and TensorRT.
OPSET = 17  # standard-op graphs
OPSET_RANGE = (17, 19)  # what TensorRT 10.3 (JetPack 6) parses
ONNX_IR_VERSION = 10  # written into built graphs: onnx 1.23 writes IR 14 by default, onnxruntime 1.31 reads up to 13
CONTROL_FLOW_OPS = ("If", "Loop", "Scan")  # never in a graph: TensorRT and the CPU variants want straight-line graphs
VISION_INPUTS = ("pixel_values",)  # [batch, 3, S, S]
VISION_OUTPUTS = ("image_embeds",)  # [batch, mp_tokens, lm_hidden]


def decoder_input_names(config: OmniVisionConfig) -> list[str]:
    """input_ids [batch, seq] int32, image_embeds [batch, mp_tokens, H], position_ids [batch, seq] int32,
    then past_key_i / past_value_i [batch, kv, past, hd] per layer."""
    names = ["input_ids", "image_embeds", "position_ids"]
    for i in range(config.lm_layers):
        names += [f"past_key_{i}", f"past_value_{i}"]
    return names


def decoder_output_names(config: OmniVisionConfig) -> list[str]:
    """logits [batch, vocab] float32 (last position), then present_key_i / present_value_i [batch, kv, total, hd]."""
    names = ["logits"]
    for i in range(config.lm_layers):
        names += [f"present_key_{i}", f"present_value_{i}"]
    return names


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class Variant:
    """One variant's pair of graphs, paths absolute. Variants are named by folder ("fp32", "fp16", or a
    derived one such as "cpu-int8"); `precision` is the dtype its inputs, outputs and cache use."""

    name: str
    precision: str
    vision: Path
    decoder: Path
    io: dict  # {"vision": {"inputs": {name: {dtype, shape}}, "outputs": ...}, "decoder": ...}


@dataclass
class Bundle:
    path: Path
    manifest: dict
    config: OmniVisionConfig
    verify: str = "auto"
    _verified: set = field(default_factory=set)

    @property
    def tokenizer_path(self) -> Path:
        return self.path / TOKENIZER_FILE

    @property
    def format_version(self) -> int:
        return int(self.manifest["format_version"])

    @property
    def variants(self) -> list[str]:
        return list(self.manifest["variants"])

    def variant(self, name: str) -> Variant:
        """The graphs of variant `name`, their files verified (hashes per the bundle's verify mode)."""
        entry = self.manifest["variants"].get(name)
        if entry is None:
            raise OmniVisionError(
                f"bundle {self.path} has no '{name}' variant; it has: {', '.join(self.variants)}"
            )
        files = [entry["vision"], entry["decoder"], *entry.get("data", [])]
        if name not in self._verified:
            _verify_files(self.path, self.manifest["files"], files, self.verify)
            self._verified.add(name)
        return Variant(name, entry["precision"], self.path / entry["vision"], self.path / entry["decoder"],
                       entry["io"])

    def file_sha256(self, relpath: str) -> str:
        """The manifest's hash of a file (engine keys include the ONNX hash)."""
        return self.manifest["files"][relpath]["sha256"]


def _fail(path: Path, problem: str) -> OmniVisionError:
    return OmniVisionError(f"model bundle {path}: {problem}; re-export it with omnivision-export")


def _read_stamp(root: Path) -> dict:
    try:
        return json.loads((root / STAMP).read_text())
    except (OSError, ValueError):
        return {}


def _write_stamp(root: Path, stamp: dict) -> None:
    try:
        tmp = root / (STAMP + ".tmp")
        tmp.write_text(json.dumps(stamp, indent=1, sort_keys=True))
        os.replace(tmp, root / STAMP)
    except OSError:
        pass  # read-only bundle: hashes are checked again on the next open


def stamp_entry(path: Path, sha256: str) -> dict:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256}


def _verify_files(root: Path, listed: dict, relpaths: list[str], mode: str) -> None:
    """Presence and size always; sha256 per `mode` (see the module docstring)."""
    stamp = _read_stamp(root) if mode == "auto" else {}
    to_hash = []
    for rel in relpaths:
        expected = listed.get(rel)
        if expected is None:
            raise _fail(root, f"the manifest names '{rel}' but does not list its hash and size")
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise _fail(root, f"the manifest names '{rel}', a path outside the bundle")
        path = root / rel
        if not path.is_file():
            raise _fail(root, f"file '{rel}' is missing")
        st = path.stat()
        if st.st_size != expected["size"]:
            raise _fail(root, f"file '{rel}' has {st.st_size} bytes, the manifest says {expected['size']}"
                              " (changed or truncated)")
        seen = stamp.get(rel)
        unchanged = seen == {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": expected["sha256"]}
        if mode == "full" or (mode == "auto" and not unchanged):
            to_hash.append(rel)
    for rel in to_hash:
        digest = sha256_file(root / rel)
        if digest != listed[rel]["sha256"]:
            raise _fail(root, f"file '{rel}' does not match its sha256 in the manifest (changed or corrupt)")
        stamp[rel] = stamp_entry(root / rel, digest)
    if mode == "auto" and to_hash:
        _write_stamp(root, {**_read_stamp(root), **{rel: stamp[rel] for rel in to_hash}})


def _check_format(root: Path, manifest: dict) -> None:
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise _fail(root, f"{MANIFEST} is not an omnivision bundle manifest")
    version = manifest.get("format_version")
    if version not in READABLE_VERSIONS:
        raise _fail(root, f"bundle format version {version} is not one this omnivision_ros reads "
                          f"({', '.join(map(str, READABLE_VERSIONS))})")
    for key in ("files", "variants"):
        if not isinstance(manifest.get(key), dict) or not manifest[key]:
            raise _fail(root, f"{MANIFEST} has no '{key}'")


def _check_manifest(root: Path, manifest: dict, config: OmniVisionConfig) -> None:
    """The manifest agrees with config.json: model name, and every variant's graph I/O names."""
    if manifest.get("model") != config.name:
        raise _fail(root, f"{MANIFEST} is for model '{manifest.get('model')}' "
                          f"but {CONFIG_FILE} describes '{config.name}'")
    expected = {
        "vision": (list(VISION_INPUTS), list(VISION_OUTPUTS)),
        "decoder": (decoder_input_names(config), decoder_output_names(config)),
    }
    for name, entry in manifest["variants"].items():
        if entry.get("precision") not in IO_DTYPES:
            raise _fail(root, f"variant '{name}' has unknown precision {entry.get('precision')!r}")
        for graph, (inputs, outputs) in expected.items():
            io = entry.get("io", {}).get(graph, {})
            if list(io.get("inputs", {})) != inputs or list(io.get("outputs", {})) != outputs:
                raise _fail(
                    root,
                    f"{MANIFEST}: the {name} {graph} graph's inputs/outputs do not match {CONFIG_FILE} "
                    f"({config.lm_layers} decoder layers)",
                )


def _read_config(root: Path, version: int) -> OmniVisionConfig:
    """config.json, with the fields an older format wrote and this one no longer has left out."""
    try:
        data = json.loads((root / CONFIG_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise _fail(root, f"cannot read {CONFIG_FILE}: {exc}") from exc
    if not isinstance(data, dict):
        raise _fail(root, f"{CONFIG_FILE} does not hold a model config")
    for key in LEGACY_CONFIG_FIELDS.get(version, ()):
        data.pop(key, None)
    return OmniVisionConfig.from_dict(data)


def open_bundle(path: str | Path, verify: str = "auto") -> Bundle:
    """Open a bundle directory: manifest, config and tokenizer checked now, graphs when a variant is used.

    verify: "auto" (hash files whose size/mtime changed since the last check), "full" (hash everything
    used), "sizes" (presence and sizes only).
    """
    if verify not in VERIFY_MODES:
        raise OmniVisionError(f"unknown verify mode '{verify}'; choose one of {', '.join(VERIFY_MODES)}")
    root = Path(path)
    manifest_path = root / MANIFEST
    if not manifest_path.is_file():
        raise OmniVisionError(f"{root} is not a model bundle: it has no {MANIFEST}")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as exc:
        raise _fail(root, f"cannot read {MANIFEST}: {exc}") from exc
    _check_format(root, manifest)
    # config.json and tokenizer.json are small: verified before they are read.
    _verify_files(root, manifest["files"], [CONFIG_FILE, TOKENIZER_FILE], verify)
    config = _read_config(root, manifest["format_version"])
    _check_manifest(root, manifest, config)
    return Bundle(root, manifest, config, verify)
