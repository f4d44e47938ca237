"""CPU variants of a bundle, derived from its fp32 graphs: ONNX Runtime contrib ops and int8/int4 weights.

The standard graphs stay the source of truth (TensorRT builds from them, CI checks them against the
model). A CPU variant is built from the model's weights, by the model's parameter names
(`blocks.3.gate_up.weight`, ...): from the model itself when it is at hand (`omnivision-export --model
GGUF --cpu-variants ...`), else from the bundle's fp32 graphs, which keep those names. The graphs have the
same inputs and outputs but are made of the fused operators ONNX Runtime's CPU provider runs fastest (a
decoder layer is 10 kernels instead of ~60 standard ones, which matters when a whole decode step takes
~20 ms):

- decoder: SkipSimplifiedLayerNormalization (residual add + RMSNorm), GroupQueryAttention (RoPE, GQA
  and the past/present concat in one kernel), MatMulNBits (block-wise int8/int4 weights, int8
  activations with `accuracy_level` 4: VNNI dot products), QuickGelu(alpha=1) = SiLU, and the tied
  embedding quantized once and used twice: MatMulNBits for the lm_head, GatherBlockQuantized for the
  token lookup (no float32 151936 x 896 table in memory);
- vision: SkipLayerNormalization, MultiHeadAttention, FastGelu/BiasGelu, and DynamicQuantizeMatMul
  (int8 GEMMs with per-column weight scales and per-tensor dynamic activation scales: the 729-token
  GEMMs are compute-bound and run ~4x faster than float32 on VNNI). `vision_quant="nbits"` uses
  MatMulNBits (per-block activation scales, more robust to activation outliers, ~1.5x slower).

The variants share the contract's I/O (float32 inputs, outputs and KV cache), so the ONNX Runtime
backend runs them unchanged; they are registered in the manifest as `cpu-int8`, `cpu-int4`, with the
settings of model/variants.py.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from omnivision_ros.errors import OmniVisionError
from omnivision_ros.export import manifest as mf
from omnivision_ros.model.bundle import (
    ONNX_IR_VERSION,
    OPSET,
    decoder_input_names,
    decoder_output_names,
    open_bundle,
)
from omnivision_ros.model.config import OmniVisionConfig
from omnivision_ros.model.variants import CPU_VARIANTS, Quantization, VariantSpec, variant_spec

MS = "com.microsoft"
VISION_QUANT = ("dynamic", "nbits")
# Names of the decoder graph's weights are LanguageModel's parameter names, the vision graph's those of
# ImageEncoder; bundles of format 1 named the vision weights otherwise.
FIRST_FORMAT_WITH_MODEL_NAMES = 2


def variant_for(kind: str) -> VariantSpec:
    """The CPU variant a precision names ("int8" -> cpu-int8)."""
    spec = variant_spec(kind) if kind in CPU_VARIANTS else None
    if spec is None:
        raise OmniVisionError(f"unknown CPU variant '{kind}'; choose from {', '.join(CPU_VARIANTS)}")
    return spec


def describe(spec: VariantSpec) -> str:
    q = spec.quantization
    return (f"decoder int{q.bits} weights (blocks of {q.block_size}, symmetric, int8 compute), "
            f"int{q.head_bits} tied embedding/lm_head, vision int8 ({q.vision}); "
            f"ONNX Runtime contrib ops, CPU only")


# ---------------------------------------------------------------------------------------------
# Reading the fp32 graph's weights


WeightSource = Callable[[str], np.ndarray]  # parameter name -> array, linear weights as [in, out]


class Weights:
    """The initializers of an exported graph by name, external data memory-mapped (nothing copied).

    Names are the model's parameter names; weights of linear layers come as the graph stores them for its
    MatMuls, [in, out]. The TorchScript exporter stores identical tensors once and feeds the other names
    through Identity nodes; those names resolve to the stored tensor.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        graph = onnx.load(str(path), load_external_data=False).graph
        self.tensors = {t.name: t for t in graph.initializer}
        self.aliases = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "Identity"}
        self._maps: dict[str, np.memmap] = {}

    def __call__(self, name: str) -> np.ndarray:
        seen = name
        while name not in self.tensors and name in self.aliases:
            name = self.aliases[name]
        tensor = self.tensors.get(name)
        if tensor is None:
            raise OmniVisionError(f"{self.path}: no weight named '{seen}'; was this graph written by "
                                  "omnivision-export?")
        if tensor.data_location != TensorProto.EXTERNAL:
            return numpy_helper.to_array(tensor)
        info = {e.key: e.value for e in tensor.external_data}
        file = self.path.parent / info["location"]
        if file not in self._maps:
            self._maps[file] = np.memmap(file, dtype=np.uint8, mode="r")
        start = int(info.get("offset", 0))
        raw = self._maps[file][start:start + int(info["length"])]
        dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
        return raw.view(dtype).reshape(tuple(tensor.dims))


