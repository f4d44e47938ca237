"""Write a model bundle: config, tokenizer, ONNX graphs per exported precision, manifest (see model/bundle.py).

The bundle is assembled in a scratch directory beside the destination and moved into place at the
end, so an interrupted export never leaves a half-written bundle that looks complete.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from tqdm import tqdm

from omnivision_ros.errors import OmniVisionError
from omnivision_ros.export import manifest as mf
from omnivision_ros.export.onnx_export import export_decoder, export_vision, in_dtype, torch_dtype
from omnivision_ros.model.bundle import CONFIG_FILE, MANIFEST, OPSET, TOKENIZER_FILE
from omnivision_ros.model.tokenizer import TextTokenizer
from omnivision_ros.model.variants import EXPORTED, VARIANTS
from omnivision_ros.model.vision_language_model import OmniVisionModel


def _prepare_destination(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise OmniVisionError(f"--out {out} is a file; give a directory for the bundle")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise OmniVisionError(f"--out {out} exists and is not empty; pass --force to replace a bundle there")
        if not (out / MANIFEST).is_file():
            raise OmniVisionError(f"--out {out} is not empty and holds no bundle ({MANIFEST}); refusing to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)


def export_bundle(
    model: OmniVisionModel,
    tokenizer: TextTokenizer,
    out: str | Path,
    precisions: tuple[str, ...] = ("fp32",),
    source: str = "",
    opset: int = OPSET,
    force: bool = False,
    progress: bool = True,
) -> Path:
    """Export `model` into the bundle directory `out`; fp32 is always written (the source of truth)."""
    out = Path(out)
    unknown = sorted(set(precisions) - set(EXPORTED))
    if unknown:
        raise OmniVisionError(f"unknown precision(s) {unknown}; choose from {', '.join(EXPORTED)}")
    precisions = tuple(p for p in EXPORTED if p == "fp32" or p in precisions)
    _prepare_destination(out, force)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        steps = 2 * len(precisions) + 1
        with tqdm(total=steps, desc="export", unit="step", disable=not progress) as bar:
            model.config.save(staging / CONFIG_FILE)
            tokenizer.save(staging / TOKENIZER_FILE)
            manifest = mf.new_manifest(model.config, source,
                                       exporter="torch.onnx.export (TorchScript-based, dynamo=False)")
            manifest["opset"] = opset
            for precision in precisions:
                spec = VARIANTS[precision]
                (staging / spec.folder).mkdir(exist_ok=True)
                converted = in_dtype(model, torch_dtype(precision))  # once for both graphs
                bar.set_description(f"{precision} vision")
                export_vision(converted, staging / f"{spec.folder}vision.onnx", precision, opset)
                bar.update()
                bar.set_description(f"{precision} decoder")
                export_decoder(converted, staging / f"{spec.folder}decoder.onnx", precision, opset)
                bar.update()
                del converted
                manifest["variants"][precision] = mf.variant_entry(staging, spec)
            bar.set_description("hashing")
            files = sorted(p.relative_to(staging).as_posix() for p in staging.rglob("*") if p.is_file())
            mf.commit(staging, manifest, files)
            bar.update()
        os.chmod(staging, 0o755)  # mkdtemp makes it 0700
        for folder in {staging / VARIANTS[p].folder for p in precisions}:
            os.chmod(folder, 0o755)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / "bundle")
            os.replace(staging, out)
            shutil.rmtree(old)
        else:
            os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out
