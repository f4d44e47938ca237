"""omnivision-export: turn a GGUF folder or a preset into a model bundle (ONNX graphs + manifest)."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from omnivision_ros.errors import OmniVisionError
from omnivision_ros.model.config import PRESETS
from omnivision_ros.model.variants import CPU_VARIANTS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="omnivision-export", description=__doc__)
    parser.add_argument("--model", required=True, help=(
        f"folder with the two GGUF files, or a preset ({', '.join(sorted(PRESETS))}; random weights)"))
    parser.add_argument("--out", required=True, help="bundle directory to write")
    parser.add_argument("--fp16", action="store_true", help=(
        "also write the float16 variant (for GPUs; TensorRT builds its engines from it), in fp16/"))
    parser.add_argument("--cpu-variants", default=None, metavar="LIST", help=(
        f"CPU-optimized variants to build, comma-separated: {', '.join(CPU_VARIANTS)}, or none; written to "
        "cpu-int8/, cpu-int4/. Default: int8 (what ONNX Runtime runs on a CPU when present: ~3.5x the decode "
        "speed of fp32), none with --tensorrt (a GPU target). With --model BUNDLE --out BUNDLE (the same path) "
        "they are added to an existing bundle, from its fp32 graphs"))
    parser.add_argument("--lm-file", default=None, metavar="NAME", help=(
        "language-model file of a GGUF folder that holds several (default: the F16 one of the first release)"))
    parser.add_argument("--mmproj-file", default=None, metavar="NAME", help=(
        "mmproj file of a GGUF folder that holds several (default: the f16 one of the language model's release)"))
    parser.add_argument("--gpu-int4", action="store_true", help=(
        "also derive the INT4 weight-only decoder for TensorRT (gpu-int4/, from the fp16 graphs; implies --fp16). "
        "With --model BUNDLE --out BUNDLE it is added to an existing bundle that has fp16 graphs"))
    parser.add_argument("--seed", type=int, default=0, help="seed of a preset's random weights (default 0)")
    parser.add_argument("--force", action="store_true", help="replace an existing bundle at --out")
    parser.add_argument("--tensorrt", action="store_true", help=(
        "also write the fp16 variant (as --fp16), then build TensorRT engines for this machine's GPU into "
        "BUNDLE/engines/"))
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def load_source(model: str, seed: int, lm_file: str | None = None, mmproj_file: str | None = None):
    """(OmniVisionModel, TextTokenizer, description) for a preset name or a GGUF folder."""
    if model in PRESETS:
        if lm_file or mmproj_file:
            raise OmniVisionError(f"--lm-file / --mmproj-file choose files of a GGUF folder; {model} is a preset")
        from omnivision_ros.model.tokenizer import TextTokenizer
        from omnivision_ros.model.vision_language_model import OmniVisionModel

        source = f"preset {model}, random weights, seed {seed}"
        return OmniVisionModel.random(PRESETS[model], seed), TextTokenizer.synthetic(), source
    path = Path(model)
    if not path.is_dir():
        raise OmniVisionError(
            f"--model {model} is neither a preset ({', '.join(sorted(PRESETS))}) nor a directory of GGUF files"
        )
    try:
        from omnivision_ros.model.gguf_loader import load_gguf_model, select_gguf_files
    except ImportError as exc:
        raise OmniVisionError(f"GGUF loading is not available in this install: {exc}") from exc
    choice = select_gguf_files(path, lm_file, mmproj_file)
    loaded, tokenizer = load_gguf_model(path, lm_file, mmproj_file,
                                        log=lambda line: print(f"[omnivision-export] {line}", file=sys.stderr))
    return loaded, tokenizer, f"gguf {path.resolve()} ({choice.lm.name} + {choice.mmproj.name})"


def build_tensorrt(bundle: Path) -> None:
    """Hook for --tensorrt: engines come from omnivision_ros.export.tensorrt_build (needs TensorRT and a GPU)."""
    try:
        from omnivision_ros.export import tensorrt_build
    except ImportError as exc:
        raise OmniVisionError(f"--tensorrt: TensorRT engine building is not available here ({exc})") from exc
    tensorrt_build.build_engines(bundle)


def cpu_variant_kinds(text: str | None, tensorrt: bool = False) -> list[str]:
    """The --cpu-variants list; None (not given) is int8, or none for a --tensorrt export."""
    if text is None:
        return [] if tensorrt else ["int8"]
    if text.strip().lower() == "none":
        return []
    kinds = [k.strip() for k in text.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in CPU_VARIANTS]
    if unknown:
        raise OmniVisionError(f"--cpu-variants: unknown {', '.join(unknown)}; choose from {', '.join(CPU_VARIANTS)}")
    return kinds


def add_cpu_variants(bundle: Path, kinds: list[str], args: argparse.Namespace, model=None) -> None:
    from omnivision_ros.export.cpu_optimize import add_cpu_variants as add

    t0 = time.perf_counter()
    written = add(bundle, kinds, progress=not args.no_progress, force=args.force, model=model)
    done = ", ".join(written) or "none (already present; --force rebuilds them)"
    print(f"CPU variants in {bundle}: {done} ({time.perf_counter() - t0:.1f} s)", file=sys.stderr)


def add_gpu_int4(bundle: Path, args: argparse.Namespace) -> None:
    from omnivision_ros.export.gpu_int4 import add_gpu_int4 as add

    t0 = time.perf_counter()
    written = add(bundle, force=args.force)
    done = "gpu-int4" if written else "none (already present; --force rebuilds it)"
    print(f"GPU INT4 variant in {bundle}: {done} ({time.perf_counter() - t0:.1f} s)", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    from omnivision_ros.model.bundle import MANIFEST

    if (Path(args.model) / MANIFEST).is_file():  # an existing bundle: only derived variants can be added to it
        # Adding to a bundle: no CPU variant unless asked for when only --gpu-int4 is.
        kinds = cpu_variant_kinds(args.cpu_variants, args.tensorrt) if args.cpu_variants or not args.gpu_int4 else []
        if not (kinds or args.gpu_int4) or Path(args.out).resolve() != Path(args.model).resolve():
            raise OmniVisionError(f"--model {args.model} is a bundle; to add variants to it pass "
                                  f"--out {args.model} --cpu-variants int8[,int4] and/or --gpu-int4")
        if kinds:
            add_cpu_variants(Path(args.out), kinds, args)
        if args.gpu_int4:
            add_gpu_int4(Path(args.out), args)
        return 0
    kinds = cpu_variant_kinds(args.cpu_variants, args.tensorrt)
    t0 = time.perf_counter()
    model, tokenizer, source = load_source(args.model, args.seed, args.lm_file, args.mmproj_file)
    precisions = ("fp32", "fp16") if args.fp16 or args.tensorrt or args.gpu_int4 else ("fp32",)
    from omnivision_ros.export.bundle import export_bundle  # torch + onnx: after the GGUF files are checked

    out = export_bundle(model, tokenizer, args.out, precisions, source=source, force=args.force,
                        progress=not args.no_progress)
    print(f"wrote {out} ({', '.join(precisions)}) in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    if kinds:
        add_cpu_variants(out, kinds, args, model)  # from the model in memory: no need to read the graphs back
    del model  # the engine builder works from the files
    if args.gpu_int4:
        add_gpu_int4(out, args)
    if args.tensorrt:
        build_tensorrt(out)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (OmniVisionError, OSError) as exc:  # OSError: the output folder cannot be written
        print(f"omnivision-export: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
