"""fp16 weights and activations, for profiles that ask for half precision (GPUs, NPUs).

Inputs and outputs stay float32, so callers and the drift monitor see the same interface.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx
from onnxruntime.transformers.float16 import convert_float_to_float16

from edgeops.compiler.passes import PassContext, PassError


@dataclass(frozen=True)
class Float16:
    name: str = "float16"

    def apply(self, model: onnx.ModelProto, ctx: PassContext) -> onnx.ModelProto:
        try:
            converted = convert_float_to_float16(model, keep_io_types=True)
        except Exception as exc:  # the converter raises many types on unusual graphs
            raise PassError(f"fp16 conversion failed: {exc}") from None
        return topologically_sorted(converted)


def topologically_sorted(model: onnx.ModelProto) -> onnx.ModelProto:
    """The converter appends its input Casts at the end; ONNX requires producers before consumers."""
    graph = model.graph
    ready = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        progress = [n for n in pending if all(name in ready for name in n.input)]
        if not progress:
            raise PassError("fp16 conversion left a graph with a cycle or a missing input")
        for node in progress:
            ready.update(node.output)
            ordered.append(node)
        placed = {id(n) for n in progress}
        pending = [n for n in pending if id(n) not in placed]
    del graph.node[:]
    graph.node.extend(ordered)
    return model
