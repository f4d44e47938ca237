"""omnivision-make-test-model: write a random-weight model as the two GGUF files of the OmniVision-968M release.

Same file names, architecture keys, metadata keys, tensor names and tensor types as the released
`Nano-Vlm-Processor-494M-F16.gguf` (llama.cpp qwen2 layout + tokenizer) and `mmproj-omni-vlm-f16.gguf`
(Nexa's converter: arch siglip, fc1 stored as ffn_down, the unused v.head.* tensors), so the real
loading code is what tests and benchmarks exercise. The weights are those of
`OmniVisionModel.random(config, seed)`: a test can rebuild the source model and compare.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

from omnivision_ros.errors import OmniVisionError, run_command
from omnivision_ros.model import gguf_names
from omnivision_ros.model.config import PRESETS, OmniVisionConfig, get_preset
from omnivision_ros.model.tokenizer import synthetic_tokenizer_json
from omnivision_ros.model.tokens import ADDED_TOKENS, ENDOFTEXT_ID, IM_END_ID, LAST_ADDED_ID

DTYPES = ("f16", "f32", "q8_0")
# release -> (language-model file, mmproj file) by dtype. The Hugging Face repo's names where it has the file
# (Nano-Vlm-Processor-494M-F16/-Q8_0, mmproj-omni-vlm-f16, omnivision-text-optimized-llm-f16/-Q8_0,
# omnivision-text-optimized-mmproj-f16/-f32), the same style for the others. The OCR variant is not on
# Hugging Face; its names here follow Nexa's hub (omnivision-ocr: model-fp16, projector-fp16).
FILE_NAMES = {
    "omnivision": (
        {"f16": "Nano-Vlm-Processor-494M-F16.gguf", "f32": "Nano-Vlm-Processor-494M-F32.gguf",
         "q8_0": "Nano-Vlm-Processor-494M-Q8_0.gguf"},
        {"f16": "mmproj-omni-vlm-f16.gguf", "f32": "mmproj-omni-vlm-f32.gguf", "q8_0": "mmproj-omni-vlm-q8_0.gguf"},
    ),
    "text-optimized": (
        {"f16": "omnivision-text-optimized-llm-f16.gguf", "f32": "omnivision-text-optimized-llm-f32.gguf",
         "q8_0": "omnivision-text-optimized-llm-Q8_0.gguf"},
        {"f16": "omnivision-text-optimized-mmproj-f16.gguf", "f32": "omnivision-text-optimized-mmproj-f32.gguf",
         "q8_0": "omnivision-text-optimized-mmproj-Q8_0.gguf"},
    ),
    "ocr": (
        {"f16": "omnivision-ocr-model-fp16.gguf", "f32": "omnivision-ocr-model-fp32.gguf",
         "q8_0": "omnivision-ocr-model-q8_0.gguf"},
        {"f16": "omnivision-ocr-projector-fp16.gguf", "f32": "omnivision-ocr-projector-fp32.gguf",
         "q8_0": "omnivision-ocr-projector-q8_0.gguf"},
    ),
}
RELEASES = tuple(FILE_NAMES)

def tensor_type(name: str, ndim: int, row: int, dtype: str):
    """GGML type the release uses for a tensor: matrices in the file's dtype, 1-D tensors F32.

    Nexa's converter keeps the conv kernel F16 and tensors whose name does not end in ".weight"
    (v.head.attention.in_weight) F32; llama.cpp falls back to F16 for rows not divisible by the block.
    """
    from gguf import GGMLQuantizationType as Q

    if dtype == "f32":
        return Q.F32
    if ndim == 4:
        return Q.F16
    if ndim != 2 or not name.endswith(".weight"):
        return Q.F32
    if dtype == "q8_0" and row % 32 == 0:
        return Q.Q8_0
    return Q.F16


def encode(array: np.ndarray, qtype) -> np.ndarray:
    """float32 [NumPy shape] -> the bytes/values stored for `qtype`."""
    from gguf.quants import quantize

    return quantize(np.ascontiguousarray(array, dtype=np.float32), qtype)


def _tokenizer_metadata(config: OmniVisionConfig) -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges) in llama.cpp's gpt2 layout, padded to the embedding rows."""
    from gguf import TokenType

    data = json.loads(synthetic_tokenizer_json())
    vocab = data["model"]["vocab"]
    tokens = [""] * len(vocab)
    for tok, i in vocab.items():
        tokens[i] = tok
    types = [int(TokenType.NORMAL)] * len(tokens)
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    if config.lm_vocab <= LAST_ADDED_ID:
        raise OmniVisionError(f"lm_vocab {config.lm_vocab} cannot hold the Qwen2.5 added tokens")
    for i in range(len(tokens), config.lm_vocab):
        tokens.append(f"[PAD{i}]")  # what llama.cpp's converter writes for embedding rows without a token
        types.append(int(TokenType.UNUSED))
    for tok, (i, control) in ADDED_TOKENS.items():
        tokens[i] = tok
        types[i] = int(TokenType.CONTROL if control else TokenType.USER_DEFINED)
    return tokens, types, merges