# ---------------------------------------------------------------------------------------------
# Graph building


class GraphBuilder:
    """Nodes and initializers of one graph; `op` returns the output names."""

    def __init__(self):
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._count = 0

    def const(self, name: str, array) -> str:
        # np.asarray, not np.ascontiguousarray: the latter turns a 0-d scalar into shape [1]
        self.initializers.append(numpy_helper.from_array(np.asarray(array, order="C"), name))
        return name

    def ints(self, name: str, values, dtype=np.int64) -> str:
        return self.const(name, np.array(values, dtype))

    def op(self, op_type: str, inputs: list[str], outputs: int | list[str] = 1, name: str = "", domain: str = "",
           **attrs) -> list[str]:
        self._count += 1
        name = name or f"{op_type}_{self._count}"
        if isinstance(outputs, int):
            outputs = [f"{name}/out{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, outputs, name=name, domain=domain, **attrs))
        return outputs

    def one(self, *args, **kwargs) -> str:
        return self.op(*args, **kwargs)[0]

    def model(self, name: str, inputs, outputs) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, name, inputs, outputs, self.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS, 1)],
                                  producer_name="omnivision_ros.cpu_optimize")
        model.ir_version = ONNX_IR_VERSION
        return model


def model_weights(model, prefix: str) -> WeightSource:
    """The same names and layouts as `Weights` of the exported graph, read from the model itself:
    `prefix` is the traced module's path ("language_model." for the decoder graph, "" for the vision one)."""
    import torch

    def read(name: str) -> np.ndarray:
        target = prefix + name
        try:
            tensor = model.get_parameter(target)
        except AttributeError:
            try:
                tensor = model.get_buffer(target)
            except AttributeError:
                raise OmniVisionError(f"the model has no weight named '{target}'") from None
        owner = model.get_submodule(target.rsplit(".", 1)[0]) if "." in target else model
        if isinstance(owner, torch.nn.Linear) and target.endswith(".weight"):
            tensor = tensor.t()  # as the graph's MatMul stores it: [in, out]
        return tensor.detach().to(torch.float32).numpy()

    return read


def quantize_blocks(weight: np.ndarray, bits: int, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """weight [K, N] float32 -> (packed uint8 [N, k_blocks, block_size * bits / 8], scales [N, k_blocks]):
    MatMulNBits' layout, symmetric (implied zero point 2^(bits-1)), quantized by ONNX Runtime's own kernels."""
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        DefaultWeightOnlyQuantizer,
    )

    config = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=True, bits=bits)
    packed, scales, _ = DefaultWeightOnlyQuantizer(config).qbits_block_quant(
        np.ascontiguousarray(weight, dtype=np.float32))
    return packed, scales


def matmul_nbits(g: GraphBuilder, x: str, weight: np.ndarray, name: str, spec: Quantization,
                 bias: np.ndarray | None = None) -> str:
    """x @ weight (+ bias) with weight [K, N] quantized block-wise to spec.bits."""
    k, n = weight.shape
    packed, scales = quantize_blocks(weight, spec.bits, spec.block_size)
    inputs = [x, g.const(name + ".qweight", packed), g.const(name + ".scales", scales)]
    if bias is not None:
        inputs += ["", "", g.const(name + ".bias", np.asarray(bias, np.float32))]  # no zero points, no g_idx
    return g.one("MatMulNBits", inputs, name=name, domain=MS, K=k, N=n, bits=spec.bits,
                 block_size=spec.block_size, accuracy_level=spec.accuracy_level)


