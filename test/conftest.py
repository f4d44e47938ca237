import os
from pathlib import Path

import numpy as np
import pytest
from torch_marks import HAVE_TORCH, SkippedModule, skip_without_torch

from omnivision_ros.model.config import get_preset
from omnivision_ros.model.tokenizer import TextTokenizer

# Test modules that import torch, transformers or the export tools at their top; where those are
# not installed they are reported as skipped instead of failing to import.
NEEDS_TORCH = {"test_cli.py", "test_cpu_variants.py", "test_gguf.py", "test_onnx_export.py", "test_projector.py",
               "test_model.py", "test_parity.py", "test_fp16_stress.py", "test_released_folder.py"}

# Keep ROS traffic of parallel test runs apart.
os.environ.setdefault("ROS_DOMAIN_ID", str(os.getpid() % 100 + 100))
os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")


def pytest_pycollect_makemodule(module_path, parent):
    if not HAVE_TORCH and module_path.name in NEEDS_TORCH:
        return SkippedModule.from_parent(parent, path=module_path)
    return None


@pytest.fixture(scope="session")
def tiny_config():
    return get_preset("tiny")


@pytest.fixture(scope="session")
def tokenizer():
    return TextTokenizer.synthetic()


@pytest.fixture(scope="session")
def tiny_model(tiny_config):
    skip_without_torch()
    from omnivision_ros.model.vision_language_model import OmniVisionModel

    return OmniVisionModel.random(tiny_config, seed=0)


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory):
    """The tiny preset (seed 0, the weights of `tiny_model`) exported once per session, fp32 + fp16.

    OMNIVISION_TEST_BUNDLE names one exported the same way elsewhere (`omnivision-export --model
    tiny --out DIR --fp16 --cpu-variants none --seed 0`): environments without torch test on it. Tests
    that write into a bundle (engines, corrupted files) copy it first. No CPU variant: the tests that
    run the default variant run fp32, and test_cpu_variants.py adds int8 and int4 to a copy."""
    from omnivision_ros.model.bundle import MANIFEST

    given = os.environ.get("OMNIVISION_TEST_BUNDLE")
    if given:
        if not (Path(given) / MANIFEST).is_file():
            pytest.fail(f"OMNIVISION_TEST_BUNDLE={given} is not a model bundle (no {MANIFEST})")
        return Path(given)
    skip_without_torch()
    from omnivision_ros.export.cli import main as export_main

    path = tmp_path_factory.getbasetemp() / "tiny-bundle"
    if not (path / MANIFEST).is_file():
        assert export_main(["--model", "tiny", "--out", str(path), "--fp16", "--cpu-variants", "none", "--seed", "0",
                            "--no-progress"]) == 0
    return path


@pytest.fixture
def scene_image():
    """A 480x640 BGR picture with distinct regions (not noise), so resizing behaves like on a photo."""
    rng = np.random.default_rng(7)
    img = np.zeros((480, 640, 3), np.uint8)
    img[:240, :320] = (255, 0, 0)
    img[:240, 320:] = (0, 255, 0)
    img[240:, :320] = (0, 0, 255)
    img[240:, 320:] = rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)
    return img
