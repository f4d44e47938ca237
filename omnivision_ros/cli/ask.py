"""omnivision-ask: answer one question about one image file and print the timings.

    omnivision-ask --image door.jpg "What do you see?"                         free text
    omnivision-ask --image door.jpg --check "Is the door open?"                yes/no with p_yes
    omnivision-ask --image door.jpg --choices open,closed,ajar "What state is the door in?"
"""
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
    decide = parser.add_mutually_exclusive_group()
    decide.add_argument("--check", action="store_true", help=(
        "answer the question yes or no with the probability of yes (one forward pass, no generation)"))
    decide.add_argument("--choices", default=None, metavar="A,B,...", help=(
        "score these comma-separated options as answers and print the most probable one first"))
    parser.add_argument("--threshold", type=float, default=0.5, help="--check says yes when p_yes >= this (default 0.5)")
    return parser


def run(args: argparse.Namespace) -> int:
    # Heavy imports after argument parsing, so --help and argument errors are instant.
    import numpy as np

    from omnivision_ros.model.preprocess import load_image
    from omnivision_ros.runtime.factory import open_model
    from omnivision_ros.runtime.generator import GenerationConfig
    from omnivision_ros.runtime.pipeline import Pipeline

    def note(line: str) -> None:
        print(f"[omnivision] {line}", file=sys.stderr)

    if (args.check or args.choices is not None) and args.task != "vqa":
        raise OmniVisionError("--check and --choices need task vqa (the OCR prompt takes no question)")
    if not 0 < args.threshold <= 1:
        raise OmniVisionError(f"--threshold must be in (0, 1], got {args.threshold}")
    options = None
    if args.choices is not None:
        from omnivision_ros.runtime.decisions import check_options

        options = check_options([o for o in args.choices.split(",")] if args.choices.strip() else [], 64)
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
    pipeline = Pipeline(backend, tokenizer, gen, task=args.task, log=note if args.check else None)
    if args.check:
        decision = pipeline.check(image, args.question, threshold=args.threshold)
        t = decision.timing
        print(f"{'yes' if decision.answer else 'no'}  p_yes {decision.probability:.4f}  "
              f"yes/no mass {decision.yes_no_mass:.4g}")
        print(f"[{backend.name}] load {load_s:.2f} s | encode {t.encode_ms:.1f} ms | prefill {t.prefill_ms:.1f} ms "
              f"({t.prompt_tokens} tok) | decision {t.ttft_ms:.1f} ms", file=sys.stderr)
        return 0
    if options is not None:
        choice = pipeline.choose(image, args.question, options)
        t = choice.timing
        print(choice.option)
        width = max(len(o) for o in options)
        for i in np.argsort(-np.asarray(choice.probabilities), kind="stable"):
            print(f"  {options[i]:<{width}}  p {choice.probabilities[i]:.4f}  "
                  f"mean log-prob/token {choice.scores[i]:.3f}")
        print(f"[{backend.name}] load {load_s:.2f} s | encode {t.encode_ms:.1f} ms | prefill {t.prefill_ms:.1f} ms "
              f"({t.prompt_tokens} tok) | options {t.decode_ms:.1f} ms | choice {t.ttft_ms:.1f} ms", file=sys.stderr)
        return 0

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
