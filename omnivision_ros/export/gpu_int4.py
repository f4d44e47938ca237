"""The gpu-int4 variant: the fp16 decoder graph with weight-only INT4 matrices that TensorRT parses.

Every decoder matrix (qkv, o, gate_up, down of each layer) becomes a constant INT4 tensor [K, N] with float16
scales [K / block, N], dequantized by a standard `DequantizeLinear` (opset 21: `axis=0`, `block_size`, no
zero point, i.e. symmetric) straight into its MatMul. That is the form TensorRT's ONNX parser imports as an
IDequantizeLayer on constant INT4 weights and fuses into weight-only INT4 GEMMs (TensorRT 10.x, Ampere and
later; Orin is sm_87): blocking along axis 0 of the [K, N] MatMul weight (the input channels), scales
strictly positive, zero points absent. ModelOpt's INT4 exporter writes the same form.

Quantization: symmetric, per block of `block_size` input channels and per output channel, values in
[-8, 7]. Each block's scale is chosen among absmax / d for divisors d in [6, 9] and their least-squares
refinements to minimise the block's squared error (llama.cpp's Q4_0 takes d = 8 with a signed scale so its
largest value is exactly -8, a level a positive scale cannot always reach; TensorRT needs positive scales). The tied embedding stays
float16 (model/variants.py says why); the vision graph is the fp16 variant's.

ONNX Runtime runs these graphs on its CPU provider too (that is how CI checks them); by default it fuses
DequantizeLinear + MatMul into MatMulNBits with int8 activations, which the ONNX Runtime backend turns off
(`ORT_INT4_SESSION_CONFIG`) so the CPU computes what TensorRT computes: dequantized weights, float math.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from omnivision_ros.errors import OmniVisionError
from omnivision_ros.export import manifest as mf
from omnivision_ros.model.bundle import CONTROL_FLOW_OPS, ONNX_IR_VERSION, open_bundle
from omnivision_ros.model.variants import GPU_INT4, VARIANTS, Quantization

INT4_OPSET = 21  # DequantizeLinear with block_size and INT4 inputs
SCALE_DIVISORS = np.linspace(6.0, 9.0, 17)  # absmax / d candidates per block; 8 is Q4_0's choice
FP16_TINY = np.float16(2.0 ** -14)  # the scale of an all-zero block: any positive value dequantizes 0 to 0


# ---------------------------------------------------------------------------------------------
# Quantization and the ONNX INT4 layout


def quantize_int4(weight: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """weight [K, N] -> (q int8 [K, N] in [-8, 7], scales float16 [K / block_size, N]), blocks along K.

    The error is computed with the float16-rounded scale, the one stored, so q * scale is exactly what a
    runtime dequantizes."""
    w = np.asarray(weight, np.float32)
    k, n = w.shape
    if k % block_size:
        raise OmniVisionError(f"a [{k}, {n}] weight does not split into blocks of {block_size} along its {k} rows")
    blocks = w.reshape(k // block_size, block_size, n)  # [K/B, B, N]
    absmax = np.abs(blocks).max(axis=1)  # [K/B, N]
    best_q = np.zeros(blocks.shape, np.int8)
    best_scale = np.full(absmax.shape, FP16_TINY, np.float16)
    best_err = np.full(absmax.shape, np.inf, np.float32)

    def quantized(scale: np.ndarray):
        scale = scale.astype(np.float16)
        scale[~(scale > 0)] = FP16_TINY  # all-zero blocks, or scales below float16's range
        s = scale.astype(np.float32)[:, None, :]
        q = np.clip(np.rint(blocks / s), -8, 7)
        return q, scale, ((q * s - blocks) ** 2).sum(axis=1)

    for divisor in SCALE_DIVISORS:
        q, scale, err = quantized(absmax / divisor)
        # Then the least-squares scale for those levels, and the levels for that scale (llama.cpp's k-quants
        # refine their scales the same way).
        den = (q * q).sum(axis=1)
        fitted = np.where(den > 0, (q * blocks).sum(axis=1) / np.maximum(den, 1e-30), 0)
        for q, scale, err in ((q, scale, err), quantized(fitted)):
            better = err < best_err
            best_err = np.where(better, err, best_err)
            best_scale = np.where(better, scale, best_scale)
            best_q = np.where(better[:, None, :], q.astype(np.int8), best_q)
    return best_q.reshape(k, n), best_scale


def dequantize_int4(q: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """The float32 weight [K, N] a DequantizeLinear with these blocks computes."""
    block_size = q.shape[0] // scales.shape[0]
    return q.astype(np.float32) * np.repeat(scales.astype(np.float32), block_size, axis=0)


def int4_tensor(name: str, q: np.ndarray) -> onnx.TensorProto:
    """An ONNX INT4 initializer: two values per byte, element 2i in the low nibble, row-major."""
    flat = q.astype(np.int8).ravel()
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, np.int8)])
    nibbles = (flat.view(np.uint8) & 0x0F).reshape(-1, 2)
    packed = (nibbles[:, 0] | (nibbles[:, 1] << 4)).astype(np.uint8)
    tensor = TensorProto(name=name, data_type=TensorProto.INT4, dims=list(q.shape))
    tensor.raw_data = packed.tobytes()
    return tensor


# ---------------------------------------------------------------------------------------------
# The graph rewrite


def _weight_matmuls(graph: onnx.GraphProto, inits: dict) -> list[onnx.NodeProto]:
    """MatMuls whose right operand is a float16 2-D weight initializer (the layers' linear maps)."""
    return [n for n in graph.node if n.op_type == "MatMul" and n.input[1] in inits
            and inits[n.input[1]].data_type == TensorProto.FLOAT16 and len(inits[n.input[1]].dims) == 2]


def _lm_head(graph: onnx.GraphProto, inits: dict) -> onnx.NodeProto:
    """The lm_head: the Gemm over the tied embedding table (transB=1), as the exporter writes it."""
    for node in graph.node:
        if node.op_type == "Gemm" and len(node.input) > 1 and node.input[1] in inits:
            return node
    raise OmniVisionError("the fp16 decoder graph has no lm_head Gemm over a weight; re-export the bundle")


def quantize_decoder(fp16_decoder: onnx.ModelProto, spec: Quantization) -> onnx.ModelProto:
    """The gpu-int4 decoder from a loaded fp16 decoder graph (weights in memory)."""
    from onnx import version_converter

    if spec.bits != 4 or spec.head_bits not in (4, 16):
        raise OmniVisionError(f"gpu-int4 stores 4-bit matrices and a 4- or 16-bit lm_head, not {spec}")
    model = version_converter.convert_version(fp16_decoder, INT4_OPSET)  # ReduceMean's axes become an input, ...
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    block = spec.block_size
    replaced: dict[str, onnx.TensorProto] = {}
    new_nodes: dict[int, list[onnx.NodeProto]] = {}  # index in graph.node -> nodes to put before it

    def dequantized(index: int, weight_name: str, weight: np.ndarray, prefix: str) -> str:
        q, scales = quantize_int4(weight, block)
        replaced[prefix + ".qweight"] = int4_tensor(prefix + ".qweight", q)
        replaced[prefix + ".scales"] = numpy_helper.from_array(scales, prefix + ".scales")
        out = f"{prefix}.dequantized"
        new_nodes.setdefault(index, []).append(helper.make_node(
            "DequantizeLinear", [prefix + ".qweight", prefix + ".scales"], [out], name=f"/{prefix}/dequantize",
            axis=0, block_size=block))
        return out

    nodes = list(graph.node)
    for node in _weight_matmuls(graph, inits):
        index = nodes.index(node)
        name = node.input[1]
        weight = numpy_helper.to_array(inits[name]).astype(np.float32)  # [K, N]
        node.input[1] = dequantized(index, name, weight, name.removesuffix(".weight"))
    if spec.head_bits == 4:
        head = _lm_head(graph, inits)
        attrs = {a.name: helper.get_attribute_value(a) for a in head.attribute}
        table = numpy_helper.to_array(inits[head.input[1]]).astype(np.float32)  # [V, H] with transB
        weight = table.T if attrs.get("transB", 0) else table  # [H, V]
        index = nodes.index(head)
        dq = dequantized(index, head.input[1], weight, "lm_head")
        matmul = helper.make_node("MatMul", [head.input[0], dq], [head.output[0]], name=head.name or "/lm_head/MatMul")
        nodes[index] = matmul  # the table stays for the token lookup (Gather)
    rebuilt = []
    for i, node in enumerate(nodes):
        rebuilt += new_nodes.get(i, []) + [node]
    used = {name for n in rebuilt for name in n.input}
    kept = [t for t in graph.initializer if t.name in used]  # the float16 matrices go
    del graph.node[:]
    graph.node.extend(rebuilt)
    del graph.initializer[:]
    graph.initializer.extend(kept + list(replaced.values()))
    model.ir_version = ONNX_IR_VERSION  # INT4 needs IR 10; onnxruntime 1.31 does not read onnx 1.23's default
    model.producer_name = "omnivision_ros.gpu_int4"
    return model


def int4_graph_problems(model: onnx.ModelProto, spec: Quantization) -> list[str]:
    """How a gpu-int4 decoder breaks what TensorRT's parser needs: standard ops at opset 21, no control flow,
    every DequantizeLinear on a constant INT4 weight with axis 0, the variant's block size, a float16 scale
    of shape [K / block, N] that is strictly positive, and no zero point."""
    problems = []
    opsets = {entry.domain or "ai.onnx": entry.version for entry in model.opset_import}
    if set(opsets) != {"ai.onnx"}:
        problems.append(f"non-standard operator domains {sorted(set(opsets) - {'ai.onnx'})}")
    if opsets.get("ai.onnx") != INT4_OPSET:
        problems.append(f"opset {opsets.get('ai.onnx')}, expected {INT4_OPSET}")
    inits = {t.name: t for t in model.graph.initializer}
    count = 0
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx"):
            problems.append(f"node {node.name}: operator {node.domain}::{node.op_type}")
        if node.op_type in CONTROL_FLOW_OPS:
            problems.append(f"node {node.name}: control flow {node.op_type}")
        if node.op_type != "DequantizeLinear":
            continue
        count += 1
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        weight, scale = inits.get(node.input[0]), inits.get(node.input[1])
        if weight is None or weight.data_type != TensorProto.INT4 or len(weight.dims) != 2:
            problems.append(f"node {node.name}: input is not a constant 2-D INT4 weight")
            continue
        if attrs.get("axis") != 0 or attrs.get("block_size") != spec.block_size:
            problems.append(f"node {node.name}: axis {attrs.get('axis')}, block_size {attrs.get('block_size')}")
        k, n = weight.dims
        if scale is None or scale.data_type != TensorProto.FLOAT16 or list(scale.dims) != [k // spec.block_size, n]:
            problems.append(f"node {node.name}: scale is not a float16 [{k // spec.block_size}, {n}] constant")
        elif not (numpy_helper.to_array(scale) > 0).all():
            problems.append(f"node {node.name}: scales must be strictly positive")
        if len(node.input) > 2 and node.input[2]:
            problems.append(f"node {node.name}: has a zero point")
    if not count:
        problems.append("no DequantizeLinear: the graph holds no INT4 weights")
    return problems


# ---------------------------------------------------------------------------------------------
# Bundle


def add_gpu_int4(bundle_path: str | Path, force: bool = False) -> bool:
    """Write BUNDLE/gpu-int4/decoder.onnx from the bundle's fp16 decoder and list the variant in the manifest
    (its vision graph is the fp16 one). Returns False when it is there already and not `force`."""
    spec = VARIANTS[GPU_INT4]
    root = Path(bundle_path)
    bundle = open_bundle(root)
    if GPU_INT4 in bundle.variants and not force:
        return False
    if "fp16" not in bundle.variants:
        raise OmniVisionError(f"bundle {root} has no fp16 variant to derive gpu-int4 from; export it with --fp16")
    fp16 = bundle.variant("fp16")  # verifies the source files
    model = quantize_decoder(onnx.load(str(fp16.decoder)), spec.quantization)
    problems = int4_graph_problems(model, spec.quantization)
    if problems:
        raise OmniVisionError("the gpu-int4 decoder breaks the TensorRT INT4 form: " + "; ".join(problems[:5]))
    with mf.staged_variant(root, spec.name) as staging:
        mf.save_graph(model, staging / "decoder.onnx")
        del model
    manifest = mf.read_manifest(root)
    vision = bundle.manifest["variants"]["fp16"]["vision"]
    entry = mf.variant_entry(root, spec, graphs={"vision": vision}, derived_from="fp16",
                             description=describe(spec.quantization))
    manifest["variants"][spec.name] = entry
    mf.commit(root, manifest, [entry["decoder"], entry["decoder"] + ".data"])
    open_bundle(root, verify="sizes").variant(spec.name)  # the manifest checks (graph I/O vs the contract) pass
    return True


def describe(q: Quantization) -> str:
    head = "float16" if q.head_bits == 16 else f"INT{q.head_bits}"
    return (f"decoder matrices INT{q.bits} weight-only (symmetric, blocks of {q.block_size} input channels, "
            f"float16 scales, DequantizeLinear opset {INT4_OPSET}), {head} tied embedding/lm_head, "
            "fp16 vision; for TensorRT")
