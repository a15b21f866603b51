"""Unstructured magnitude pruning: zero the smallest weights of each Conv/MatMul/Gemm weight tensor.

Dense runtimes do not run sparse tensors faster, but zeros compress: the bundle a device downloads
shrinks, and int8 quantization keeps the zeros exact. The search picks the sparsity under the
accuracy bound; tensors smaller than `MIN_ELEMENTS` (biases, tiny heads) are left alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from edgeops.compiler.model import WEIGHT_OPS
from edgeops.compiler.passes import PassContext, PassError

MIN_ELEMENTS = 1024


def weight_initializers(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    """Float initializers that are the weight operand (input 1) of a Conv, MatMul or Gemm."""
    initializers = {init.name: init for init in model.graph.initializer}
    found = {}
    for node in model.graph.node:
        if node.op_type in WEIGHT_OPS and len(node.input) > 1 and node.input[1] in initializers:
            init = initializers[node.input[1]]
            if init.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16):
                found[init.name] = init
    return found


@dataclass(frozen=True)
class MagnitudePrune:
    sparsity: float = 0.5
    name: str = "prune-magnitude"

    def apply(self, model: onnx.ModelProto, ctx: PassContext) -> onnx.ModelProto:
        model = onnx.ModelProto.FromString(model.SerializeToString())
        pruned = 0
        for init in weight_initializers(model).values():
            weights = numpy_helper.to_array(init)
            if weights.size < MIN_ELEMENTS:
                continue
            threshold = np.quantile(np.abs(weights), self.sparsity)
            init.CopyFrom(numpy_helper.from_array(np.where(np.abs(weights) <= threshold, 0, weights).astype(weights.dtype), init.name))
            pruned += 1
        if not pruned:
            raise PassError("no weight tensor large enough to prune")
        return model
