"""What the two quantization passes share: type names, ORT workarounds, and the did-it-work check."""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path
from typing import Iterator

import onnx
from onnx import helper
from onnxruntime.quantization import QuantType

from edgeops.compiler.passes import PassError

log = logging.getLogger(__name__)
QUANT_TYPES = {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}
QUANTIZED_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger",
                 "ConvInteger", "QLinearConv", "QLinearMatMul", "DynamicQuantizeLSTM", "DynamicQuantizeMatMul",
                 "MatMulIntegerToFloat", "QAttention", "QGemm", "QLinearAdd", "QLinearMul", "MatMulNBits",
                 "GatherBlockQuantized"}


def _plain_gemm(node: onnx.NodeProto, initializers: set[str]) -> bool:
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    return (
        node.op_type == "Gemm"
        and attrs.get("alpha", 1.0) == 1.0
        and attrs.get("beta", 1.0) == 1.0
        and not attrs.get("transA", 0)
        and not attrs.get("transB", 0)
        and node.input[1] in initializers
    )


def split_gemms(model: onnx.ModelProto) -> onnx.ModelProto:
    """Rewrite Gemm(A, B, C) without transposes or scaling as MatMul(A, B) + C."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    initializers = {init.name for init in model.graph.initializer}
    nodes = []
    for node in model.graph.node:
        if not _plain_gemm(node, initializers):
            nodes.append(node)
            continue
        product = node.output[0] + "_matmul"
        nodes.append(helper.make_node("MatMul", node.input[:2], [product if len(node.input) > 2 else node.output[0]], name=node.name))
        if len(node.input) > 2:
            nodes.append(helper.make_node("Add", [product, node.input[2]], [node.output[0]], name=node.name + "_bias"))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model


def quantized_op_types(op_types: tuple[str, ...]) -> list[str] | None:
    """Op types to hand the quantizer: Gemms reach it split into MatMul+Add, so MatMul stands in."""
    if not op_types:
        return None
    return sorted(set(op_types) | ({"MatMul"} if "Gemm" in op_types else set()))


def quantizer_input(model: onnx.ModelProto, workdir: Path) -> str:
    """Save the model for the quantizer (which mutates a ModelProto it is given), with shapes inferred.

    Plain Gemms (graph optimization fuses them from MatMul+Add) are split back: onnxruntime has no
    dynamic Gemm kernel, and its static per-channel Gemm got a wrong bias axis on a real model,
    giving a graph that only ran while onnxruntime happened to fuse it. onnxruntime's own
    pre-processing is not used: its symbolic shape inference failed on every third-party model we
    tried, and it writes temporary files into the current directory.
    """
    path = workdir / "to-quantize.onnx"
    onnx.save(onnx.shape_inference.infer_shapes(split_gemms(model)), str(path))
    return str(path)


# ORT issue #24815: the int32-bias weight-scale adjustment breaks real models.
ORT_EXTRA_OPTIONS = {"QDQDisableWeightAdjustForInt32Bias": True}


@contextlib.contextmanager
def quiet_quantizer() -> Iterator[None]:
    """onnxruntime's quantizer prints to stdout and warns on the root logger; keep both out of our output."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.setLevel(level)


def check_quantized(model: onnx.ModelProto) -> onnx.ModelProto:
    """Refuse a 'quantized' model that quantized nothing (weights hidden in Constant nodes, say)."""
    if not any(node.op_type in QUANTIZED_OPS for node in model.graph.node):
        raise PassError("the quantizer found nothing to quantize in this graph")
    return model
