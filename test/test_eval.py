"""omnivision-eval on a small POPE-format set written here, and omnivision-ask --check / --choices: the
command-line tools as subprocesses on the tiny bundle (ONNX Runtime, no torch)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import cv2
import numpy as np
import pytest

QUESTIONS = ["Is there a cat in the image?", "Is there a dog in the image?", "Is the door open?"]


def tool(module: str, *args, timeout=120):
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, PYTHONWARNINGS="ignore"))


@pytest.fixture(scope="module")
def pope(tmp_path_factory):
    """4 pictures x 3 questions, labels alternating; images in a subfolder, paths relative to the file."""
    root = tmp_path_factory.mktemp("pope")
    (root / "images").mkdir()
    lines = []
    for i in range(4):
        rng = np.random.default_rng(i)
        img = rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)
        img[: 10 * (i + 1)] = (60 * i, 255 - 60 * i, 128)
        cv2.imwrite(str(root / "images" / f"{i}.png"), img)
        for j, question in enumerate(QUESTIONS):
            key = "text" if j == 0 else "question"  # POPE's own files name it `text`
            lines.append({"question_id": len(lines), "image": f"images/{i}.png", key: question,
                          "label": "yes" if (i + j) % 2 else "no"})
    path = root / "pope.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    return path


def run_eval(path, *args):
    return tool("omnivision_ros.cli.eval", str(path), "--no-progress", *args)


def by_hand(outputs: list[dict]) -> dict:
    tp = sum(o["answer"] == "yes" and o["label"] == "yes" for o in outputs)
    fp = sum(o["answer"] == "yes" and o["label"] == "no" for o in outputs)
    fn = sum(o["answer"] == "no" and o["label"] == "yes" for o in outputs)
    tn = sum(o["answer"] == "no" and o["label"] == "no" for o in outputs)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    ms = sorted(o["ms"] for o in outputs)
    rank = 0.95 * (len(ms) - 1)  # the 95th percentile, interpolated between the two nearest
    low = int(rank)
    p95 = ms[low] + (rank - low) * (ms[min(low + 1, len(ms) - 1)] - ms[low])
    return {"accuracy": (tp + tn) / len(outputs), "precision": precision, "recall": recall,
            "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
            "yes_ratio": (tp + fp) / len(outputs), "mean_ms": sum(ms) / len(ms), "p95_ms": p95}


def test_metrics_are_those_of_the_per_question_outputs(pope, tiny_bundle, tmp_path):
    # First pass: the median p_yes as threshold, so the answers are a mix of yes and no.
    first = run_eval(pope, "--model", str(tiny_bundle), "--precision", "fp32", "--json", "-")
    assert first.returncode == 0, first.stderr
    p = [o["p_yes"] for o in json.loads(first.stdout)["outputs"]["fp32"]]
    threshold = float(np.median(p))
    out = tmp_path / "eval.json"
    result = run_eval(pope, "--model", str(tiny_bundle), "--precision", "fp32", "--compare", "fp16",
                      "--threshold", repr(threshold), "--json", str(out))
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert list(report["variants"]) == ["fp32", "fp16"]
    fp32, fp16 = report["outputs"]["fp32"], report["outputs"]["fp16"]
    assert len(fp32) == 12 and [o["line"] for o in fp32] == list(range(1, 13))
    assert {o["answer"] for o in fp32} == {"yes", "no"}
    for o in fp32 + fp16:
        assert o["answer"] == ("yes" if o["p_yes"] >= threshold else "no") and 0 < o["yes_no_mass"] <= 1
    for name, outputs in (("fp32", fp32), ("fp16", fp16)):
        measured = report["variants"][name]
        for key, value in by_hand(outputs).items():
            assert measured[key] == pytest.approx(value, abs=1e-12), (name, key)
    comparison = report["comparison"]["fp32 vs fp16"]
    assert comparison["agreement"] == pytest.approx(np.mean([a["answer"] == b["answer"] for a, b in zip(fp32, fp16)]))
    assert comparison["mean_abs_dp"] == pytest.approx(np.mean([abs(a["p_yes"] - b["p_yes"]) for a, b in zip(fp32, fp16)]))
    assert 0 < comparison["mean_abs_dp"] < 0.01  # fp16 differs a little from fp32
    # The same questions give the same p_yes without --compare; the table names every metric.
    assert [o["p_yes"] for o in fp32] == pytest.approx(p, abs=1e-9)
    assert re.search(r"fp32\s+[\d.]+\s+[\d.]+\s+[\d.]+\s+[\d.]+\s+[\d.]+\s+[\d.]+\s+[\d.]+", result.stdout)
    assert "agreement" in result.stdout


@pytest.mark.parametrize("line, message", [
    ("{not json", "line 2: not JSON"),
    ('["image", "q", "yes"]', "line 2: expected an object"),
    ('{"image": "images/0.png", "question": "Is it?"}', "line 2: 'label' is missing"),
    ('{"image": "images/0.png", "label": "yes"}', "line 2: 'question' is missing or not a non-empty string \\('text'"),
    ('{"image": "images/0.png", "question": "Is it?", "label": "maybe"}', "line 2: label is 'maybe'; expected yes or no"),
    ('{"image": "images/none.png", "question": "Is it?", "label": "no"}', "line 2: image file not found"),
])
def test_bad_lines_are_named_by_their_number(pope, tiny_bundle, tmp_path, line, message):
    bad = tmp_path / "bad.jsonl"
    (tmp_path / "images").symlink_to(pope.parent / "images")
    good = pope.read_text().splitlines()[0]
    bad.write_text(f"{good}\n{line}\n{good}\n")
    result = run_eval(bad, "--model", str(tiny_bundle))
    assert result.returncode == 2 and re.search(message, result.stderr), result.stderr
    assert "Traceback" not in result.stderr


def test_ask_check_and_choices(tiny_bundle, pope):
    image = str(pope.parent / "images" / "1.png")
    check = tool("omnivision_ros.cli.ask", "--model", str(tiny_bundle), "--image", image, "--check", "Is the door open?")
    assert check.returncode == 0, check.stderr
    answer, p, mass = re.fullmatch(r"(yes|no)  p_yes ([\d.]+)  yes/no mass (\S+)\n", check.stdout).groups()
    assert (answer == "yes") == (float(p) >= 0.5) and 0 < float(mass) <= 1
    assert re.search(r"encode [\d.]+ ms \| prefill [\d.]+ ms \(\d+ tok\) \| decision [\d.]+ ms", check.stderr)
    strict = tool("omnivision_ros.cli.ask", "--model", str(tiny_bundle), "--image", image, "--check",
                  "--threshold", str(min(float(p) + 0.001, 1.0)), "Is the door open?")
    assert strict.stdout.startswith("no  p_yes " + p)

    choices = tool("omnivision_ros.cli.ask", "--model", str(tiny_bundle), "--image", image, "--choices",
                   "open, closed,ajar", "What state is the door in?")
    assert choices.returncode == 0, choices.stderr
    lines = choices.stdout.splitlines()
    rows = [re.fullmatch(r"  (\w+)\s+p ([\d.]+)  mean log-prob/token (-?[\d.]+)", line).groups() for line in lines[1:]]
    assert lines[0] == rows[0][0] and {r[0] for r in rows} == {"open", "closed", "ajar"}
    assert [float(r[1]) for r in rows] == sorted((float(r[1]) for r in rows), reverse=True)
    assert sum(float(r[1]) for r in rows) == pytest.approx(1.0, abs=2e-3)

    for args, message in ((["--choices", "open,open"], "option 1 'open' repeats option 0"),
                          (["--choices", "open,"], "option 1 is empty"),
                          (["--check", "--threshold", "1.5"], "--threshold must be in")):
        bad = tool("omnivision_ros.cli.ask", "--model", str(tiny_bundle), "--image", image, *args, "Is it?")
        assert bad.returncode == 2 and message in bad.stderr and "Traceback" not in bad.stderr
