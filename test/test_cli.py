import os
import subprocess
import sys
from pathlib import Path

import pytest

SAMPLE = Path(__file__).resolve().parents[1] / "omnivision_ros" / "data" / "sample.jpg"


def ask(*args, timeout=120):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run(
        [sys.executable, "-m", "omnivision_ros.cli.ask", *args],
        capture_output=True, text=True, timeout=timeout, env=env,
    )


def test_answers_on_tiny_preset():
    result = ask("--preset", "tiny", "--image", str(SAMPLE), "--max-new-tokens", "6", "What do you see?")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()  # random weights: some text, meaning nothing
    timing = result.stderr.strip().splitlines()[-1]
    for field in ("encode", "prefill", "first token", "tokens", "tok/s"):
        assert field in timing


@pytest.mark.parametrize(
    "args, message",
    [
        (["--preset", "tiny", "--image", "/no/such/image.jpg", "What?"], "image file not found"),
        (["--preset", "tiny", "--image", __file__, "What?"], "cannot decode image"),
        (["--preset", "tiny", "--image", str(SAMPLE), "   "], "question is empty"),
        (["--preset", "gigantic", "--image", str(SAMPLE), "What?"], "unknown preset|neither a preset"),
        (["--model", "/no/such/dir", "--image", str(SAMPLE), "What?"], "neither a preset"),
    ],
)
def test_bad_input_gives_a_clear_error(args, message):
    import re

    result = ask(*args)
    assert result.returncode != 0
    assert re.search(message, result.stderr), result.stderr
    assert "Traceback" not in result.stderr


def test_bench_runs_every_system_on_the_tiny_preset(tmp_path):
    """omnivision-bench end to end at the tiny size: GGUF files written, a bundle and its CPU variants
    exported, each system measured in its own process; the torch backend and ONNX Runtime fp32 agree."""
    import json

    pytest.importorskip("torch", reason="the bench writes and exports models with torch")
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, "-m", "omnivision_ros.cli.bench", "--preset", "tiny", "--work", str(tmp_path / "work"),
         "--runs", "1", "--new-tokens", "2", "--threads", "1", "--json", str(out)],
        capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(out.read_text())
    assert list(report["medians"]) == ["torch", "ort-fp32", "ort-int8", "ort-int4"]
    same = report["accuracy"]["torch vs ort-fp32"]
    assert same["embeds_cosine"] > 0.99999 and same["logits_cosine"] > 0.99999
    assert same["greedy"]["leading_equal"] == 2
    decided = report["decisions"]["decide-int8"]  # Check, Choose and a watch cycle on the int8 variant
    assert all(value > 0 for value in decided["medians"].values())
    assert decided["check_cached_prompt_tokens"] < decided["check_prompt_tokens"] - 81
    assert [t["target"] for t in decided["targets"]] == ["Check on a new frame <= 1.1x Ask TTFT on it",
                                                        "Check on a cached frame <= 100 ms",
                                                        "4-camera watch cycle <= 4 single Checks"]