def _write(path: Path, arch: str, metadata: Callable, tensors: list, progress: bool) -> None:
    """Stream a GGUF file: header and tensor infos first, then each tensor produced, written and dropped."""
    from gguf import GGML_QUANT_SIZES, GGUFWriter
    from tqdm import tqdm

    writer = GGUFWriter(path, arch)
    metadata(writer)
    total = 0
    for name, shape, qtype, _ in tensors:
        block, size = GGML_QUANT_SIZES[qtype]
        nbytes = int(np.prod(shape)) * size // block
        writer.add_tensor_info(name, shape, np.dtype(np.float32), nbytes, raw_dtype=qtype)
        total += nbytes
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"writing {path.name}", disable=not progress) as bar:
        for name, shape, qtype, produce in tensors:
            data = encode(produce(), qtype)
            writer.write_tensor_data(data)
            bar.update(data.nbytes)
    writer.close()


def _file_type(dtype: str) -> int:
    return {"f32": 0, "f16": 1, "q8_0": 7}[dtype]  # llama.cpp LlamaFileType ALL_F32 / MOSTLY_F16 / MOSTLY_Q8_0


def write_test_model(out_dir: str | Path, config: OmniVisionConfig | str = "tiny", dtype: str = "f16",
                     seed: int = 0, progress: bool = False, release: str = "omnivision",
                     add_bos: bool | None = False) -> tuple[Path, Path]:
    """Write OmniVisionModel.random(config, seed) as (language-model GGUF, mmproj GGUF) into out_dir.

    release names the files (FILE_NAMES); add_bos is the tokenizer.ggml.add_bos_token value (None: key left out)."""
    import torch

    from omnivision_ros.model.gguf_loader import model_tensor
    from omnivision_ros.model.vision_language_model import OmniVisionModel

    if isinstance(config, str):
        config = get_preset(config)
    if dtype not in DTYPES:
        raise OmniVisionError(f"unknown dtype '{dtype}'; choose one of {', '.join(DTYPES)}")
    if release not in FILE_NAMES:
        raise OmniVisionError(f"unknown release '{release}'; choose one of {', '.join(RELEASES)}")
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OmniVisionError(f"cannot create output folder {out_dir}: {exc}") from exc
    model = OmniVisionModel.random(config, seed)

    def tensor(target: str) -> Callable[[], np.ndarray]:
        return lambda: model_tensor(model, target).to(torch.float32).numpy()

    def planned(names: dict[str, str]) -> list:
        out = []
        for gguf_name, target in names.items():
            shape = tuple(model_tensor(model, target).shape)
            out.append((gguf_name, shape, tensor_type(gguf_name, len(shape), shape[-1], dtype), tensor(target)))
        return out

    # LM file: llama.cpp qwen2 metadata + tokenizer.
    tokens, types, merges = _tokenizer_metadata(config)

    def lm_metadata(w) -> None:
        w.add_name("Nano-Vlm-Processor-494M" if config.name == "omnivision-968m" else f"omnivision-{config.name}")
        w.add_description(f"random weights (seed {seed}) written by omnivision-make-test-model; not a trained model")
        w.add_file_type(_file_type(dtype))
        if dtype == "q8_0":
            w.add_quantization_version(2)
        w.add_context_length(max(config.lm_max_context, 32768))
        w.add_embedding_length(config.lm_hidden)
        w.add_block_count(config.lm_layers)
        w.add_feed_forward_length(config.lm_ffn)
        w.add_head_count(config.lm_heads)
        w.add_head_count_kv(config.lm_kv_heads)
        if config.lm_head_dim * config.lm_heads != config.lm_hidden:
            w.add_key_length(config.lm_head_dim)
            w.add_value_length(config.lm_head_dim)
        w.add_rope_freq_base(config.lm_rope_theta)
        w.add_layer_norm_rms_eps(config.lm_rms_eps)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("qwen2")
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
        w.add_eos_token_id(IM_END_ID)
        w.add_pad_token_id(ENDOFTEXT_ID)
        w.add_bos_token_id(ENDOFTEXT_ID)
        if add_bos is not None:
            w.add_add_bos_token(add_bos)

    # mmproj file: exactly the keys of Nexa's convert_image_encoder_to_gguf.py.
    def mmproj_metadata(w) -> None:
        w.add_bool("siglip.has_omni_vlm_projector", True)
        w.add_file_type(_file_type(dtype))
        w.add_name("omni-vlm")
        w.add_description("image encoder for omni-vlm (random test weights)")
        w.add_uint32("siglip.vision.image_size", config.vit_image_size)
        w.add_uint32("siglip.vision.embedding_length", config.vit_hidden)
        w.add_uint32("siglip.vision.attention.head_count", config.vit_heads)
        w.add_uint32("siglip.vision.patch_size", config.vit_patch_size)
        w.add_uint32("siglip.vision.block_count", config.vit_layers)
        w.add_uint32("siglip.vision.feed_forward_length", config.vit_mlp)
        w.add_uint32("siglip.vision.projection_dim", config.mp_hidden)
        w.add_array("siglip.vision.image_mean", list(config.vit_image_mean))
        w.add_array("siglip.vision.image_std", list(config.vit_image_std))
        if config.vit_ln_eps != 1e-6:
            w.add_float32("siglip.vision.attention.layer_norm_epsilon", config.vit_ln_eps)

    rng = np.random.default_rng(seed)

    def head(name: str, shape: tuple[int, ...]) -> Callable[[], np.ndarray]:
        if name.endswith(".ln.weight"):
            return lambda: np.ones(shape, np.float32)
        return lambda: (rng.standard_normal(shape, dtype=np.float32) * 0.02)

    # Projector first, then the tower, then the head: the converter's order.
    mm_names = gguf_names.mmproj_names(config.vit_layers)
    mm_tensors = planned({k: v for k, v in mm_names.items() if k.startswith("mm.")})
    mm_tensors += planned({k: v for k, v in mm_names.items() if not k.startswith("mm.")})
    for name in gguf_names.MMPROJ_UNUSED:
        shape = gguf_names.unused_shape(name, config.vit_hidden, config.vit_mlp)
        mm_tensors.append((name, shape, tensor_type(name, len(shape), shape[-1], dtype), head(name, shape)))

    lm_path, mmproj_path = (out_dir / names[dtype] for names in FILE_NAMES[release])
    lm_tensors = planned(gguf_names.lm_names(config.lm_layers, config.lm_tie_embeddings))
    try:
        _write(lm_path, "qwen2", lm_metadata, lm_tensors, progress)
        _write(mmproj_path, "siglip", mmproj_metadata, mm_tensors, progress)
    except OSError as exc:
        raise OmniVisionError(f"cannot write the model files into {out_dir}: {exc}") from exc
    return lm_path, mmproj_path


