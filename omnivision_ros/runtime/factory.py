"""Open a model by name or path: a preset (random weights), a folder of GGUF files, or a model bundle."""
from __future__ import annotations

from pathlib import Path

from omnivision_ros.errors import OmniVisionError
from omnivision_ros.model.config import PRESETS
from omnivision_ros.model.tokenizer import TextTokenizer
from omnivision_ros.runtime.backend import Backend

BACKENDS = ("auto", "onnxruntime", "tensorrt", "torch")


def open_model(model: str, backend: str = "auto", threads: int | None = None, seed: int = 0) -> tuple[Backend, TextTokenizer]:
    """Return (backend, tokenizer) for `model`, a preset name or a directory."""
    if backend not in BACKENDS:
        raise OmniVisionError(f"unknown backend '{backend}'; choose one of {', '.join(BACKENDS)}")
    if model in PRESETS:
        if backend not in ("auto", "torch"):
            raise OmniVisionError(
                f"preset '{model}' runs on the torch reference backend only; export a bundle with "
                f"`omnivision-export --model {model} --out DIR` to use {backend}"
            )
        from omnivision_ros.model.reference import OmniVisionReference
        from omnivision_ros.runtime.torch_backend import TorchBackend

        return TorchBackend(OmniVisionReference(PRESETS[model], seed=seed), threads), TextTokenizer.synthetic()
    path = Path(model)
    if not path.exists():
        raise OmniVisionError(
            f"model '{model}' is neither a preset ({', '.join(sorted(PRESETS))}) nor an existing directory"
        )
    if not path.is_dir():
        raise OmniVisionError(f"model path {model} is a file; pass the directory that holds the model files")
    raise OmniVisionError(f"{model} holds no model this version can load (expected a preset name)")
