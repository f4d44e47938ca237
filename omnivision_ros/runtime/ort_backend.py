"""The ONNX Runtime backend: a bundle's graphs on the CPU provider, or the CUDA provider when present.

A decoder session keeps its KV cache as OrtValues on the execution device. Each run binds the
previous run's present K/V outputs as the next run's past inputs (IOBinding), so the cache never
travels through NumPy; only the logits of the last position come back to the host.
"""
from __future__ import annotations

import numpy as np
import onnxruntime as ort

from omnivision_ros.errors import OmniVisionError
from omnivision_ros.model.bundle import (
    VISION_INPUTS,
    VISION_OUTPUTS,
    Bundle,
    decoder_input_names,
    decoder_output_names,
)
from omnivision_ros.model.variants import IO_DTYPES, VARIANTS, default_variant, variant_spec
from omnivision_ros.runtime.backend import Backend, DecoderSession

# ONNX Runtime fuses DequantizeLinear + MatMul (the gpu-int4 graphs) into MatMulNBits and by default runs it
# with int8-quantized activations (accuracy level 4); level 1 keeps float32 math on the dequantized weights, as
# TensorRT's weight-only INT4 GEMMs do, so a CPU run of those graphs checks what a Jetson runs.
ORT_INT4_SESSION_CONFIG = {"session.qdq_matmulnbits_accuracy_level": "1"}
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
DEVICES = ("auto", "cpu", "cuda")


def resolve_variant(bundle: Bundle, precision: str | None, device: str) -> str:
    """The bundle variant for a requested precision ("fp32", "fp16", "int8", "int4" or a variant folder name)."""
    if precision is None:
        return default_variant(bundle.variants, device)
    variant = precision if precision in bundle.variants else variant_spec(precision).name
    if variant not in bundle.variants:
        hint = ""
        if VARIANTS[variant].cpu_only:
            hint = (f"; add it with `omnivision-export --model {bundle.path} --out {bundle.path} "
                    f"--cpu-variants {VARIANTS[variant].precision}`")
        raise OmniVisionError(
            f"bundle {bundle.path} has no '{precision}' variant (it has: {', '.join(bundle.variants)}){hint}"
        )
    if device == "cuda" and _cpu_only(variant):
        raise OmniVisionError(f"'{precision}' is a CPU variant (ONNX Runtime CPU kernels); use it with device 'cpu'")
    return variant


def _cpu_only(variant: str) -> bool:
    spec = VARIANTS.get(variant)
    return spec is not None and spec.cpu_only


def _check_io(session: ort.InferenceSession, path, inputs, outputs) -> None:
    got_in = [i.name for i in session.get_inputs()]
    got_out = [o.name for o in session.get_outputs()]
    if got_in != list(inputs) or got_out != list(outputs):
        raise OmniVisionError(
            f"{path}: graph inputs/outputs {got_in} -> {got_out} do not match the contract "
            f"{list(inputs)} -> {list(outputs)}; re-export the bundle"
        )


