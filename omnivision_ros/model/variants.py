"""Bundle variants and precision names: the one table every exporter, backend and command reads.

A variant is one pair of graphs (vision + decoder) in a bundle, named by its folder. Users ask for a
precision ("fp32", "fp16", "int8", "int4"); on ONNX Runtime each names one variant (`variant_spec`), on
TensorRT `TENSORRT_VARIANTS` says which (there "int4" is gpu-int4, the weight-only INT4 decoder TensorRT
parses; cpu-int4 uses ONNX Runtime's CPU-only kernels). `io` is the dtype of a variant's graph inputs,
outputs and KV cache (what the manifest records as "precision"): the CPU variants keep float32 I/O and
quantize their weights inside the graph; gpu-int4 has the fp16 variant's I/O.
"""
from __future__ import annotations

from dataclasses import dataclass

from omnivision_ros.errors import OmniVisionError

IO_DTYPES = {"fp32": "float32", "fp16": "float16"}  # io name -> NumPy / torch dtype name


@dataclass(frozen=True)
class Quantization:
    """How a quantized variant's weights are stored (export/cpu_optimize.py builds the CPU variants from this,
    export/gpu_int4.py the GPU one)."""

    bits: int  # decoder matrices: symmetric, block-wise (MatMulNBits on the CPU, DequantizeLinear on the GPU)
    block_size: int
    head_bits: int = 8  # the tied embedding / lm_head (llama.cpp's Q4_0 files keep it Q8_0 too); 16 = float16
    head_block_size: int = 128
    accuracy_level: int = 4  # MatMulNBits: 4 = int8 activations (VNNI dot products); 1 (float32) is 1.4-1.6x slower
    vision: str = "dynamic"  # "dynamic": DynamicQuantizeMatMul; "nbits": MatMulNBits (per-block activation scales);
    # "fp16": the fp16 variant's vision graph, shared


@dataclass(frozen=True)
class VariantSpec:
    name: str  # the variant's name in the manifest and its folder ("fp32" lives at the bundle root)
    precision: str  # what a user asks for
    io: str  # dtype of graph I/O, activations outside the quantized ops, and the KV cache
    exported: bool  # written by the ONNX exporter (standard ops, TensorRT-parsable); else derived from fp32
    cpu_only: bool  # uses ONNX Runtime contrib ops only its CPU provider runs
    quantization: Quantization | None = None

    @property
    def folder(self) -> str:
        """Where the variant's graphs live, relative to the bundle: "" (root) or "name/"."""
        return "" if self.name == "fp32" else self.name + "/"

    @property
    def numpy_dtype(self) -> str:
        return IO_DTYPES[self.io]


# Measured at full size, 2 cores (docs/performance.md). int8: blocks of 128 decode ~14 % faster than blocks of
# 32 (logits' cosine to fp32 0.998 vs 0.999). int4: blocks of 128 (4.25 bits/weight with the float32 scales;
# llama.cpp's Q4_0 stores 4.5) decode ~20 % faster than blocks of 32 and prefill ~15 % faster, for a logits'
# cosine of 0.866 instead of 0.880. 4-bit misses the 0.99 bound whatever the block size on these random
# weights, so int4 is never a default.
VARIANTS: dict[str, VariantSpec] = {
    "fp32":     VariantSpec("fp32", "fp32", io="fp32", exported=True, cpu_only=False),
    "fp16":     VariantSpec("fp16", "fp16", io="fp16", exported=True, cpu_only=False),
    "cpu-int8": VariantSpec("cpu-int8", "int8", io="fp32", exported=False, cpu_only=True,
                            quantization=Quantization(bits=8, block_size=128)),
    "cpu-int4": VariantSpec("cpu-int4", "int4", io="fp32", exported=False, cpu_only=True,
                            quantization=Quantization(bits=4, block_size=128)),
    # Weight-only INT4 for TensorRT (W4A16): the fp16 decoder with its matrices as INT4 blocks of 32 along the
    # input axis through DequantizeLinear (opset 21), the form TensorRT's ONNX parser turns into weight-only
    # INT4 GEMMs on Ampere and later (Orin is sm_87). Blocks of 32 store 4.5 bits per weight with their
    # float16 scales, as llama.cpp's Q4_0 does, and hold its accuracy (docs/performance.md); the tied
    # embedding / lm_head stays float16: its error lands in the logits unattenuated, and it also serves the
    # token lookup. Derived from the fp16 graphs (export/gpu_int4.py); the vision graph is the fp16 one.
    "gpu-int4": VariantSpec("gpu-int4", "int4", io="fp16", exported=False, cpu_only=False,
                            quantization=Quantization(bits=4, block_size=32, head_bits=16, accuracy_level=1,
                                                      vision="fp16")),
}

PRECISIONS = tuple(dict.fromkeys(spec.precision for spec in VARIANTS.values()))  # fp32, fp16, int8, int4
EXPORTED = tuple(name for name, spec in VARIANTS.items() if spec.exported)  # what omnivision-export writes
CPU_VARIANTS = tuple(spec.precision for spec in VARIANTS.values() if spec.cpu_only)  # --cpu-variants int8,int4
GPU_INT4 = "gpu-int4"
# TensorRT precision -> the variant its engines are built from; fp16 first: the default.
TENSORRT_VARIANTS = {"fp16": "fp16", "fp32": "fp32", "int4": GPU_INT4}
TENSORRT_PRECISIONS = tuple(TENSORRT_VARIANTS)

# What runs when no precision is asked for, best first. On the CPU int8 weights decode ~3.5x faster than fp32
# and encode images ~2.5x faster, with cosine > 0.998 to fp32; int4 is faster still but drifts further from
# fp32 (cosine ~0.87 on random weights), so it is never picked implicitly. GPUs take fp16.
CPU_DEFAULT_ORDER = ("cpu-int8", "fp32")
GPU_DEFAULT_ORDER = ("fp16", "fp32")


def variant_spec(name_or_precision: str) -> VariantSpec:
    """The variant a precision ("int8") or a variant name ("cpu-int8") stands for on ONNX Runtime (a
    precision names its first variant in VARIANTS: "int4" is cpu-int4; TensorRT reads TENSORRT_VARIANTS)."""
    spec = VARIANTS.get(name_or_precision)
    if spec is not None:
        return spec
    for spec in VARIANTS.values():
        if spec.precision == name_or_precision:
            return spec
    raise OmniVisionError(f"unknown precision '{name_or_precision}'; choose one of {', '.join(PRECISIONS)}")


def tensorrt_variant(precision: str) -> str:
    """The bundle variant TensorRT engines of `precision` are built from ("int4" -> "gpu-int4")."""
    try:
        return TENSORRT_VARIANTS[precision]
    except KeyError:
        raise OmniVisionError(f"unknown TensorRT precision '{precision}'; choose one of "
                              f"{', '.join(TENSORRT_PRECISIONS)}") from None


def default_variant(available: list[str], device: str) -> str:
    """The variant to run when none is asked for, among the bundle's `available` ones."""
    order = GPU_DEFAULT_ORDER if device == "cuda" else CPU_DEFAULT_ORDER
    return next((name for name in order if name in available), "fp32")