def matmul_int8_dynamic(g: GraphBuilder, x: str, weight: np.ndarray, name: str,
                        bias: np.ndarray | None = None) -> str:
    """DynamicQuantizeMatMul: int8 weights with one scale per output column, activations quantized per call."""
    weight = np.asarray(weight, dtype=np.float32)
    scale = np.abs(weight).max(axis=0) / 127.0
    scale[scale == 0] = 1.0
    qweight = np.clip(np.rint(weight / scale), -127, 127).astype(np.int8)
    inputs = [x, g.const(name + ".qweight", qweight), g.const(name + ".scales", scale.astype(np.float32)),
              g.const(name + ".zero_points", np.zeros(weight.shape[1], np.int8))]
    if bias is not None:
        inputs.append(g.const(name + ".bias", np.asarray(bias, np.float32)))
    return g.one("DynamicQuantizeMatMul", inputs, name=name, domain=MS)


def _dim(g: GraphBuilder, tensor: str, axis: int, name: str) -> str:
    """Size of `tensor` along `axis` as an int64 scalar."""
    shape = g.one("Shape", [tensor], name=name + "/shape")
    return g.one("Gather", [shape, g.ints(name + ".axis", axis)], name=name)


def _decoder_io(c: OmniVisionConfig) -> tuple[list, list]:
    f32 = TensorProto.FLOAT

    def kv(name: str, length: str):
        return helper.make_tensor_value_info(name, f32, ["batch", c.lm_kv_heads, length, c.lm_head_dim])

    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT32, ["batch", "seq"]),
        helper.make_tensor_value_info("image_embeds", f32, ["batch", c.mp_tokens, c.lm_hidden]),
        helper.make_tensor_value_info("position_ids", TensorProto.INT32, ["batch", "seq"]),
        *(kv(name, "past") for name in decoder_input_names(c)[3:]),
    ]
    outputs = [
        helper.make_tensor_value_info("logits", f32, ["batch", c.lm_vocab]),
        *(kv(name, "total") for name in decoder_output_names(c)[1:]),
    ]
    return inputs, outputs