class OrtBackend(Backend):
    name = "onnxruntime"

    def __init__(self, bundle: Bundle, precision: str | None = None, threads: int | None = None, device: str = "auto"):
        """precision: which variant of the bundle: "fp32", "fp16", "int8"/"int4" (the CPU variants cpu-int8,
        cpu-int4) or a variant's folder name. None: fp16 on CUDA when the bundle has it, else fp32; on the CPU
        cpu-int8 when the bundle has it, else fp32.
        device: "auto" (CUDA when onnxruntime has the CUDA provider and the variant is not a CPU one, else
        CPU), "cpu" or "cuda".
        threads: intra-op threads (None: onnxruntime's default, one per physical core)."""
        if device not in DEVICES:
            raise OmniVisionError(f"unknown device '{device}'; choose one of {', '.join(DEVICES)}")
        has_cuda = CUDA in ort.get_available_providers()
        if device == "cuda" and not has_cuda:
            raise OmniVisionError(
                "device 'cuda' asked for, but this onnxruntime has no CUDA provider (install onnxruntime-gpu)"
            )
        cpu_variant = precision is not None and _cpu_only(
            precision if precision in bundle.variants else variant_spec(precision).name)
        self.device = "cuda" if device == "cuda" or (device == "auto" and has_cuda and not cpu_variant) else "cpu"
        precision = resolve_variant(bundle, precision, self.device)
        graphs = bundle.variant(precision)  # verifies the graph files
        self.bundle = bundle
        self.config = bundle.config
        self.variant = graphs.name
        self.precision = graphs.precision  # dtype of activations, KV cache and graph I/O
        self.dtype = np.dtype(IO_DTYPES[graphs.precision])

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        for key, value in ORT_INT4_SESSION_CONFIG.items():
            options.add_session_config_entry(key, value)
        providers = [CUDA, CPU] if self.device == "cuda" else [CPU]
        try:
            self.vision = ort.InferenceSession(str(graphs.vision), options, providers=providers)
            self.decoder = ort.InferenceSession(str(graphs.decoder), options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types, all with a message
            raise OmniVisionError(f"onnxruntime cannot load the {precision} graphs of {bundle.path}: {exc}") from exc
        if self.device == "cuda" and CUDA not in self.decoder.get_providers():
            self.device = "cpu"  # onnxruntime fell back (CUDA libraries missing): keep the cache on the host
        self.input_names = decoder_input_names(self.config)
        self.output_names = decoder_output_names(self.config)
        _check_io(self.vision, graphs.vision, VISION_INPUTS, VISION_OUTPUTS)
        _check_io(self.decoder, graphs.decoder, self.input_names, self.output_names)

        c = self.config
        # Shared, never written: every run allocates fresh present tensors. Kept on the host: a
        # zero-size tensor costs nothing to hand to the device, and no provider sees a 0-byte buffer.
        empty = ort.OrtValue.ortvalue_from_numpy(np.zeros((1, c.lm_kv_heads, 0, c.lm_head_dim), self.dtype))
        self.empty_past = [empty] * len(self.input_names[3:])
        self.no_image = self.image_table(np.zeros((c.mp_tokens, c.lm_hidden), np.float32))
        used = self.decoder.get_providers()[0].replace("ExecutionProvider", "")
        self.description = (
            f"ONNX Runtime {ort.__version__} {self.variant} on {used}, "
            f"{threads or 'default'} threads, bundle {bundle.path}"
        )

    def image_table(self, image_embeds: np.ndarray) -> ort.OrtValue:
        """[mp_tokens, H] -> the decoder's image_embeds input [1, mp_tokens, H] on the device."""
        return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(image_embeds[None], dtype=self.dtype), self.device)

    def encode_images(self, pixel_values):
        pixels = self.check_pixels(pixel_values)
        embeds = self.vision.run(None, {"pixel_values": np.ascontiguousarray(pixels, dtype=self.dtype)})[0]
        return embeds.astype(np.float32, copy=False)  # [B, mp_tokens, H]

    def new_session(self):
        return OrtSession(self, self.empty_past, 0, self.no_image, has_image=False)

    def close(self):
        self.vision = self.decoder = None
        self.empty_past = self.no_image = None


class OrtSession(DecoderSession):
    """One sequence (batch 1) whose KV cache lives in OrtValues on the backend's device."""

    def __init__(self, backend: OrtBackend, past: list, length: int, image: ort.OrtValue, has_image: bool):
        super().__init__(backend.config, backend.config.lm_max_context, length, has_image)
        self.backend = backend
        self.past = past  # OrtValues [1, kv, length, hd], in decoder input order
        self.image = image

    def _run(self, ids: np.ndarray, image_embeds: np.ndarray | None) -> np.ndarray:
        backend = self.backend
        if image_embeds is not None:
            self.image = backend.image_table(image_embeds)
        positions = np.arange(self.length, self.length + ids.size, dtype=np.int32)[None]
        binding = backend.decoder.io_binding()
        binding.bind_cpu_input("input_ids", ids[None])  # [1, T] int32
        binding.bind_cpu_input("position_ids", positions)
        binding.bind_ortvalue_input("image_embeds", self.image)
        for name, value in zip(backend.input_names[3:], self.past):
            binding.bind_ortvalue_input(name, value)
        binding.bind_output("logits", "cpu")
        for name in backend.output_names[1:]:
            binding.bind_output(name, backend.device)
        backend.decoder.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        self.past = list(outputs[1:])
        return outputs[0].numpy()[0]  # [vocab] float32

    def _fork(self):
        # The cache OrtValues are never written after the run that made them (the next run allocates
        # new present tensors), so the copy can share them: forks diverge without touching each other.
        return OrtSession(self.backend, list(self.past), self.length, self.image, self.has_image)

    def _close(self):
        self.past = None
        self.image = None
