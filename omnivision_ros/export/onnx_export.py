"""Export the model to the two ONNX graphs of a model bundle (DESIGN §3, graph contract).

The graphs are traces of the model's own stages (model/), the modules the torch backend runs:

- vision (`ImageEncoder`): pixel_values [B, 3, 384, 384] -> image_embeds [B, 81, lm_hidden] (SigLIP + projector).
- decoder (`LanguageModel`): ids, image table, positions, past K/V -> last-position logits + present K/V; one
  graph serves prefill (P = 0, many tokens) and decode (one token, long past).

Each is built for a dtype: float32 (CPU) or float16 (GPU). Weights, activations and the KV cache take
that dtype; LayerNorm/RMSNorm statistics and softmax run in float32 and logits are float32. Weights keep
the model's parameter names; a weight the exporter transposed for a MatMul is named after its parameter
too ("blocks.3.gate_up.weight", stored [in, out]).
Exported with the TorchScript-based exporter (`dynamo=False`, still in torch 2.13): on these modules
it gives plain standard-op graphs at opset 17 with the contract's dim names, about 5x faster than the
torch.export-based exporter, which also works on them but needs opset >= 18, names derived dims
itself ("past + seq" instead of "total") and emitted an invalid int32 GatherND for `table[ids]`.
"""
from __future__ import annotations

import math
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper
import torch
from torch import nn

from omnivision_ros.errors import OmniVisionError
from omnivision_ros.model.bundle import (
    CONTROL_FLOW_OPS,
    OPSET,
    OPSET_RANGE,
    VISION_INPUTS,
    VISION_OUTPUTS,
    decoder_input_names,
    decoder_output_names,
)
from omnivision_ros.model.config import OmniVisionConfig
from omnivision_ros.model.variants import IO_DTYPES, variant_spec
from omnivision_ros.model.vision_language_model import OmniVisionModel


def torch_dtype(precision: str) -> torch.dtype:
    """The dtype of an exported variant's weights and activations ("fp32" -> torch.float32)."""
    spec = variant_spec(precision)
    if not spec.exported:
        raise OmniVisionError(f"'{precision}' is derived from the fp32 graphs, not exported (see --cpu-variants)")
    return getattr(torch, IO_DTYPES[spec.io])


def in_dtype(model: OmniVisionModel, dtype: torch.dtype) -> OmniVisionModel:
    """The model itself when it already is in `dtype`, else a converted copy."""
    return model if model.dtype == dtype else model.converted(dtype)


# ---------------------------------------------------------------------------------------------
# Export


def vision_example(config: OmniVisionConfig, dtype: torch.dtype) -> torch.Tensor:
    """Tracing input. Batch 1 because tracing runs the whole encoder (slow in fp16 on a CPU); the batch
    stays dynamic since no reshape names it (-1)."""
    return torch.zeros(1, 3, config.vit_image_size, config.vit_image_size, dtype=dtype)


def decoder_example(config: OmniVisionConfig, dtype: torch.dtype, batch: int = 2, seq: int = 3, past: int = 4) -> tuple:
    """Tracing inputs, every dynamic size > 1 so none gets specialised; image and text ids mixed."""
    ids = torch.arange(batch * seq, dtype=torch.int32).reshape(batch, seq)
    ids[:, 0] = config.lm_vocab  # an image position in each row
    positions = (torch.arange(seq, dtype=torch.int32) + past).expand(batch, seq).contiguous()
    image_embeds = torch.zeros(batch, config.mp_tokens, config.lm_hidden, dtype=dtype)
    kv = [torch.zeros(batch, config.lm_kv_heads, past, config.lm_head_dim, dtype=dtype)
          for _ in range(2 * config.lm_layers)]
    return (ids, image_embeds, positions, *kv)


def decoder_dynamic_axes(config: OmniVisionConfig) -> dict:
    axes = {
        "input_ids": {0: "batch", 1: "seq"},
        "image_embeds": {0: "batch"},
        "position_ids": {0: "batch", 1: "seq"},
        "logits": {0: "batch"},
    }
    for name in decoder_input_names(config)[3:]:
        axes[name] = {0: "batch", 2: "past"}
    for name in decoder_output_names(config)[1:]:
        axes[name] = {0: "batch", 2: "total"}
    return axes


