"""Skips for tests that need torch and transformers (the PyTorch reference, export).

The Jazzy/3.10 and Jazzy/3.12 environments have neither, as on a robot: they run the node and
ONNX Runtime on a bundle exported once by the Kilted/3.11 environment (OMNIVISION_TEST_BUNDLE).
"""
import importlib.util

import pytest

HAVE_TORCH = all(importlib.util.find_spec(name) is not None for name in ("torch", "transformers"))
TORCH_REASON = ("needs torch and transformers, which this environment does not have (it runs the node "
                "and ONNX Runtime only, as a robot does; requirements-node.txt)")
requires_torch = pytest.mark.skipif(not HAVE_TORCH, reason=TORCH_REASON)


def skip_without_torch() -> None:
    if not HAVE_TORCH:
        pytest.skip(TORCH_REASON)


class SkippedModule(pytest.Module):
    """A test module that imports torch (or the export tools) at its top: reported skipped, not imported."""

    def collect(self):
        pytest.skip(f"{self.path.name} {TORCH_REASON}", allow_module_level=True)