def add_massive_activations(model, channel: int = 0, per_layer: float = 4e4, bias: float = 20.0) -> None:
    """Give a random model's decoder the "massive activations" of real Qwen2 checkpoints: one residual channel
    that every layer pushes further, far beyond float16's 65504 after a few layers, while each single
    tensor other than the residual stream stays inside float16's range (as in the released models, where
    the norms read the huge channel and the matmuls see normalized inputs).

    How: each layer's value bias is set to `bias` in every channel, so its attention output is close to
    that constant vector whatever the attention weights (they sum to one); the output projection's row
    `channel` is set to map that vector to `per_layer`. The final norm scales the massive channel down to
    1e-3 (trained models learn that) and the others up, so the logits depend on the ordinary channels.
    """
    import torch

    lm = model.language_model
    with torch.no_grad():
        for block in lm.blocks:
            v = block.qkv.part("v")
            block.qkv.bias[v] = bias
            width = block.o.weight.shape[1]  # heads * head_dim: the attention output
            block.o.weight[channel] = per_layer / (bias * width)
        lm.norm.weight.mul_(50.0)
        lm.norm.weight[channel] = 1e-3


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="omnivision-make-test-model", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", required=True, choices=sorted(PRESETS))
    parser.add_argument("--out", required=True, help="output folder (created if missing)")
    parser.add_argument("--dtype", default="f16", choices=DTYPES, help="matrices' type (default f16, as released)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--release", default="omnivision", choices=RELEASES, help=(
        "file names: omnivision (Nano-Vlm-Processor-494M-*, mmproj-omni-vlm-*; default), text-optimized, ocr"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> int:
        t0 = time.perf_counter()
        for path in write_test_model(args.out, args.preset, args.dtype, args.seed, progress=True,
                                     release=args.release):
            print(f"{path}  {path.stat().st_size / 1e6:.1f} MB")
        print(f"written in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        return 0

    return run_command("omnivision-make-test-model", body)


if __name__ == "__main__":
    sys.exit(main())
