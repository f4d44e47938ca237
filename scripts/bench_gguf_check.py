"""How fast a GGUF folder is refused when a file is wrong, against loading a good one, in the same run.

    flock /tmp/omnivision-heavy.lock .venv/bin/python scripts/bench_gguf_check.py [--work DIR] [--runs 3]

Writes the full-size random-weight pair once (`omnivision-make-test-model --preset omnivision-968m`, ~2 GB)
and derives folders from it: the pair itself (good), the Hugging Face repo's seven names side by side
(good, links to the same two files), a language model cut in half (an interrupted download), an mmproj
whose last block has fc1/fc2 shapes swapped in its header (a converter bug: same bytes, wrong shapes),
and the full-size language model with the tiny preset's mmproj (files of two models). Each folder is
opened by `open_model` in a fresh process, as `omnivision-ask` or the node does; printed are the
median wall time of that process, the time inside it, and whether torch was imported.
`--src DIR` runs another checkout's code (e.g. an older commit) on the same folders for comparison.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path

LM = "Nano-Vlm-Processor-494M-F16.gguf"
MMPROJ = "mmproj-omni-vlm-f16.gguf"
DOWNLOADED_LMS = ("Nano-Vlm-Processor-494M-F16.gguf", "Nano-Vlm-Processor-494M-Q8_0.gguf",
                  "omnivision-text-optimized-llm-f16.gguf", "omnivision-text-optimized-llm-Q8_0.gguf")
DOWNLOADED_MMPROJS = ("mmproj-omni-vlm-f16.gguf", "omnivision-text-optimized-mmproj-f16.gguf",
                      "omnivision-text-optimized-mmproj-f32.gguf")

DRIVER = """
import sys, time
t0 = time.perf_counter()
from omnivision_ros.errors import OmniVisionError
from omnivision_ros.runtime.factory import open_model
try:
    open_model(sys.argv[1])
    outcome = "loaded"
except OmniVisionError as exc:
    outcome = "refused: " + str(exc).replace(sys.argv[1] + "/", "")[:110]
print(f"{time.perf_counter() - t0:.3f}|{'torch' in sys.modules}|{outcome}")
"""


def run(*args: str) -> None:
    subprocess.run([sys.executable, "-m", *args], check=True, stdout=subprocess.DEVNULL)


def tensor_dims_offset(path: Path, name: str) -> tuple[int, int]:
    """(file offset of the dims of tensor `name` in the header, number of dims)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from omnivision_ros.model.gguf_loader import GGUFFile

    f = GGUFFile(path)
    with open(path, "rb") as raw:
        header = raw.read(f.data_offset)
    key = struct.pack("<Q", len(name)) + name.encode()
    at = header.index(key) + len(key)
    (n_dims,) = struct.unpack_from("<I", header, at)
    return at + 4, n_dims


def prepare(work: Path) -> dict[str, Path]:
    good = work / "good"
    if not (good / LM).is_file():
        run("omnivision_ros.export.make_test_model", "--preset", "omnivision-968m", "--out", str(good))
    tiny = work / "tiny"
    if not (tiny / MMPROJ).is_file():
        run("omnivision_ros.export.make_test_model", "--preset", "tiny", "--out", str(tiny))
    folders = {"good pair": good}

    downloaded = work / "downloaded"
    if not downloaded.is_dir():
        downloaded.mkdir()
        for name in DOWNLOADED_LMS:
            (downloaded / name).symlink_to(good / LM)
        for name in DOWNLOADED_MMPROJS:
            (downloaded / name).symlink_to(good / MMPROJ)
    folders["good, 7 files as downloaded"] = downloaded

    truncated = work / "truncated"
    if not truncated.is_dir():
        truncated.mkdir()
        with open(good / LM, "rb") as src, open(truncated / LM, "wb") as dst:
            dst.write(src.read((good / LM).stat().st_size // 2))
        (truncated / MMPROJ).symlink_to(good / MMPROJ)
    folders["LM cut in half"] = truncated

    swapped = work / "swapped"
    if not swapped.is_dir():
        swapped.mkdir()
        (swapped / LM).symlink_to(good / LM)
        shutil.copyfile(good / MMPROJ, swapped / MMPROJ)
        with open(swapped / MMPROJ, "r+b") as f:
            for name in ("v.blk.26.ffn_down.weight", "v.blk.26.ffn_up.weight"):
                at, n_dims = tensor_dims_offset(swapped / MMPROJ, name)
                f.seek(at)
                dims = struct.unpack(f"<{n_dims}Q", f.read(8 * n_dims))
                f.seek(at)
                f.write(struct.pack(f"<{n_dims}Q", *reversed(dims)))
    folders["mmproj fc1/fc2 shapes swapped"] = swapped

    mixed = work / "mixed"
    if not mixed.is_dir():
        mixed.mkdir()
        (mixed / LM).symlink_to(good / LM)
        (mixed / MMPROJ).symlink_to(tiny / MMPROJ)
    folders["full LM + tiny mmproj"] = mixed
    return folders


def measure(folder: Path, src: Path, runs: int) -> tuple[float, float, str, str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(src), os.environ.get("PYTHONPATH")])),
               PYTHONWARNINGS="ignore", TQDM_DISABLE="1")
    walls, inside, torch, outcome = [], [], "", ""
    for _ in range(runs):
        t0 = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", DRIVER, str(folder)], capture_output=True, text=True, env=env,
                              cwd=src)
        walls.append(time.perf_counter() - t0)
        if done.returncode != 0:
            return 0.0, 0.0, "?", "crashed: " + done.stderr.strip().splitlines()[-1]
        seconds, torch, outcome = done.stdout.strip().splitlines()[-1].split("|", 2)
        inside.append(float(seconds))
    return statistics.median(walls), statistics.median(inside), torch, outcome


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default="/tmp/omnivision-gguf-check", help="folder for the files (~3 GB)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--src", default=str(Path(__file__).resolve().parents[1]), help="checkout whose code runs")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    folders = prepare(work)
    print(f"code: {args.src}; median of {args.runs} fresh processes each; load average "
          f"{open('/proc/loadavg').read().split()[0]}")
    print(f"{'folder':32} {'process s':>9} {'inside s':>9} {'torch':>6}  outcome")
    for label, folder in folders.items():
        wall, inside, torch, outcome = measure(folder, Path(args.src), args.runs)
        print(f"{label:32} {wall:9.2f} {inside:9.2f} {torch:>6}  {outcome}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
