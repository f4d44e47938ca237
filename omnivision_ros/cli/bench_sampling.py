"""Sampling speed: the generator's Sampler against the exact method (sample_exact), in the same run.

    python -m omnivision_ros.cli.bench_sampling [--logits WORK/outputs/ort-fp32.npz] [--repeats 200]

Times one draw per token over the full 151,936-token vocabulary, greedy aside, for temperature alone and
temperature + top-p, on logits of three shapes: peaked (std 4, a confident model), medium (std 3) and flat
(std 0.6, what the random-weight models here give: top-p sets of ~100k tokens). `--logits` adds a real
model's last-position logits (omnivision-bench writes them to WORK/outputs/<system>.npz). Prints medians
and the ratio; the load average goes with them, as the machine may be shared.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

from omnivision_ros.errors import OmniVisionError, run_command
from omnivision_ros.runtime.generator import GenerationConfig, Sampler, sample_exact

VOCAB = 151936
SETTINGS = ((0.7, 1.0), (0.7, 0.9), (1.0, 0.95))  # (temperature, top_p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m omnivision_ros.cli.bench_sampling",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=200, help="timed draws of the fast sampler per case")
    parser.add_argument("--exact-repeats", type=int, default=20, help="timed draws of the exact method per case")
    parser.add_argument("--vocab", type=int, default=VOCAB, help=f"vocabulary size of the synthetic logits ({VOCAB})")
    parser.add_argument("--logits", help="an .npz with a 'logits' array (omnivision-bench's outputs), or an .npy")
    return parser


def median_ms(draw, repeats: int) -> float:
    draw()  # first call: buffers allocated
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        draw()
        times.append(time.perf_counter() - start)
    return float(np.median(times)) * 1e3


def load_logits(path: str) -> np.ndarray:
    try:
        data = np.load(path)
        logits = data["logits"] if hasattr(data, "files") else data
    except (OSError, ValueError, KeyError) as exc:
        raise OmniVisionError(f"cannot read logits from {path}: {exc}") from exc
    return np.asarray(logits, np.float32).reshape(-1)


def run(args: argparse.Namespace) -> int:
    if args.repeats < 1 or args.exact_repeats < 1 or args.vocab < 2:
        raise OmniVisionError("--repeats and --exact-repeats must be >= 1 and --vocab >= 2")
    rng = np.random.default_rng(0)
    cases = {name: (rng.standard_normal(args.vocab) * std).astype(np.float32)
             for name, std in (("peaked (std 4)", 4.0), ("medium (std 3)", 3.0), ("flat (std 0.6)", 0.6))}
    if args.logits:
        cases[f"file {os.path.basename(args.logits)}"] = load_logits(args.logits)
    load = os.getloadavg()
    print(f"sampling: median ms per token, {args.repeats} fast / {args.exact_repeats} exact draws per case; "
          f"load avg {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    header = f"{'logits':<28}{'vocab':>8}{'T':>5}{'top_p':>7}{'set size':>10}{'exact ms':>10}{'fast ms':>9}{'speed-up':>10}"
    print(header)
    print("-" * len(header))
    worst = 0.0
    for name, logits in cases.items():
        for temperature, top_p in SETTINGS:
            config = GenerationConfig(temperature=temperature, top_p=top_p, seed=0)
            sampler, exact_rng = Sampler(config), np.random.default_rng(0)
            fast = median_ms(lambda: sampler(logits), args.repeats)
            exact = median_ms(lambda: sample_exact(logits, temperature, top_p, exact_rng), args.exact_repeats)
            size = len(sampler.nucleus(sampler.probabilities(logits))[0]) if top_p < 1 else len(logits)
            worst = max(worst, fast)
            print(f"{name:<28}{len(logits):>8}{temperature:>5}{top_p:>7}{size:>10}{exact:>10.3f}{fast:>9.3f}"
                  f"{exact / fast:>9.1f}x")
    print(f"slowest fast draw: {worst:.3f} ms per token")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command("bench_sampling", lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
