"""omnivision-build-engines: build the TensorRT engines of a model bundle on the target device.

Parses the bundle's vision.onnx and decoder.onnx (the fp16 variant for --precision fp16) with
TensorRT's ONNX parser, builds strongly typed engines (every tensor keeps the type the ONNX graph
gives it: fp16 weights and activations, fp32 norms, softmax and logits, exactly as exported) with
explicit optimization profiles, and writes them to engines/<key>/ with an engine.json saying what
they were built from. A matching engine is reused; a mismatched one is rebuilt, with a log line
saying why. Tactic timings persist in engines/timing-*.cache, so rebuilds are faster.

Precision int4 builds from the bundle's gpu-int4 variant (weight-only INT4 decoder matrices through
DequantizeLinear, export/gpu_int4.py) and its fp16 vision graph.

`split_lm_head` is the Orin Nano option (DESIGN §3): the default CMA pool can fail to allocate the
fused 151936 x 896 lm_head weight, so the decoder is built from a copy whose lm_head MatMul is split
along the vocabulary into N MatMuls joined by a Concat (same logits, N smaller weights).
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

from omnivision_ros.errors import OmniVisionError
from omnivision_ros.model.variants import TENSORRT_PRECISIONS, tensorrt_variant
from omnivision_ros.runtime import trt_engines as te
from omnivision_ros.runtime import trt_env

# Ops between the lm_head matmul and the `logits` output that only cast or reshape.
_PASS_THROUGH = ("Cast", "Identity", "Reshape", "Squeeze", "Unsqueeze", "Flatten")


# ---------------------------------------------------------------------------------------------
# lm_head split (an ONNX rewrite with the `onnx` package; no TensorRT needed)


def _find_lm_head(graph, output: str):
    producers = {out: node for node in graph.node for out in node.output}
    name = output
    while name in producers:
        node = producers[name]
        if node.op_type in ("MatMul", "Gemm"):
            return node
        if node.op_type not in _PASS_THROUGH:
            break
        name = node.input[0]
    met = producers[name].op_type if name in producers else "a graph input"
    raise OmniVisionError(f"cannot find the lm_head MatMul/Gemm feeding '{output}' (met {met})")


def split_lm_head(model_path: str | Path, out_path: str | Path, parts: int, output: str = "logits") -> None:
    """Rewrite the final lm_head MatMul/Gemm of a decoder graph into `parts` MatMuls over vocabulary
    slices + Concat; weights go to `out_path`.data. Logits are unchanged (each is the same dot product).

    Handles Gemm(x, W[V, H], transB=1) (the exporter's tied-embedding form, W shared with the token
    embedding Gather: the slices are new initializers, W stays for the Gather), Gemm/MatMul with
    W[H, V], and MatMul(x, Transpose(W[V, H])).
    """
    import onnx
    from onnx import helper, numpy_helper

    if parts < 2:
        raise OmniVisionError(f"split_lm_head needs at least 2 parts, got {parts}")
    model_path, out_path = Path(model_path), Path(out_path)
    try:
        model = onnx.load(str(model_path))  # external data resolved relative to the model file
    except Exception as exc:  # onnx raises DecodeError, OSError, ...
        raise OmniVisionError(f"cannot load ONNX graph {model_path}: {exc}") from exc
    graph = model.graph
    node = _find_lm_head(graph, output)
    op, base, x_name, weight_name, result = node.op_type, node.name or "lm_head", node.input[0], node.input[1], node.output[0]
    c_name = node.input[2] if op == "Gemm" and len(node.input) > 2 and node.input[2] else None
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    inits = {init.name: init for init in graph.initializer}
    producers = {out: n for n in graph.node for out in n.output}

    trans_b = attrs.get("transB", 0)
    if attrs.get("transA", 0):
        raise OmniVisionError(f"lm_head Gemm '{base}' has transA=1; not supported by the split")
    transpose = producers.get(weight_name) if weight_name not in inits else None
    if weight_name in inits:
        weight = numpy_helper.to_array(inits[weight_name])  # [V, H] if transB else [H, V]
        vocab_axis = 0 if trans_b else 1
    elif transpose is not None and transpose.op_type == "Transpose" and transpose.input[0] in inits:
        weight = numpy_helper.to_array(inits[transpose.input[0]]).T  # MatMul(x, Transpose(W[V, H])): W^T [H, V]
        vocab_axis, trans_b = 1, 0
    else:
        raise OmniVisionError(f"the lm_head weight '{weight_name}' is not an initializer; cannot split it")
    bias = None  # Gemm's C: shared by every part when it broadcasts, else sliced along the vocabulary
    if c_name is not None:
        if c_name in inits:
            bias = numpy_helper.to_array(inits[c_name])
        elif c_name in producers and producers[c_name].op_type == "Constant":
            bias = numpy_helper.to_array(helper.get_attribute_value(producers[c_name].attribute[0]))
        else:
            raise OmniVisionError(f"the lm_head bias '{c_name}' is not a constant; cannot split it")
    vocab = weight.shape[vocab_axis]
    if parts > vocab:
        raise OmniVisionError(f"cannot split a vocabulary of {vocab} into {parts} parts")

    bounds = np.linspace(0, vocab, parts + 1).round().astype(int)
    new_nodes, new_inits, part_outputs = [], [], []
    for i, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        piece = weight[lo:hi] if vocab_axis == 0 else weight[:, lo:hi]
        new_inits.append(numpy_helper.from_array(np.ascontiguousarray(piece), f"{base}_w{i}"))
        part_outputs.append(f"{result}_part{i}")
        if op == "Gemm":
            inputs = [x_name, f"{base}_w{i}"]
            if bias is not None and (bias.ndim == 0 or bias.shape[-1] == 1):
                inputs.append(c_name)
            elif bias is not None:
                new_inits.append(numpy_helper.from_array(np.ascontiguousarray(bias[..., lo:hi]), f"{base}_b{i}"))
                inputs.append(f"{base}_b{i}")
            new_nodes.append(helper.make_node("Gemm", inputs, [part_outputs[-1]], name=f"{base}_part{i}",
                                              transB=int(trans_b), alpha=float(attrs.get("alpha", 1.0)),
                                              beta=float(attrs.get("beta", 1.0))))
        else:
            new_nodes.append(helper.make_node("MatMul", [x_name, f"{base}_w{i}"], [part_outputs[-1]], name=f"{base}_part{i}"))
    new_nodes.append(helper.make_node("Concat", part_outputs, [result], name=f"{base}_concat", axis=-1))

    index = next(i for i, n in enumerate(graph.node) if result in n.output)
    rebuilt = list(graph.node[:index]) + new_nodes + list(graph.node[index + 1:])
    del graph.node[:]
    graph.node.extend(rebuilt)
    graph.initializer.extend(new_inits)
    # Drop what only the old node used (a MatMul's Transpose, an unshared weight or bias); the tied
    # embedding table stays for the token Gather.
    used = {name for n in graph.node for name in n.input}
    if transpose is not None and weight_name not in used:
        graph.node.remove(next(n for n in graph.node if weight_name in n.output))
    used = {name for n in graph.node for name in n.input} | {o.name for o in graph.output}
    candidates = {weight_name, c_name, *(transpose.input[:1] if transpose is not None else [])}
    for init in [i for i in graph.initializer if i.name in candidates and i.name not in used]:
        graph.initializer.remove(init)

    out_path.parent.mkdir(parents=True, exist_ok=True)
    data_name = out_path.name + ".data"
    (out_path.parent / data_name).unlink(missing_ok=True)  # onnx appends to an existing data file
    onnx.save_model(model, str(out_path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data_name, size_threshold=1024)


# ---------------------------------------------------------------------------------------------
# Engine build (TensorRT 10 Python API)


def _progress_monitor(trt, log: Callable[[str], None], label: str):
    """An IProgressMonitor logging top-level build phases and, at most every 15 s, their steps."""

    class Progress(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)
            self.steps: dict[str, int] = {}
            self.last = 0.0

        def phase_start(self, phase_name, parent_phase, num_steps):
            self.steps[phase_name] = num_steps
            if parent_phase is None:
                log(f"{label}: {phase_name} ({num_steps} steps)")

        def step_complete(self, phase_name, step):
            now = time.monotonic()
            if now - self.last > 15:
                self.last = now
                log(f"{label}: {phase_name} {step}/{self.steps.get(phase_name, '?')}")
            return True  # False would cancel the build

        def phase_finish(self, phase_name):
            self.steps.pop(phase_name, None)

    return Progress()


def build_engine(
    trt,
    onnx_path: Path,
    profiles: list[te.Profile],
    options: te.EngineOptions,
    timing_cache: Path,
    log: Callable[[str], None],
    label: str,
    verbose: bool = False,
):
    """Parse one ONNX graph and build a serialized engine (IHostMemory) with the given profiles.

    Strongly typed: every tensor keeps the ONNX graph's type (fp32 residual stream and attention scores,
    fp16 matmuls; INT4 weights dequantized into fp16 GEMMs for gpu-int4)."""
    try:  # the one process-wide logger: raise or lower its level for this build
        trt_env.logger(trt).min_severity = trt.Logger.INFO if verbose else trt.Logger.WARNING
    except AttributeError:
        pass  # a Logger without a settable level: keep WARNING
    builder = trt_env.create_builder(trt)
    network = trt_env.checked("a network definition",
                              builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)))
    parser = trt_env.create_parser(trt, network)
    if not parser.parse_from_file(str(onnx_path)):  # from the file so its external weights resolve
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise OmniVisionError(f"TensorRT could not parse {onnx_path}: {errors or 'no details'}")
    inputs = {network.get_input(i).name for i in range(network.num_inputs)}
    for profile in profiles:
        unknown = set(profile) - inputs
        missing = inputs - set(profile)
        if unknown or missing:
            raise OmniVisionError(
                f"{onnx_path.name}: graph inputs do not match the profiles "
                f"(not in graph: {sorted(unknown)[:4]}, no profile: {sorted(missing)[:4]})"
            )

    config = trt_env.checked("a builder config", builder.create_builder_config())
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_mb << 20)
    cache_bytes = timing_cache.read_bytes() if timing_cache.is_file() else b""
    try:
        cache = config.create_timing_cache(cache_bytes) if cache_bytes else None
    except (RuntimeError, TypeError, ValueError):
        cache = None
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        if cache_bytes:
            log(f"{label}: {timing_cache.name} is unreadable or from another TensorRT/GPU; starting a new one")
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)
    for shapes in profiles:
        profile = trt_env.checked("an optimization profile", builder.create_optimization_profile())
        for name, (lo, opt, hi) in shapes.items():
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)
    monitor = None  # referenced here until the build ends
    if hasattr(trt, "IProgressMonitor"):  # TensorRT 10.0+
        monitor = _progress_monitor(trt, log, label)
        config.progress_monitor = monitor
    else:
        log(f"{label}: building (this TensorRT has no progress monitor; it can take many minutes)")

    started = time.monotonic()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise OmniVisionError(
            f"TensorRT failed to build {onnx_path.name} (see the TensorRT errors above; "
            f"if they mention memory, close other GPU programs or change --workspace-mb, now {options.workspace_mb})"
        )
    log(f"{label}: built in {time.monotonic() - started:.0f} s")
    tmp = timing_cache.with_name(timing_cache.name + ".tmp")
    tmp.write_bytes(memoryview(config.get_timing_cache().serialize()))
    tmp.replace(timing_cache)
    return serialized


def build_engines(
    bundle,
    options: te.EngineOptions | None = None,
    force: bool = False,
    log: Callable[[str], None] = print,
    verbose: bool = False,
    probe: trt_env.TensorRTProbe | None = None,
) -> Path:
    """Build (or reuse) the engines of a bundle (an opened Bundle or its path) for this TensorRT and GPU;
    returns the engine folder. `probe`: the caller's TensorRTProbe, so TensorRT is probed once.

    options=None: defaults, from the fp16 graphs when the bundle has them, else fp32.
    """
    from omnivision_ros.model.bundle import open_bundle

    trt = trt_env.import_tensorrt()
    probe = probe or trt_env.probe_tensorrt()
    gpu = probe.gpu
    bundle = bundle if hasattr(bundle, "manifest") else open_bundle(bundle)
    config = bundle.config
    if options is None:
        options = te.EngineOptions(precision="fp16" if "fp16" in bundle.variants else "fp32")
    options = options.resolved(config)
    target = te.engine_target(bundle, options.precision, probe.version, gpu.compute_capability)
    variant = bundle.variant(tensorrt_variant(options.precision))
    root = Path(bundle.path) / te.ENGINES_DIR
    folder = root / target.key
    decision = te.decide(root, target, options)
    if decision.reuse and not force:
        log(decision.reason)
        return folder
    log(f"{decision.reason}{' (--force)' if decision.reuse else ''}")
    log(f"TensorRT {target.trt_version} on {gpu.name} (sm {gpu.compute_capability}), {options.precision}, "
        f"workspace {options.workspace_mb} MiB")

    try:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / te.ENGINE_MANIFEST).unlink(missing_ok=True)  # no manifest = no usable engine until the build completes
    except OSError as exc:
        raise OmniVisionError(f"cannot write engines into {root}: {exc} (the bundle directory must be writable)") from exc
    timing_cache = root / te.timing_cache_name(target.trt_version, target.compute_capability)
    profiles = {"vision": te.vision_profiles(config, options), "decoder": te.decoder_profiles(config, options)}
    sources = {"vision": variant.vision, "decoder": variant.decoder}
    work = root / ".work"
    engine_files, seconds = {}, {}
    try:
        if options.lm_head_parts > 1:
            sources["decoder"] = work / f"decoder.lmsplit{options.lm_head_parts}.onnx"
            log(f"decoder: splitting the lm_head into {options.lm_head_parts} parts")
            split_lm_head(variant.decoder, sources["decoder"], options.lm_head_parts)
        for graph in te.GRAPHS:
            started = time.monotonic()
            serialized = build_engine(trt, sources[graph], profiles[graph], options, timing_cache, log, graph, verbose)
            plan = folder / f"{graph}.plan"
            tmp = plan.with_name(plan.name + ".tmp")
            with open(tmp, "wb") as f:
                f.write(serialized)
            del serialized
            tmp.replace(plan)
            engine_files[graph] = {"file": plan.name, "size": plan.stat().st_size}
            seconds[graph] = time.monotonic() - started
    finally:
        shutil.rmtree(work, ignore_errors=True)
    manifest = te.new_manifest(target, options, gpu.name, te.variant_sources(bundle, options.precision), profiles,
                               engine_files, seconds)
    te.write_manifest(folder, manifest)
    log(f"engines written to {folder}")
    return folder


# ---------------------------------------------------------------------------------------------
# CLI


def build_parser() -> argparse.ArgumentParser:
    d = te.EngineOptions()
    parser = argparse.ArgumentParser(
        prog="omnivision-build-engines",
        description="Build the TensorRT engines of a model bundle on this device (reuses matching ones).",
    )
    parser.add_argument("bundle", help="model bundle directory (from omnivision-export)")
    parser.add_argument("--precision", default=d.precision, choices=TENSORRT_PRECISIONS,
                        help="graphs to build from: fp16 (default), fp32, or int4 (the gpu-int4 weight-only INT4 decoder)")
    parser.add_argument("--max-cameras", type=int, default=d.max_cameras,
                        help=f"frames per vision call (default: {d.max_cameras})")
    parser.add_argument("--max-context", type=int, default=None, help="tokens per conversation (default: the model's context)")
    parser.add_argument("--max-prefill", type=int, default=None,
                        help="tokens per engine call when prefilling; longer prompts go in chunks "
                             f"(default: {te.DEFAULT_MAX_PREFILL})")
    parser.add_argument("--workspace-mb", type=int, default=d.workspace_mb,
                        help=f"TensorRT builder scratch memory limit in MiB (default: {d.workspace_mb}, for 8 GB Orin Nano)")
    parser.add_argument("--split-lm-head", type=int, default=1, metavar="N",
                        help="build the decoder with its lm_head split into N parts (Orin Nano CMA; e.g. 4)")
    parser.add_argument("--force", action="store_true", help="rebuild even when matching engines exist")
    parser.add_argument("--verbose", action="store_true", help="TensorRT INFO log")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def log(message: str) -> None:
        print(f"[build-engines] {message}", file=sys.stderr, flush=True)

    options = te.EngineOptions(
        precision=args.precision,
        max_cameras=args.max_cameras,
        opt_cameras=min(te.EngineOptions.opt_cameras, args.max_cameras),
        max_context=args.max_context,
        max_prefill=args.max_prefill,
        lm_head_parts=args.split_lm_head,
        workspace_mb=args.workspace_mb,
    )
    try:
        build_engines(args.bundle, options, force=args.force, log=log, verbose=args.verbose)
    except OmniVisionError as exc:
        print(f"omnivision-build-engines: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
