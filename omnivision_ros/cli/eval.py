"""omnivision-eval: yes/no accuracy on a POPE-format question file, on any model, backend and precision.

The file is JSON Lines, one question per line:

    {"image": "COCO_val2014_000000310196.jpg", "question": "Is there a snowboard in the image?", "label": "yes"}

`text` is accepted for `question` (POPE's own files use it); other keys (question_id, ...) are ignored;
image paths are relative to the file (or to --image-root). Each question is answered by Check: the
probability of yes at the first answer position, compared with --threshold. Reported, with "yes" as the
positive class: accuracy, precision, recall, F1, yes-ratio (the share of questions answered yes), and the
model's time per question (mean and 95th percentile, NumPy's linear interpolation; decoding the image file
is not counted, a question about an image already encoded hits the vision cache). --compare PRECISION runs
a second variant of the same bundle and reports both, the share of questions they answer alike
(agreement) and the mean |p_yes difference|.

With the released weights this reproduces the model's POPE figure (89.4 published) and checks that
reduced precisions keep it; with the random weights of the development models the figures mean nothing.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from omnivision_ros.errors import OmniVisionError, run_command
from omnivision_ros.runtime.backend import BACKENDS

LABELS = ("yes", "no")


@dataclass(frozen=True)
class Item:
    line: int  # 1-based line number in the file
    image: Path
    question: str
    label: str  # yes | no


def read_items(path: Path, image_root: Path | None = None) -> list[Item]:
    """The questions of a POPE-format JSONL file, every line checked first (images must exist):
    OmniVisionError naming the file and line of the first problem."""
    if not path.is_file():
        raise OmniVisionError(f"question file not found: {path}")
    root = image_root or path.parent
    items = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path} line {number}"
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as exc:
                raise OmniVisionError(f"{where}: not JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(entry, dict):
                raise OmniVisionError(f"{where}: expected an object with image, question and label")
            question = entry.get("question", entry.get("text"))
            for key, value in (("image", entry.get("image")), ("question", question), ("label", entry.get("label"))):
                if not isinstance(value, str) or not value.strip():
                    raise OmniVisionError(f"{where}: '{key}' is missing or not a non-empty string"
                                          + (" ('text' is accepted too)" if key == "question" else ""))
            label = entry["label"].strip().lower()
            if label not in LABELS:
                raise OmniVisionError(f"{where}: label is '{entry['label']}'; expected yes or no")
            image = root / entry["image"]
            if not image.is_file():
                raise OmniVisionError(f"{where}: image file not found: {image}")
            items.append(Item(number, image, question, label))
    if not items:
        raise OmniVisionError(f"{path} holds no questions")
    return items


def metrics(labels: list[str], answers: list[bool], latencies_ms: list[float]) -> dict:
    """accuracy, precision, recall, f1 (yes = positive; 0 where a ratio has no cases), yes_ratio, latency."""
    truth = np.asarray([label == "yes" for label in labels])
    said = np.asarray(answers, dtype=bool)
    tp, fp = int(np.sum(said & truth)), int(np.sum(said & ~truth))
    fn, tn = int(np.sum(~said & truth)), int(np.sum(~said & ~truth))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return {"questions": len(labels), "accuracy": (tp + tn) / len(labels), "precision": precision, "recall": recall,
            "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
            "yes_ratio": float(said.mean()), "tp": tp, "fp": fp, "fn": fn, "tn": tn,
            "mean_ms": float(np.mean(latencies_ms)), "p95_ms": float(np.percentile(latencies_ms, 95))}


def evaluate(pipeline, items: list[Item], threshold: float, progress: bool, desc: str) -> list[dict]:
    """Check every question; per question: line, label, p_yes, yes_no_mass, answer (yes/no), ms."""
    from tqdm import tqdm

    from omnivision_ros.model.preprocess import load_image

    out = []
    for item in tqdm(items, desc=desc, unit="q", disable=not progress, file=sys.stderr):
        loading_ms = 0.0

        def picture(path=item.image):
            nonlocal loading_ms
            t0 = time.perf_counter()
            image = load_image(str(path))
            loading_ms = (time.perf_counter() - t0) * 1e3
            return image

        try:
            decision = pipeline.check(picture, item.question, frame_key=str(item.image.resolve()), threshold=threshold)
        except OmniVisionError as exc:
            raise OmniVisionError(f"line {item.line}: {exc}") from None
        out.append({"line": item.line, "image": str(item.image), "question": item.question, "label": item.label,
                    "p_yes": decision.probability, "yes_no_mass": decision.yes_no_mass,
                    "answer": "yes" if decision.answer else "no", "ms": decision.timing.ttft_ms - loading_ms})
    return out


def run_variant(args, precision: str | None, items: list[Item], note) -> tuple[str, list[dict], dict]:
    from omnivision_ros.runtime.factory import open_model
    from omnivision_ros.runtime.pipeline import Pipeline

    backend, tokenizer = open_model(args.model, args.backend, args.threads, precision=precision, log=note)
    try:
        name = getattr(backend, "variant", None) or precision or backend.name
        pipeline = Pipeline(backend, tokenizer, log=note)
        outputs = evaluate(pipeline, items, args.threshold, not args.no_progress, name)
        pipeline.clear_caches()
    finally:
        backend.close()
    return name, outputs, metrics([o["label"] for o in outputs], [o["answer"] == "yes" for o in outputs],
                                  [o["ms"] for o in outputs])


def compare(a: list[dict], b: list[dict]) -> dict:
    same = [x["answer"] == y["answer"] for x, y in zip(a, b)]
    return {"agreement": float(np.mean(same)), "mean_abs_dp": float(np.mean([abs(x["p_yes"] - y["p_yes"])
                                                                              for x, y in zip(a, b)]))}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="omnivision-eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("data", help="POPE-format JSON Lines file (image, question or text, label yes|no)")
    parser.add_argument("--model", default="tiny", help="model bundle, folder of GGUF files, or preset (default tiny)")
    parser.add_argument("--backend", default="auto", choices=BACKENDS)
    parser.add_argument("--precision", default=None, help="bundle variant (default: the backend's)")
    parser.add_argument("--compare", default=None, metavar="PRECISION",
                        help="also run this variant of the bundle; report agreement and mean |p_yes difference|")
    parser.add_argument("--threshold", type=float, default=0.5, help="answer yes when p_yes >= this (default 0.5)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for inference")
    parser.add_argument("--image-root", default=None, help="folder the image paths are relative to (default: the file's)")
    parser.add_argument("--limit", type=int, default=0, help="evaluate only the first N questions")
    parser.add_argument("--json", default=None, metavar="PATH",
                        help="write metrics and per-question outputs as JSON to PATH ('-': stdout, instead of the table)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def run(args: argparse.Namespace) -> int:
    if not 0 < args.threshold <= 1:
        raise OmniVisionError(f"--threshold must be in (0, 1], got {args.threshold}")
    if args.limit < 0:
        raise OmniVisionError(f"--limit must not be negative, got {args.limit}")
    items = read_items(Path(args.data), Path(args.image_root) if args.image_root else None)
    if args.limit:
        items = items[:args.limit]

    def note(line: str) -> None:
        print(f"[omnivision-eval] {line}", file=sys.stderr)

    runs = [run_variant(args, args.precision, items, note)]
    if args.compare:
        runs.append(run_variant(args, args.compare, items, note))
        if runs[0][0] == runs[1][0]:
            raise OmniVisionError(f"--compare {args.compare} runs the same variant ({runs[0][0]}) again")
    report = {"data": str(args.data), "model": args.model, "threshold": args.threshold,
              "variants": {name: m for name, _, m in runs},
              "outputs": {name: outputs for name, outputs, _ in runs}}
    if len(runs) == 2:
        report["comparison"] = {f"{runs[0][0]} vs {runs[1][0]}": compare(runs[0][1], runs[1][1])}
    if args.json:
        text = json.dumps(report, indent=1) + "\n"
        if args.json == "-":
            sys.stdout.write(text)
            return 0
        Path(args.json).write_text(text)
    print(f"omnivision-eval: {len(items)} questions from {args.data}, model {args.model}, threshold {args.threshold:g}")
    print(f"{'variant':<12}{'accuracy':>9}{'precision':>10}{'recall':>8}{'F1':>8}{'yes-ratio':>10}{'mean ms':>9}{'p95 ms':>9}")
    for name, _, m in runs:
        print(f"{name:<12}{m['accuracy']:9.4f}{m['precision']:10.4f}{m['recall']:8.4f}{m['f1']:8.4f}"
              f"{m['yes_ratio']:10.4f}{m['mean_ms']:9.1f}{m['p95_ms']:9.1f}")
    for pair, c in report.get("comparison", {}).items():
        print(f"{pair}: agreement {c['agreement']:.4f}, mean |p_yes difference| {c['mean_abs_dp']:.3g}")
    if args.json:
        print(f"wrote {args.json}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command("omnivision-eval", lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
