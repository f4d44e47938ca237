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
