"""Weight-only int8: per-channel int8 weights, dequantized to float in the graph; activations stay float.

About 4x smaller weights with float math, so it keeps the accuracy of models whose activations do
not survive int8 (detection heads, audio front ends, recurrent state) where static quantization
collapses and dynamic quantization of convolutions is slow. Each Conv/ConvTranspose/MatMul/Gemm
weight of at least MIN_ELEMENTS values becomes an int8 initializer read through one
DequantizeLinear (symmetric, one scale per output channel; `axis` needs opset 13).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgeops.compiler.model import opset_of
from edgeops.compiler.passes import PassContext, PassError

MIN_ELEMENTS = 1024
OP_TYPES = ("Conv", "ConvTranspose", "MatMul", "Gemm")


def _output_axis(node: onnx.NodeProto, weights: np.ndarray) -> int | None:
    """The weight axis that indexes output channels, or None for shapes per-channel scales do not fit."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type == "Conv":
        return 0
    if node.op_type == "ConvTranspose":
        return 1 if attrs.get("group", 1) == 1 else None
    if weights.ndim != 2:
        return None
    if node.op_type == "Gemm":
        return 0 if attrs.get("transB", 0) else 1
    return 1  # MatMul: [K, N]


def _quantize(weights: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    moved = np.moveaxis(weights.astype(np.float64), axis, 0).reshape(weights.shape[axis], -1)
    scale = np.abs(moved).max(1) / 127.0
    scale = np.where(scale > 0, scale, 1.0)
    shape = [1] * weights.ndim
    shape[axis] = -1
    q = np.clip(np.round(weights / scale.reshape(shape)), -127, 127).astype(np.int8)
    return q, scale.astype(np.float32)


@dataclass(frozen=True)
class WeightOnlyQuantize:
    name: str = "quantize-weights"

    def apply(self, model: onnx.ModelProto, ctx: PassContext) -> onnx.ModelProto:
        if opset_of(model) < 13:
            raise PassError(f"weight-only int8 needs opset 13 for per-channel scales; the model has {opset_of(model)}")
        model = onnx.ModelProto.FromString(model.SerializeToString())
        graph = model.graph
        fed = {value.name for value in graph.input}  # old IR versions list initializers as inputs too
        initializers = {init.name: init for init in graph.initializer if init.name not in fed}
        readers: dict[str, int] = {}
        for node in graph.node:
            for name in node.input:
                readers[name] = readers.get(name, 0) + 1
        done: set[str] = set()
        dequantize = []
        for node in graph.node:
            if node.op_type not in OP_TYPES or len(node.input) < 2 or node.input[1] in done:
                continue
            init = initializers.get(node.input[1])
            if init is None or init.data_type != onnx.TensorProto.FLOAT or readers[init.name] != 1:
                continue
            weights = numpy_helper.to_array(init)
            axis = _output_axis(node, weights)
            if axis is None or weights.size < MIN_ELEMENTS:
                continue
            name = init.name
            q, scale = _quantize(weights, axis)
            init.CopyFrom(numpy_helper.from_array(q, name + "_int8"))
            graph.initializer.append(numpy_helper.from_array(scale, name + "_scale"))
            dequantize.append(helper.make_node("DequantizeLinear", [name + "_int8", name + "_scale"], [name],
                                               name=name + "_dequantize", axis=axis))
            done.add(name)
        if not dequantize:
            raise PassError("no weight tensor large enough for weight-only int8")
        nodes = dequantize + list(graph.node)
        del graph.node[:]
        graph.node.extend(nodes)
        return model
