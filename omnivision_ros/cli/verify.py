"""omnivision-verify: check a bundle's TensorRT engines against ONNX Runtime on this device.

Runs one image and prompt through ONNX Runtime (fp32 graphs, the reference) and TensorRT, and
reports max / mean absolute differences and cosine similarity of the image embeddings and the
logits, and how many greedy tokens agree over N decode steps. TensorRT is teacher-forced with the
reference's tokens, so one early difference does not cascade; a step "agrees" when TensorRT's
argmax is the reference token. Both decoders get the reference image embeddings, so the logits
compare the decoders alone.

Default limits (fp16 engines against fp32 ONNX Runtime): fp16 keeps ~3 significant digits per
operation and the errors add up over 27 vision and 24 decoder layers, so absolute limits are loose
and cosine similarity (scale-free) carries the check: cosine >= 0.999, max |d| <= 0.25 for image
embeddings and <= 0.5 for logits. A token may differ only where the reference's two best logits are
closer than the logits limit (a near tie fp16 rounding can flip). fp32 engines: cosine >= 0.99999,
max |d| <= 0.01 (TensorRT may use TF32 matmuls on Ampere and later GPUs).

int4 engines (the gpu-int4 variant) are compared with ONNX Runtime running the same gpu-int4 graphs (their
quantization error is the bundle's, measured by omnivision-bench; this checks TensorRT's arithmetic), with
the fp16 limits.

--cuda-graphs runs the decode steps twice with capture on; the report says how many steps were captured and
replayed, and a second run that replayed nothing (capture failed, or was not reached) is a failure.

Exit status: 0 within limits, 1 beyond them, 2 on errors (including TensorRT being absent).
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from omnivision_ros.errors import OmniVisionError, run_command
from omnivision_ros.model.variants import TENSORRT_PRECISIONS

LIMITS = {  # TensorRT precision -> (embeds max |d|, logits max |d|, min cosine)
    "fp16": (0.25, 0.5, 0.999),
    "fp32": (0.01, 0.01, 0.99999),
    "int4": (0.25, 0.5, 0.999),
}
REFERENCE_VARIANT = {"fp16": "fp32", "fp32": "fp32", "int4": "gpu-int4"}  # what ONNX Runtime runs as the reference
DEFAULT_QUESTION = "Describe this image."


@dataclass
class Diff:
    max_abs: float
    mean_abs: float
    cosine: float

    @classmethod
    def of(cls, ref: np.ndarray, got: np.ndarray) -> "Diff":
        a = np.asarray(ref, np.float64).ravel()
        b = np.asarray(got, np.float64).ravel()
        d = np.abs(a - b)
        norm = np.linalg.norm(a) * np.linalg.norm(b)
        cosine = float(a @ b / norm) if norm > 0 else float(np.array_equal(a, b))
        return cls(float(d.max()), float(d.mean()), cosine)

    def within(self, atol: float, min_cosine: float) -> bool:
        return self.max_abs <= atol and self.cosine >= min_cosine

    def text(self) -> str:
        return f"max |d| {self.max_abs:.4g}  mean |d| {self.mean_abs:.4g}  cosine {self.cosine:.6f}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="omnivision-verify",
        description="Compare a bundle's TensorRT engines with ONNX Runtime on the same image and prompt.",
        epilog="Exit status: 0 within limits, 1 beyond them, 2 on errors or when TensorRT is absent.",
    )
    parser.add_argument("bundle", help="model bundle directory")
    parser.add_argument("--image", help="image file (default: the sample image shipped with the package)")
    parser.add_argument("--question", default=DEFAULT_QUESTION, help=f"prompt question (default: {DEFAULT_QUESTION!r})")
    parser.add_argument("--steps", type=int, default=16, help="greedy decode steps to compare (default: 16)")
    parser.add_argument("--precision", default="fp16", choices=TENSORRT_PRECISIONS, help="TensorRT engines to check (default: fp16)")
    parser.add_argument("--atol-embeds", type=float, default=None, help="max |d| of image embeddings (default: per precision)")
    parser.add_argument("--atol", "--atol-logits", dest="atol_logits", type=float, default=None,
                        help="max |d| of logits, and the near-tie margin for tokens (default: per precision)")
    parser.add_argument("--min-cosine", type=float, default=None, help="least cosine similarity (default: per precision)")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="run the decode steps twice with CUDA-graph capture on, so the second run replays graphs")
    parser.add_argument("--no-build", action="store_true", help="fail instead of building missing engines")
    return parser


def reference_run(bundle, pixels: np.ndarray, ids: np.ndarray, steps: int, variant: str = "fp32"):
    """ONNX Runtime on the CPU (fp32 graphs, or `variant`): image embeddings, prefill logits, greedy tokens and
    their logits."""
    from omnivision_ros.runtime.ort_backend import OrtBackend

    backend = OrtBackend(bundle, precision=variant, device="cpu")
    try:
        embeds = backend.encode_images(pixels)[0]
        session = backend.new_session()
        logits = [session.prefill(ids, embeds)]
        tokens = []
        for _ in range(steps):
            tokens.append(int(np.argmax(logits[-1])))
            logits.append(session.step(tokens[-1]))
        session.close()
    finally:
        backend.close()
    return embeds, logits, tokens


def tensorrt_run(backend, embeds: np.ndarray, ids: np.ndarray, tokens: list[int]) -> list[np.ndarray]:
    """Prefill then teacher-forced steps on the reference tokens; logits after each call."""
    session = backend.new_session()
    try:
        logits = [session.prefill(ids, embeds)]
        for token in tokens:
            logits.append(session.step(token))
    finally:
        session.close()
    return logits


def run(args: argparse.Namespace) -> int:
    from omnivision_ros.model.preprocess import load_image, preprocess
    from omnivision_ros.model.prompt import PromptBuilder
    from omnivision_ros.model.tokenizer import TextTokenizer
    from omnivision_ros.model.bundle import open_bundle
    from omnivision_ros.runtime.factory import open_tensorrt_backend
    from omnivision_ros.runtime.trt_env import tensorrt_status

    ok, detail = tensorrt_status()
    if not ok:
        raise OmniVisionError(f"TensorRT is not usable here, nothing to verify: {detail}")
    if args.steps < 1:
        raise OmniVisionError("--steps must be at least 1")
    atol_embeds, atol_logits, min_cosine = LIMITS[args.precision]
    atol_embeds = args.atol_embeds if args.atol_embeds is not None else atol_embeds
    atol_logits = args.atol_logits if args.atol_logits is not None else atol_logits
    min_cosine = args.min_cosine if args.min_cosine is not None else min_cosine

    bundle = open_bundle(args.bundle)
    config = bundle.config
    image_path = args.image or str(Path(__file__).resolve().parent.parent / "data" / "sample.jpg")
    pixels = preprocess(load_image(image_path), config)[None]
    ids = PromptBuilder(TextTokenizer.from_file(bundle.tokenizer_path), config).build(args.question, args.steps).ids
    print(f"{detail}; bundle {args.bundle}; image {image_path}; {len(ids)} prompt tokens, {args.steps} steps")

    # The reference first, then released: an 8 GB Jetson need not hold fp32 ORT and the engines at once.
    reference = REFERENCE_VARIANT[args.precision]
    ref_embeds, ref_logits, ref_tokens = reference_run(bundle, pixels, ids, args.steps, reference)
    print(f"reference: ONNX Runtime on the CPU, {reference} graphs")
    backend = open_tensorrt_backend(bundle, args.precision, build=not args.no_build, cuda_graphs=args.cuda_graphs,
                                    log=lambda message: print(message, file=sys.stderr))
    replayed_in_run2 = 0
    try:
        print(f"TensorRT backend: {backend.description}")
        trt_embeds = backend.encode_images(pixels)[0]
        runs = [tensorrt_run(backend, ref_embeds, ids, ref_tokens)]
        if args.cuda_graphs:
            before = backend.graph_stats.replayed
            runs.append(tensorrt_run(backend, ref_embeds, ids, ref_tokens))  # replays the graphs captured above
            replayed_in_run2 = backend.graph_stats.replayed - before
        stats = backend.graph_stats
    finally:
        backend.close()

    failures = []
    if args.cuda_graphs:
        print(f"CUDA graphs: {stats.captured} decode steps captured, {replayed_in_run2} of {len(ref_tokens)} "
              f"replayed in run 2" + (f"; capture failed: {stats.failure}" if stats.failure else ""))
        if replayed_in_run2 == 0:
            failures.append("CUDA graphs did not replay")
    embeds_diff = Diff.of(ref_embeds, trt_embeds)
    print(f"image embeddings  {embeds_diff.text()}  (limits: max |d| {atol_embeds}, cosine >= {min_cosine})")
    if not embeds_diff.within(atol_embeds, min_cosine):
        failures.append("image embeddings")
    for number, trt_logits in enumerate(runs, 1):
        replayed = f", {replayed_in_run2} steps from CUDA graphs" if number > 1 else ""
        label = "" if len(runs) == 1 else f" (run {number}{replayed})"
        prefill = Diff.of(ref_logits[0], trt_logits[0])
        steps = [Diff.of(r, t) for r, t in zip(ref_logits[1:], trt_logits[1:])]
        worst = max(steps, key=lambda d: d.max_abs)
        print(f"prefill logits{label}  {prefill.text()}")
        print(f"decode logits{label}   worst of {len(steps)} steps: {worst.text()}  "
              f"(limits: max |d| {atol_logits}, cosine >= {min_cosine})")
        if not all(d.within(atol_logits, min_cosine) for d in [prefill, *steps]):
            failures.append(f"logits{label}")
        agree, flips = 0, []
        for step, (ref, got) in enumerate(zip(ref_logits[:-1], trt_logits[:-1])):
            token = int(np.argmax(got))
            if token == ref_tokens[step]:
                agree += 1
                continue
            top2 = np.sort(ref.astype(np.float64))[-2:]
            flips.append((step, ref_tokens[step], token, float(top2[1] - top2[0])))
        print(f"greedy tokens{label}   {agree}/{len(ref_tokens)} agree")
        for step, want, got, gap in flips:
            tie = gap <= atol_logits
            print(f"  step {step}: reference {want}, TensorRT {got}; reference top-2 gap {gap:.4g}"
                  f" ({'a near tie, accepted' if tie else 'not a tie'})")
            if not tie:
                failures.append(f"token at step {step}{label}")
    if failures:
        print(f"FAIL: beyond limits: {', '.join(dict.fromkeys(failures))}")
        return 1
    print("PASS")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command("omnivision-verify", lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
