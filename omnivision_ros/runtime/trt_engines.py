"""TensorRT engine identity and format as plain functions: cache keys, the engine manifest, the
reuse-or-rebuild decision, and optimization-profile shapes. The builder (export/tensorrt_build.py) and the
runtime (runtime/tensorrt_backend.py) both use these and neither imports the other. No tensorrt, no torch,
no CUDA here, so all of it is unit-tested on machines without a GPU.

Layout inside a model bundle:

    engines/
      timing-trt10.3.0-sm87.cache          tactic timings, shared by every build on this TRT + GPU
      trt10.3.0-sm87-fp16-1a2b3c4d5e6f/    one folder per engine key
        vision.plan  decoder.plan  engine.json

The key names what an engine can only be used with (TensorRT version, GPU compute capability,
precision, the exact ONNX graphs); `engine.json` also records the build options (profile ranges,
lm_head split), which decide whether an engine fits a request.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

from omnivision_ros.errors import OmniVisionError
from omnivision_ros.model.config import OmniVisionConfig
from omnivision_ros.model.variants import TENSORRT_PRECISIONS, tensorrt_variant

ENGINES_DIR = "engines"
ENGINE_MANIFEST = "engine.json"
ENGINE_FORMAT = 1
GRAPHS = ("vision", "decoder")

# Orin Nano has 8 GB shared by CPU and GPU; 1 GiB of builder scratch leaves room for the
# ~1 GB of fp16 weights the builder holds while timing tactics. Larger GPUs may raise it.
DEFAULT_WORKSPACE_MB = 1024
DEFAULT_MAX_PREFILL = 512  # covers the ~110-token prompt prefix plus a question in one call

PREFILL_PROFILE = 0  # T tokens >= 1 on a past of P >= 0 tokens (P = 0: the first call)
DECODE_PROFILE = 1  # one token on a past of P >= 1 tokens


@dataclass(frozen=True)
class EngineOptions:
    """What an engine is built for, besides the key. None = derive from the model config."""

    precision: str = "fp16"
    max_cameras: int = 4  # vision batch: frames encoded in one call
    opt_cameras: int = 1
    max_context: int | None = None  # past + new tokens; default config.lm_max_context
    max_prefill: int | None = None  # tokens per prefill call (longer prompts go in chunks); default min(512, max_context)
    opt_prefill: int = 128  # ~ the prompt prefix (system + header + 81 image tokens)
    opt_past: int = 256  # typical past length while decoding
    lm_head_parts: int = 1  # >1: decoder built from a copy with the lm_head split (Orin Nano)
    workspace_mb: int = DEFAULT_WORKSPACE_MB

    def resolved(self, config: OmniVisionConfig) -> "EngineOptions":
        """Fill defaults from the config and check the ranges; raises OmniVisionError."""
        max_context = self.max_context or config.lm_max_context
        max_prefill = self.max_prefill or min(DEFAULT_MAX_PREFILL, max_context)
        opts = dataclasses.replace(self, max_context=max_context, max_prefill=max_prefill)
        problems = []
        if opts.precision not in TENSORRT_PRECISIONS:
            problems.append(f"precision '{opts.precision}' is not one of {', '.join(TENSORRT_PRECISIONS)}")
        if opts.max_cameras < 1 or not 1 <= opts.opt_cameras <= opts.max_cameras:
            problems.append(f"need 1 <= opt_cameras ({opts.opt_cameras}) <= max_cameras ({opts.max_cameras})")
        if max_context < 2:
            problems.append(f"max_context must be at least 2, got {max_context}")
        if not 1 <= opts.max_prefill <= max_context:
            problems.append(f"max_prefill ({opts.max_prefill}) must be in 1..max_context ({max_context})")
        if opts.lm_head_parts < 1:
            problems.append(f"lm_head_parts must be at least 1, got {opts.lm_head_parts}")
        if opts.lm_head_parts > config.lm_vocab:
            problems.append(f"lm_head_parts ({opts.lm_head_parts}) exceeds the vocabulary ({config.lm_vocab})")
        if opts.workspace_mb < 64:
            problems.append(f"workspace_mb must be at least 64, got {opts.workspace_mb}")
        if problems:
            raise OmniVisionError("invalid TensorRT engine options: " + "; ".join(problems))
        # Optimum shapes only steer tactic choice: clamp them into range instead of failing.
        return dataclasses.replace(
            opts,
            opt_prefill=min(max(opts.opt_prefill, 1), opts.max_prefill),
            opt_past=min(max(opts.opt_past, 1), max_context - 1),
        )

    def profile_fields(self) -> dict:
        """The options an engine's shapes and graph depend on (workspace only affects speed)."""
        data = dataclasses.asdict(self)
        data.pop("workspace_mb")
        return data


