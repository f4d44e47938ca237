"""Code-level checks: the lint (ruff, configured in ruff.toml), and what the package may import.

transformers is a test-only oracle (test_parity.py): no module of the package may import it. The runtime
(backends without torch, the generator, bundles, prompts, the tokenizer) must import without torch, as on
a Jetson or in a venv that has only ONNX Runtime.
"""
import importlib.util
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Modules that need torch by design (the model's PyTorch modules, export, the torch backend).
NEEDS_TORCH = ("omnivision_ros.model.vision", "omnivision_ros.model.projector", "omnivision_ros.model.language_model",
               "omnivision_ros.model.layers", "omnivision_ros.model.vision_language_model",
               "omnivision_ros.runtime.torch_backend", "omnivision_ros.export.")
# Optional packages a module may need that are not part of this check.
OPTIONAL = ("torch", "rclpy", "omnivision_interfaces", "rcl_interfaces", "sensor_msgs", "diagnostic_msgs",
            "std_msgs", "action_msgs", "builtin_interfaces", "rosbags", "launch", "ament_index_python")

IMPORT_ALL = """
import importlib, json, sys
blocked, names, optional = sys.argv[1].split(","), sys.argv[2].split(","), tuple(sys.argv[3].split(","))
for name in blocked:
    sys.modules[name] = None  # importing it raises ImportError, as if it were not installed
failed, skipped = {}, []
for name in names:
    try:
        importlib.import_module(name)
    except ImportError as exc:
        missing = getattr(exc, "name", None) or ""
        if missing in blocked or not missing.startswith(optional):
            failed[name] = repr(exc)
        else:
            skipped.append(name)
print(json.dumps({"failed": failed, "skipped": skipped, "imported": sorted(m for m in sys.modules if m in blocked)}))
"""


def package_modules() -> list[str]:
    import omnivision_ros

    return sorted(m.name for m in pkgutil.walk_packages(omnivision_ros.__path__, "omnivision_ros."))


def import_all(modules: list[str], blocked: list[str]) -> dict:
    import json

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", IMPORT_ALL, ",".join(blocked), ",".join(modules), ",".join(OPTIONAL)],
                          capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_package_lints_clean():
    if importlib.util.find_spec("ruff") is None:
        pytest.skip("ruff is not installed (requirements.txt pins it; `make setup` installs it)")
    done = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise", "."],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr


def test_no_module_of_the_package_imports_transformers():
    modules = package_modules()
    assert len(modules) > 30
    result = import_all(modules, ["transformers"])
    assert result["failed"] == {}, result["failed"]
    assert len(result["skipped"]) < len(modules) // 2, result["skipped"]  # most modules did import


def test_the_runtime_imports_without_torch():
    modules = [m for m in package_modules() if not m.startswith(NEEDS_TORCH)]
    result = import_all(modules, ["torch", "transformers"])
    assert result["failed"] == {}, result["failed"]
    for name in ("omnivision_ros.runtime.factory", "omnivision_ros.runtime.ort_backend", "omnivision_ros.runtime.generator",
                 "omnivision_ros.model.gguf_loader", "omnivision_ros.cli.ask", "omnivision_ros.cli.bench"):
        assert name in modules and name not in result["skipped"], name