def build_decoder(w: WeightSource, config: OmniVisionConfig, spec: Quantization) -> onnx.ModelProto:
    """The decoder contract's graph (same I/O as decoder.onnx) on fused CPU kernels and int8/int4 weights."""
    c = config
    g = GraphBuilder()
    eps = float(c.lm_rms_eps)
    past_names, present_names = decoder_input_names(c)[3:], decoder_output_names(c)[1:]

    def param(name: str) -> str:
        return g.const(name, np.asarray(w(name), np.float32))

    # The tied embedding, quantized once. Its rows are the lm_head's output channels (N = vocab, K = hidden),
    # which is also the layout GatherBlockQuantized reads (blocks along the hidden axis, low nibble first).
    head = dataclasses.replace(spec, bits=spec.head_bits, block_size=spec.head_block_size)
    packed, scales = quantize_blocks(w("embed").T, head.bits, head.block_size)  # embed [vocab, H]
    lm_head = g.const("lm_head.qweight", packed)
    head_scales = g.const("lm_head.scales", scales)
    row_bytes = c.lm_hidden * head.bits // 8  # lm_head rows are padded to whole blocks; a table row is not
    table = g.const("embed.qweight", packed.reshape(c.lm_vocab, -1)[:, :row_bytes])

    # Token embeddings with image rows spliced in where ids >= vocab (the prompt table, as in decoder.onnx).
    ids, vocab, zero = "input_ids", g.ints("vocab", c.lm_vocab, np.int32), g.ints("zero_i32", 0, np.int32)
    is_image = g.one("GreaterOrEqual", [ids, vocab], name="/embed/is_image")
    token_ids = g.one("Where", [is_image, zero, ids], name="/embed/token_ids")
    tokens = g.one("GatherBlockQuantized", [table, token_ids, head_scales], name="/embed/tokens", domain=MS,
                   bits=head.bits, block_size=head.block_size, gather_axis=0, quantize_axis=1)  # [B, T, H]
    batch, seq, past = _dim(g, ids, 0, "/batch"), _dim(g, ids, 1, "/seq"), _dim(g, past_names[0], 2, "/past")
    first_rows = g.one("Range", [g.ints("zero_i64", 0), batch, g.ints("one_i64", 1)], name="/embed/batch_index")
    first_rows = g.one("Mul", [first_rows, g.ints("mp_tokens", c.mp_tokens)], name="/embed/first_rows")
    first_rows = g.one("Cast", [g.one("Unsqueeze", [first_rows, g.ints("axis1", [1])], name="/embed/first_rows2d")],
                       name="/embed/first_rows_i32", to=TensorProto.INT32)  # [B, 1]: row of image b in the table
    image_rows = g.one("Where", [is_image, g.one("Sub", [ids, vocab], name="/embed/image_row"), zero],
                       name="/embed/image_rows")
    image_rows = g.one("Add", [image_rows, first_rows], name="/embed/rows")
    images = g.one("Reshape", ["image_embeds", g.ints("table_shape", [-1, c.lm_hidden])], name="/embed/table")
    images = g.one("Gather", [images, image_rows], name="/embed/images")  # [B, T, H]
    is_image = g.one("Unsqueeze", [is_image, g.ints("axis_last", [-1])], name="/embed/mask")
    x = g.one("Where", [is_image, images, tokens], name="/embed/x")  # [B, T, H]

    # GroupQueryAttention's bookkeeping, shared by all layers: the total length, and per row its last index.
    total = g.one("Cast", [g.one("Add", [past, seq], name="/total_i64")], name="/total", to=TensorProto.INT32)
    last = g.one("Sub", [total, g.ints("one_i32", 1, np.int32)], name="/last")
    seqlens_k = g.one("Expand", [last, g.one("Unsqueeze", [batch, g.ints("axis0", [0])], name="/batch1d")],
                      name="/seqlens_k")  # [B]
    positions = g.one("Cast", ["position_ids"], name="/positions", to=TensorProto.INT64)
    half = c.lm_head_dim // 2  # the tables repeat their first half (rotate-half RoPE); GQA takes one half
    cos = g.const("cos_cache", np.asarray(w("cos")[:, :half], np.float32))
    sin = g.const("sin_cache", np.asarray(w("sin")[:, :half], np.float32))

    residual, hidden = x, None  # hidden: the previous block's output, not yet added to the residual stream
    for i in range(c.lm_layers):
        p = f"blocks.{i}."
        if hidden is None:
            normed = g.one("SimplifiedLayerNormalization", [x, param(p + "input_norm.weight")],
                           name=f"/{p}input_norm", axis=-1, epsilon=eps)
        else:
            normed, _, _, residual = g.op("SkipSimplifiedLayerNormalization",
                                          [hidden, residual, param(p + "input_norm.weight")], 4,
                                          name=f"/{p}input_norm", domain=MS, epsilon=eps)
        qkv = matmul_nbits(g, normed, w(p + "qkv.weight"), p + "qkv", spec, bias=w(p + "qkv.bias"))
        attn = g.op("GroupQueryAttention",
                    [qkv, "", "", past_names[2 * i], past_names[2 * i + 1], seqlens_k, total, cos, sin, positions],
                    [f"/{p}attn/out", present_names[2 * i], present_names[2 * i + 1]], name=f"/{p}attn", domain=MS,
                    num_heads=c.lm_heads, kv_num_heads=c.lm_kv_heads, do_rotary=1, rotary_interleaved=0)[0]
        o = matmul_nbits(g, attn, w(p + "o.weight"), p + "o", spec)
        normed, _, _, residual = g.op("SkipSimplifiedLayerNormalization", [o, residual, param(p + "post_norm.weight")],
                                      4, name=f"/{p}post_norm", domain=MS, epsilon=eps)
        gate_up = matmul_nbits(g, normed, w(p + "gate_up.weight"), p + "gate_up", spec)
        gate, up = g.op("Split", [gate_up, g.ints(p + "split", [c.lm_ffn, c.lm_ffn])], 2, name=f"/{p}split", axis=-1)
        silu = g.one("QuickGelu", [gate], name=f"/{p}silu", domain=MS, alpha=1.0)  # x * sigmoid(1.0 * x)
        hidden = matmul_nbits(g, g.one("Mul", [silu, up], name=f"/{p}swiglu"), w(p + "down.weight"), p + "down", spec)
    normed = g.op("SkipSimplifiedLayerNormalization", [hidden, residual, param("norm.weight")], 4,
                  name="/norm", domain=MS, epsilon=eps)[0]
    last = g.one("Gather", [normed, g.ints("last_position", -1)], name="/last_position", axis=1)  # [B, H]
    g.op("MatMulNBits", [last, lm_head, head_scales], ["logits"], name="lm_head", domain=MS, K=c.lm_hidden,
         N=c.lm_vocab, bits=head.bits, block_size=head.block_size, accuracy_level=head.accuracy_level)
    return g.model("decoder", *_decoder_io(c))