# ---------------------------------------------------------------------------------------------
# Cache key


def onnx_digest(file_hashes: dict[str, str]) -> str:
    """One sha256 over the graph files an engine is built from: {relative path: sha256 of file}.

    Covers the .onnx files and their external weight data, so a re-export with new weights
    gives a new key even when the graph structure is the same.
    """
    if not file_hashes:
        raise OmniVisionError("no ONNX files to hash for the engine key")
    h = hashlib.sha256()
    for name in sorted(file_hashes):
        h.update(f"{name}\0{file_hashes[name]}\n".encode())
    return h.hexdigest()


def engine_key(trt_version: str, compute_capability: str, precision: str, digest: str) -> str:
    """Folder name under engines/: 'trt10.3.0-sm87-fp16-1a2b3c4d5e6f'."""
    if not re.fullmatch(r"[0-9][0-9A-Za-z.]*", trt_version):
        raise OmniVisionError(f"unexpected TensorRT version string '{trt_version}'")
    if not re.fullmatch(r"[0-9]+\.[0-9]+", compute_capability):
        raise OmniVisionError(f"unexpected GPU compute capability '{compute_capability}'")
    if precision not in TENSORRT_PRECISIONS:
        raise OmniVisionError(f"unknown engine precision '{precision}'")
    sm = compute_capability.replace(".", "")
    return f"trt{trt_version}-sm{sm}-{precision}-{digest[:12]}"


def timing_cache_name(trt_version: str, compute_capability: str) -> str:
    """Timing caches only transfer between builds with the same TensorRT and GPU."""
    return f"timing-trt{trt_version}-sm{compute_capability.replace('.', '')}.cache"


# ---------------------------------------------------------------------------------------------
# Engine manifest and the reuse decision


@dataclass(frozen=True)
class EngineTarget:
    """The identity an engine must match to be loadable here (everything in the key)."""

    trt_version: str
    compute_capability: str  # "8.7"
    precision: str
    onnx_digest: str

    @property
    def key(self) -> str:
        return engine_key(self.trt_version, self.compute_capability, self.precision, self.onnx_digest)


def engine_target(bundle, precision: str, trt_version: str, compute_capability: str) -> EngineTarget:
    """The engine identity of a bundle's `precision` on a TensorRT version and GPU. Verifies the variant's
    graph files against the bundle manifest (their hashes make the key)."""
    bundle.variant(tensorrt_variant(precision))  # verifies the files
    return EngineTarget(trt_version, compute_capability, precision, onnx_digest(variant_sources(bundle, precision)))


def variant_sources(bundle, precision: str) -> dict[str, str]:
    """{relative path: sha256} of the graph and weight files TensorRT engines of `precision` are built from."""
    entry = bundle.manifest["variants"][tensorrt_variant(precision)]
    return {rel: bundle.file_sha256(rel) for rel in [entry["vision"], entry["decoder"], *entry.get("data", [])]}


@dataclass(frozen=True)
class Decision:
    reuse: bool
    reason: str  # one line for the log, e.g. "rebuild ...: build option changed (max_context 2048 -> 4096)"