def name_folded_weights(graph: onnx.ModelProto) -> None:
    """Name the weights the exporter constant-folded ("onnx::MatMul_123") after the node using them:
    "blocks.3.gate_up.weight" (the MatMul operand, stored [in, out]), so quantizers and engine
    inspectors can tell the layers apart."""
    users: dict[str, list] = {}
    for node in graph.graph.node:
        for slot, name in enumerate(node.input):
            users.setdefault(name, []).append((node, slot))
    taken = {t.name for t in graph.graph.initializer}
    for tensor in graph.graph.initializer:
        if not tensor.name.startswith("onnx::") or len(users.get(tensor.name, [])) != 1:
            continue
        node, slot = users[tensor.name][0]
        scope = node.name.strip("/").replace("/", ".")
        new = scope.rsplit(".", 1)[0] + ".weight" if node.op_type == "MatMul" and slot == 1 else f"{scope}.input{slot}"
        if new not in taken:
            taken.add(new)
            node.input[slot] = tensor.name = new


def export_graph(module: nn.Module, args: tuple, path: Path, input_names, output_names, dynamic_axes,
                 opset: int = OPSET, output_dims: dict | None = None) -> None:
    """Trace `module` to `path` + `path.data` (all weights in that one external file).

    output_dims: {output: [dim name or size, ...]} written over what the tracer inferred (it leaves
    generated names for sizes it could not follow through dynamic reshapes).
    """
    path = Path(path)
    with tempfile.TemporaryDirectory(dir=path.parent) as scratch, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript exporter deprecation and tracer notes
        raw = Path(scratch) / "graph.onnx"
        # Graphs over 2 GB come out with one external file per tensor; they are gathered below.
        torch.onnx.export(
            module, args, str(raw), dynamo=False, opset_version=opset, input_names=list(input_names),
            output_names=list(output_names), dynamic_axes=dynamic_axes, do_constant_folding=True,
        )
        graph = onnx.load(str(raw))
    graph.producer_name = "omnivision_ros"
    name_folded_weights(graph)
    for value in graph.graph.output:
        for dim, size in zip(value.type.tensor_type.shape.dim, (output_dims or {}).get(value.name, [])):
            if isinstance(size, str):
                dim.dim_param = size
            else:
                dim.dim_value = size
    problems = graph_problems(graph)
    if problems:
        raise OmniVisionError(f"exported graph {path.name} breaks the graph contract: " + "; ".join(problems))
    onnx.save_model(graph, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=path.name + ".data", size_threshold=1024)


def graph_problems(graph: onnx.ModelProto) -> list[str]:
    """How a graph breaks the contract's portability rules: standard ops only, opset in OPSET_RANGE,
    no control flow, no -inf in its constants (tensors whose data is loaded or inline)."""
    problems = []
    opsets = {entry.domain or "ai.onnx": entry.version for entry in graph.opset_import}
    extra = sorted(set(opsets) - {"ai.onnx"})
    if extra:
        problems.append(f"non-standard operator domains {extra}")
    if not OPSET_RANGE[0] <= opsets.get("ai.onnx", 0) <= OPSET_RANGE[1]:
        problems.append(f"opset {opsets.get('ai.onnx')} outside {OPSET_RANGE[0]}..{OPSET_RANGE[1]}")
    tensors = [t for t in graph.graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL]
    for node in graph.graph.node:
        if node.domain not in ("", "ai.onnx"):
            problems.append(f"node {node.name}: operator {node.domain}::{node.op_type}")
        if node.op_type in CONTROL_FLOW_OPS:
            problems.append(f"node {node.name}: control flow {node.op_type}")
        tensors += [a.t for a in node.attribute if a.type == onnx.AttributeProto.TENSOR]
        if any(a.type == onnx.AttributeProto.FLOAT and math.isinf(a.f) for a in node.attribute):
            problems.append(f"node {node.name}: infinite float attribute")
    for tensor in tensors:
        if tensor.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE):
            if np.isinf(onnx.numpy_helper.to_array(tensor)).any():
                problems.append(f"tensor {tensor.name or '(constant)'} holds inf")
    return problems


def export_vision(model: OmniVisionModel, path: Path, precision: str = "fp32", opset: int = OPSET) -> None:
    dtype = torch_dtype(precision)
    config = model.config
    module = in_dtype(model, dtype).image_encoder()
    with torch.no_grad():
        export_graph(module, (vision_example(config, dtype),), path, VISION_INPUTS, VISION_OUTPUTS,
                     {"pixel_values": {0: "batch"}, "image_embeds": {0: "batch"}}, opset,
                     {"image_embeds": ["batch", config.mp_tokens, config.lm_hidden]})


def export_decoder(model: OmniVisionModel, path: Path, precision: str = "fp32", opset: int = OPSET) -> None:
    dtype = torch_dtype(precision)
    config = model.config
    if not config.lm_tie_embeddings:
        raise OmniVisionError(f"model '{config.name}': export supports tied embeddings only (lm_tie_embeddings)")
    module = in_dtype(model, dtype).language_model
    with torch.no_grad():
        export_graph(module, decoder_example(config, dtype), path,
                     decoder_input_names(config), decoder_output_names(config),
                     decoder_dynamic_axes(config), opset)
