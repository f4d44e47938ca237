"""omnivision-ask: answer one question about one image file and print the timings."""
from __future__ import annotations

import argparse
import sys
import time

from omnivision_ros.errors import OmniVisionError, run_command
from omnivision_ros.model.prompt import TASKS
from omnivision_ros.model.variants import PRECISIONS
from omnivision_ros.runtime.backend import BACKENDS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="omnivision-ask", description=__doc__)
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--model", help="preset name, folder with the two GGUF files, or model bundle (default: tiny)")
    where.add_argument("--preset", help="preset name (tiny, omnivision-968m); random weights")
    parser.add_argument("--image", required=True, help="image file (jpg, png, ...)")
    parser.add_argument("question", nargs="?", default="", help="the question about the image (not with --task ocr)")
    parser.add_argument("--task", default="vqa", choices=TASKS, help=(
        "vqa: answer the question (default); ocr: the OCR variant's prompt, which reads the image's text "
        "and takes no question"))
    parser.add_argument("--lm-file", default=None, metavar="NAME", help=(
        "language-model file of a GGUF folder that holds several (default: the F16 one of the first release)"))
    parser.add_argument("--mmproj-file", default=None, metavar="NAME", help=(
        "mmproj file of a GGUF folder that holds several (default: the f16 one of the language model's release)"))
    parser.add_argument("--backend", default="auto", choices=BACKENDS)
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: 256")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None, help="sampling seed")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for inference")
    parser.add_argument("--precision", default=None, help=(
        f"bundle variant: {', '.join(PRECISIONS)} (default: int8 on the CPU when the bundle has it, else fp32; "
        "fp16 on a GPU)"))
    parser.add_argument("--stream", action="store_true", help="print the answer while it is generated")
    return parser


def run(args: argparse.Namespace) -> int:
    # Heavy imports after argument parsing, so --help and argument errors are instant.
    from omnivision_ros.model.preprocess import load_image
    from omnivision_ros.runtime.factory import open_model
    from omnivision_ros.runtime.generator import GenerationConfig
    from omnivision_ros.runtime.pipeline import Pipeline

    def note(line: str) -> None:
        print(f"[omnivision] {line}", file=sys.stderr)

    if args.task == "ocr":
        if args.question.strip():
            note("task ocr: the OCR prompt has no question; the question given is not used")
    elif not args.question.strip():
        raise OmniVisionError("the question is empty")
    image = load_image(args.image)
    gen = GenerationConfig(
        max_new_tokens=args.max_new_tokens or 256,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
    ).validate()
    t0 = time.perf_counter()
    backend, tokenizer = open_model(
        args.model or args.preset or "tiny", args.backend, args.threads, precision=args.precision, log=note,
        lm_file=args.lm_file, mmproj_file=args.mmproj_file,
    )
    load_s = time.perf_counter() - t0
    pipeline = Pipeline(backend, tokenizer, gen, task=args.task)

    printed = 0

    def stream(text: str) -> None:
        nonlocal printed
        sys.stdout.write(text[printed:])
        sys.stdout.flush()
        printed = len(text)

    answer = pipeline.ask(image, args.question, on_text=stream if args.stream else None)
    if args.stream:
        sys.stdout.write(answer.text[printed:] + "\n")
    else:
        print(answer.text)
    print(f"[{backend.name}] load {load_s:.2f} s | {answer.timing.summary()}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command("omnivision-ask", lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