def new_manifest(
    target: EngineTarget,
    options: EngineOptions,
    gpu_name: str,
    sources: dict[str, str],
    profiles: dict[str, list[dict]],
    engine_files: dict[str, dict],
    build_seconds: dict[str, float],
) -> dict:
    """engine.json content. sources: {relative ONNX path: sha256}; engine_files: {graph: {file, size}}."""
    return {
        "format": ENGINE_FORMAT,
        "key": target.key,
        "tensorrt": target.trt_version,
        "compute_capability": target.compute_capability,
        "gpu": gpu_name,
        "precision": target.precision,
        "onnx_digest": target.onnx_digest,
        "sources": dict(sorted(sources.items())),
        "options": dataclasses.asdict(options),
        # {graph: [{input: [min, opt, max]} per profile]}
        "profiles": {graph: [{name: [list(s) for s in shapes] for name, shapes in p.items()} for p in plist]
                     for graph, plist in profiles.items()},
        "engines": engine_files,
        "build_seconds": {k: round(v, 1) for k, v in build_seconds.items()},
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def write_manifest(folder: Path, manifest: dict) -> None:
    tmp = folder / (ENGINE_MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    tmp.replace(folder / ENGINE_MANIFEST)  # the manifest appears last and atomically: it marks a complete build


def read_manifest(folder: Path) -> dict:
    path = folder / ENGINE_MANIFEST
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise OmniVisionError(f"{path} does not exist") from None
    except (OSError, ValueError) as exc:
        raise OmniVisionError(f"cannot read engine manifest {path}: {exc}") from exc
    found = data.get("format") if isinstance(data, dict) else None
    if found != ENGINE_FORMAT:
        raise OmniVisionError(f"{path} has format {found}, expected {ENGINE_FORMAT}")
    return data


def _describe(manifest: dict) -> str:
    return (
        f"TensorRT {manifest.get('tensorrt')}, sm {manifest.get('compute_capability')}, "
        f"{manifest.get('precision')}, ONNX {str(manifest.get('onnx_digest', ''))[:12]}"
    )


def _mismatch(manifest: dict, target: EngineTarget) -> str | None:
    """What differs between an engine manifest and the target identity, or None."""
    for field, label, want in (
        ("tensorrt", "TensorRT", target.trt_version),
        ("compute_capability", "GPU compute capability", target.compute_capability),
        ("precision", "precision", target.precision),
    ):
        if manifest.get(field) != want:
            return f"it was built for {label} {manifest.get(field)}, this is {want}"
    if manifest.get("onnx_digest") != target.onnx_digest:
        was = str(manifest.get("onnx_digest"))[:12]
        return f"the ONNX graphs changed since it was built ({was} -> {target.onnx_digest[:12]})"
    return None


def options_mismatch(built: dict, wanted: EngineOptions) -> str | None:
    """First build option that differs, as 'max_context 2048 -> 4096'; None when all match."""
    for name, value in wanted.profile_fields().items():
        if built.get(name) != value:
            return f"{name} {built.get(name)} -> {value}"
    return None


def decide(engines_root: Path, target: EngineTarget, wanted: EngineOptions | None) -> Decision:
    """Reuse the engine folder for `target`, or say why it has to be (re)built.

    wanted=None accepts whatever options the existing engine was built with (the runtime case:
    `omnivision-build-engines --max-context 2048` must not be undone by a node starting with
    defaults); the builder passes its options so a changed option triggers a rebuild.
    """
    folder = engines_root / target.key
    manifest_path = folder / ENGINE_MANIFEST
    if not manifest_path.exists():
        others = []
        if engines_root.is_dir():
            for path in sorted(engines_root.glob(f"*/{ENGINE_MANIFEST}")):
                try:
                    other = read_manifest(path.parent)
                except OmniVisionError:
                    continue
                why = _mismatch(other, target)
                if why:
                    others.append(f"{path.parent.name} cannot be used: {why}")
        detail = f" ({'; '.join(others)})" if others else ""
        return Decision(False, f"build: no engines for {target.key} yet{detail}")
    try:
        manifest = read_manifest(folder)
    except OmniVisionError as exc:
        return Decision(False, f"rebuild: {exc}")
    why = _mismatch(manifest, target)
    if why:
        return Decision(False, f"rebuild {target.key}: {why}")
    for graph in GRAPHS:
        entry = manifest.get("engines", {}).get(graph)
        if not entry:
            return Decision(False, f"rebuild {target.key}: engine.json lists no {graph} engine")
        path = folder / entry["file"]
        if not path.is_file():
            return Decision(False, f"rebuild {target.key}: {path.name} is missing")
        if path.stat().st_size != entry.get("size"):
            size = path.stat().st_size
            return Decision(False, f"rebuild {target.key}: {path.name} has {size} bytes, engine.json says {entry.get('size')}")
    if wanted is not None:
        changed = options_mismatch(manifest.get("options", {}), wanted)
        if changed:
            return Decision(False, f"rebuild {target.key}: build option changed ({changed})")
    return Decision(True, f"reuse {target.key} ({_describe(manifest)})")


# ---------------------------------------------------------------------------------------------
# Optimization profiles: {input name: (min, opt, max)} per profile


Shape = tuple[int, ...]
Profile = dict[str, tuple[Shape, Shape, Shape]]


def vision_profiles(config: OmniVisionConfig, options: EngineOptions) -> list[Profile]:
    """One profile: batch 1..max_cameras frames (several cameras encoded in one call)."""
    s = config.vit_image_size
    return [
        {
            "pixel_values": (
                (1, 3, s, s),
                (options.opt_cameras, 3, s, s),
                (options.max_cameras, 3, s, s),
            )
        }
    ]


def decoder_profiles(config: OmniVisionConfig, options: EngineOptions) -> list[Profile]:
    """Profile 0 (prefill): T in 1..max_prefill on a past P in 0..max_context-1, tuned for an empty
    past (the first call) -- later prefills, e.g. a question after a cached image prefix, use it
    too. Profile 1 (decode): T = 1 on a past P in 1..max_context-1.

    P = 0 is an empty tensor. TensorRT accepts 0 in profile dimensions (IOptimizationProfile.set_shape
    documents 0 <= min <= opt <= max) and empty input tensors; T + P <= max_context is checked by
    the runtime, since a profile cannot express it.
    """
    max_ctx = options.max_context or config.lm_max_context
    kv, hd, tok = config.lm_kv_heads, config.lm_head_dim, config.mp_tokens
    embeds = (1, tok, config.lm_hidden)

    def profile(t: tuple[int, int, int], p: tuple[int, int, int]) -> Profile:
        shapes: Profile = {
            "input_ids": ((1, t[0]), (1, t[1]), (1, t[2])),
            "position_ids": ((1, t[0]), (1, t[1]), (1, t[2])),
            "image_embeds": (embeds, embeds, embeds),
        }
        for i in range(config.lm_layers):
            for kind in ("key", "value"):
                shapes[f"past_{kind}_{i}"] = ((1, kv, p[0], hd), (1, kv, p[1], hd), (1, kv, p[2], hd))
        return shapes

    prefill = profile((1, options.opt_prefill, options.max_prefill), (0, 0, max_ctx - 1))
    decode = profile((1, 1, 1), (1, options.opt_past, max_ctx - 1))
    return [prefill, decode]


def choose_profile(new_tokens: int, past_tokens: int) -> int:
    """Profile for a decoder call: one token on a non-empty past decodes, anything else prefills."""
    if new_tokens < 1 or past_tokens < 0:
        raise OmniVisionError(f"bad decoder call: {new_tokens} new tokens on a past of {past_tokens}")
    return DECODE_PROFILE if new_tokens == 1 and past_tokens >= 1 else PREFILL_PROFILE


def prefill_chunks(num_tokens: int, max_prefill: int) -> list[tuple[int, int]]:
    """[start, end) slices of a prompt, each at most max_prefill tokens (one engine call each)."""
    return [(s, min(s + max_prefill, num_tokens)) for s in range(0, num_tokens, max_prefill)]


# ---------------------------------------------------------------------------------------------
# Memory arithmetic (for logs, docs and the guide; exact from the config)


def kv_bytes_per_token(config: OmniVisionConfig, itemsize: int) -> int:
    """K and V of every layer for one token: 24 x 2 x 2 x 64 x 2 B = 12 KiB in fp16 at full size."""
    return config.lm_layers * 2 * config.lm_kv_heads * config.lm_head_dim * itemsize


def session_kv_bytes(config: OmniVisionConfig, max_context: int, itemsize: int) -> int:
    """Device bytes of one session's KV cache: past and present buffers at max_context."""
    return 2 * max_context * kv_bytes_per_token(config, itemsize)
