"""Open a model by name or path: a preset (random weights), a folder of GGUF files, or a model bundle."""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Callable

from omnivision_ros.errors import OmniVisionError
from omnivision_ros.model.bundle import MANIFEST
from omnivision_ros.model.config import PRESETS
from omnivision_ros.model.tokenizer import TextTokenizer
from omnivision_ros.runtime.backend import BACKENDS, Backend


def open_model(
    model: str,
    backend: str = "auto",
    threads: int | None = None,
    seed: int = 0,
    precision: str | None = None,
    log: Callable[[str], None] | None = None,
    lm_file: str | None = None,
    mmproj_file: str | None = None,
) -> tuple[Backend, TextTokenizer]:
    """Return (backend, tokenizer) for `model`: a preset name, a folder of GGUF files, or a bundle.

    precision picks a bundle variant (fp32, fp16, ...; None = the backend's default); lm_file / mmproj_file
    pick files of a GGUF folder that holds several (None = the default choice, model/gguf_files.py);
    `log` receives one-line notes such as which backend and which files were chosen and why."""
    if backend not in BACKENDS:
        raise OmniVisionError(f"unknown backend '{backend}'; choose one of {', '.join(BACKENDS)}")
    if (lm_file or mmproj_file) and not any(Path(model).glob("*.gguf")):
        raise OmniVisionError(
            f"lm_file / mmproj_file choose among the GGUF files of a folder; '{model}' is not a folder of GGUF files"
        )
    if precision and not (Path(model) / MANIFEST).is_file():
        raise OmniVisionError(
            f"precision '{precision}' selects a variant of an exported bundle; '{model}' is not a bundle "
            f"(presets and GGUF folders run in float32 on the torch backend)"
        )
    if model in PRESETS:
        if backend not in ("auto", "torch"):
            raise OmniVisionError(
                f"preset '{model}' runs on the torch backend only; export a bundle with "
                f"`omnivision-export --model {model} --out DIR` to use {backend}"
            )
        _require_torch(f"preset '{model}'")
        from omnivision_ros.model.vision_language_model import OmniVisionModel
        from omnivision_ros.runtime.torch_backend import TorchBackend

        return TorchBackend(OmniVisionModel.random(PRESETS[model], seed), threads), TextTokenizer.synthetic()
    path = Path(model)
    if not path.exists():
        raise OmniVisionError(
            f"model '{model}' is neither a preset ({', '.join(sorted(PRESETS))}) nor an existing directory"
        )
    if not path.is_dir():
        raise OmniVisionError(f"model path {model} is a file; pass the directory that holds the model files")
    if (path / MANIFEST).is_file():
        return _open_bundle(path, backend, threads, precision, log)
    if any(path.glob("*.gguf")):
        # The released weights: a qwen2 language model + an mmproj, loaded into the model's PyTorch modules.
        if backend not in ("auto", "torch"):
            raise OmniVisionError(
                f"{model} holds GGUF files, which run on the torch backend only; convert them with "
                f"`omnivision-export --model {model} --out BUNDLE` and open the bundle to use {backend}"
            )
        _require_torch(f"the GGUF folder {model}")
        from omnivision_ros.model.gguf_loader import load_gguf_model

        # The files are checked before torch is imported: a wrong file fails in a fraction of a second.
        loaded, tokenizer = load_gguf_model(path, lm_file, mmproj_file, log)
        from omnivision_ros.runtime.torch_backend import TorchBackend

        return TorchBackend(loaded, threads), tokenizer
    raise OmniVisionError(f"{model} holds no model this version can load (expected a preset name)")


def _require_torch(what: str) -> None:
    # Robots run bundles without torch (requirements-node.txt); say what to do instead of an ImportError.
    missing = [name for name in ("torch", "transformers") if importlib.util.find_spec(name) is None]
    if missing:
        raise OmniVisionError(
            f"{what} runs on the torch reference backend, and {' and '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not installed here; "
            f"export a bundle with `omnivision-export` where torch is installed and give its directory instead"
        )


def _open_bundle(
    path: Path, backend: str, threads: int | None, precision: str | None, log: Callable[[str], None] | None
) -> tuple[Backend, TextTokenizer]:
    """An exported bundle: TensorRT where it can run (auto, tensorrt), else ONNX Runtime; never torch.

    The bundle is opened once, and TensorRT and the GPU probed once, whatever is chosen. Under `auto`, TensorRT
    failing to open (an engine build or load failing, out of GPU memory) falls back to ONNX Runtime, saying why;
    an explicit `tensorrt` raises the OmniVisionError instead."""
    if backend == "torch":
        raise OmniVisionError(
            f"{path} is an exported bundle (ONNX graphs); the torch backend runs presets and GGUF folders only. "
            f"Use --backend auto or onnxruntime"
        )
    from omnivision_ros.model.bundle import open_bundle
    from omnivision_ros.runtime.backend_select import select_backend

    bundle = open_bundle(path)  # verifies the manifest, config and tokenizer before anything is loaded
    tokenizer = TextTokenizer.from_file(bundle.tokenizer_path)
    selection = select_backend(backend, bundle, log, precision)  # logs the choice and why
    if selection.backend == "tensorrt":
        try:
            return open_tensorrt_backend(bundle, precision or "fp16", probe=selection.probe, log=log), tokenizer
        except OmniVisionError as exc:
            if backend != "auto":
                raise
            if log is not None:
                log(f"backend: onnxruntime (TensorRT failed to open: {exc})")
    from omnivision_ros.runtime.ort_backend import OrtBackend

    return OrtBackend(bundle, precision=precision, threads=threads), tokenizer


def open_tensorrt_backend(bundle, precision: str = "fp16", probe=None, build: bool = True, cuda_graphs: bool = False,
                          options=None, log: Callable[[str], None] | None = None):
    """The TensorRT backend for an opened bundle: its matching engines, built first when they are missing or
    stale and `build` (the one place outside `omnivision-build-engines` that decides to build; it takes
    minutes on a Jetson). options=None accepts engines built with any options (as `omnivision-build-engines`
    left them); given options are what a build uses and what an existing engine must match."""
    from omnivision_ros.runtime import trt_engines as te
    from omnivision_ros.runtime.tensorrt_backend import open_tensorrt
    from omnivision_ros.runtime.trt_env import probe_tensorrt

    probe = probe or probe_tensorrt()
    precision = options.precision if options is not None else precision
    target = te.engine_target(bundle, precision, probe.version, probe.gpu.compute_capability)
    wanted = options.resolved(bundle.config) if options is not None else None
    decision = te.decide(Path(bundle.path) / te.ENGINES_DIR, target, wanted)
    if not decision.reuse:
        if not build:
            raise OmniVisionError(f"no usable TensorRT engines: {decision.reason}; "
                                  f"run `omnivision-build-engines {bundle.path} --precision {precision}`")
        from omnivision_ros.export.tensorrt_build import build_engines

        build_engines(bundle, wanted or te.EngineOptions(precision=precision), log=log or (lambda m: None),
                      probe=probe)  # logs the decision
    return open_tensorrt(bundle, precision, cuda_graphs=cuda_graphs, log=log, probe=probe)