def build_vision(w: WeightSource, config: OmniVisionConfig, spec: Quantization) -> onnx.ModelProto:
    """The vision contract's graph (same I/O as vision.onnx) with int8 GEMMs and fused attention/norms."""
    if spec.vision not in VISION_QUANT:
        raise OmniVisionError(f"unknown vision quantization '{spec.vision}'; choose from {', '.join(VISION_QUANT)}")
    c = config
    g = GraphBuilder()
    eps = float(c.vit_ln_eps)

    def param(name: str) -> str:
        return g.const(name, np.asarray(w(name), np.float32))

    def linear(x: str, name: str, bias: bool = True) -> str:
        b = w(name + ".bias") if bias else None
        if spec.vision == "nbits":
            return matmul_nbits(g, x, w(name + ".weight"), name, Quantization(bits=8, block_size=128), bias=b)
        return matmul_int8_dynamic(g, x, w(name + ".weight"), name, bias=b)

    patches = g.one("Conv", ["pixel_values", param("vision.patch_embed.weight"), param("vision.patch_embed.bias")],
                    name="/patch_embed",
                    strides=[c.vit_patch_size, c.vit_patch_size])  # [B, D, 27, 27]
    patches = g.one("Reshape", [patches, g.ints("patch_shape", [0, c.vit_hidden, -1])], name="/patch_flatten")
    patches = g.one("Transpose", [patches], name="/patch_tokens", perm=[0, 2, 1])
    x = g.one("Add", [patches, param("vision.position")], name="/position")  # [B, 729, D]

    residual, hidden, hidden_bias = x, None, None  # hidden: the previous block's fc2 output, its bias not added
    for i in range(c.vit_layers):
        p = f"vision.blocks.{i}."
        if hidden is None:
            normed = g.one("LayerNormalization", [x, param(p + "norm1.weight"), param(p + "norm1.bias")],
                           name=f"/{p}norm1", axis=-1, epsilon=eps)
        else:
            normed, _, _, residual = g.op(
                "SkipLayerNormalization",
                [hidden, residual, param(p + "norm1.weight"), param(p + "norm1.bias"), hidden_bias], 4,
                name=f"/{p}norm1", domain=MS, epsilon=eps)
        qkv = linear(normed, p + "qkv")
        q, k, v = g.op("Split", [qkv, g.ints(p + "split", [c.vit_hidden] * 3)], 3, name=f"/{p}split", axis=-1)
        attn = g.one("MultiHeadAttention", [q, k, v], name=f"/{p}attn", domain=MS, num_heads=c.vit_heads)
        out = linear(attn, p + "out", bias=False)  # its bias goes into the next norm
        normed, _, _, residual = g.op(
            "SkipLayerNormalization",
            [out, residual, param(p + "norm2.weight"), param(p + "norm2.bias"), param(p + "out.bias")], 4,
            name=f"/{p}norm2", domain=MS, epsilon=eps)
        act = g.one("FastGelu", [linear(normed, p + "fc1", bias=False), param(p + "fc1.bias")],
                    name=f"/{p}gelu", domain=MS)  # tanh approximation, as SigLIP's gelu_pytorch_tanh
        hidden, hidden_bias = linear(act, p + "fc2", bias=False), param(p + "fc2.bias")
    x = g.op("SkipLayerNormalization",
             [hidden, residual, param("vision.post_norm.weight"), param("vision.post_norm.bias"), hidden_bias], 4,
             name="/post_norm", domain=MS, epsilon=eps)[0]
    x = g.one("Reshape", [x, g.ints("projector_shape", [-1, c.mp_tokens, c.mp_in])],
              name="/projector_groups")  # [B, 81, 10368]: contiguous groups of 9 tokens
    x = g.one("BiasGelu", [linear(x, "projector.fc1", bias=False), param("projector.fc1.bias")],
              name="/projector_gelu", domain=MS)  # exact (erf) GELU
    g.op("Identity", [linear(x, "projector.fc2")], ["image_embeds"], name="/image_embeds")
    f32 = TensorProto.FLOAT
    return g.model(
        "vision",
        [helper.make_tensor_value_info("pixel_values", f32, ["batch", 3, c.vit_image_size, c.vit_image_size])],
        [helper.make_tensor_value_info("image_embeds", f32, ["batch", c.mp_tokens, c.lm_hidden])],
    )


# ---------------------------------------------------------------------------------------------
# Bundle


def add_cpu_variants(bundle_path: str | Path, kinds: list[str] | tuple[str, ...], progress: bool = True,
                     force: bool = False, model=None) -> list[str]:
    """Build the CPU variants `kinds` ("int8", "int4") into BUNDLE/cpu-*/ and list them in the manifest (files
    hashed, graph I/O recorded). Returns the variant names written.

    Weights come from `model` (an OmniVisionModel, the one the bundle was exported from) when given, else from
    the bundle's fp32 graphs. A variant already in the manifest is kept unless `force`. Each variant is written
    to a scratch folder and moved into place before the manifest names it, so an interrupted build leaves the
    bundle valid.
    """
    from tqdm import tqdm

    specs = [variant_for(k) for k in dict.fromkeys(kinds)]
    root = Path(bundle_path)
    bundle = open_bundle(root)
    config = bundle.config
    todo = [s for s in specs if force or s.name not in bundle.variants]
    if not todo:
        return []
    if model is not None:
        decoder_w, vision_w = model_weights(model, "language_model."), model_weights(model, "")
    else:
        if bundle.format_version < FIRST_FORMAT_WITH_MODEL_NAMES:
            raise OmniVisionError(f"bundle {root} was written by an older omnivision-export (format "
                                  f"{bundle.format_version}); re-export it to add CPU variants")
        fp32 = bundle.variant("fp32")  # verifies the source graphs
        decoder_w, vision_w = Weights(fp32.decoder), Weights(fp32.vision)
    written = []
    with tqdm(total=2 * len(todo), desc="cpu variants", unit="graph", disable=not progress) as bar:
        for spec in todo:
            with mf.staged_variant(root, spec.name) as staging:
                bar.set_description(f"{spec.name} vision")
                mf.save_graph(build_vision(vision_w, config, spec.quantization), staging / "vision.onnx")
                bar.update()
                bar.set_description(f"{spec.name} decoder")
                mf.save_graph(build_decoder(decoder_w, config, spec.quantization), staging / "decoder.onnx")
                bar.update()
            manifest = mf.read_manifest(root)
            entry = mf.variant_entry(root, spec, derived_from="fp32", description=describe(spec))
            manifest["variants"][spec.name] = entry
            mf.commit(root, manifest, mf.variant_files(entry))
            written.append(spec.name)
    open_bundle(root, verify="sizes").variant(written[-1])  # the manifest checks (graph I/O vs the contract) pass
    return written
