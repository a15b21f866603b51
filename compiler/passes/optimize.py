"""Hardware-independent graph optimization: constant folding, node fusion, Conv+BatchNorm folding.

It uses onnxruntime's *basic* level only, whose rewrites are plain ONNX ops, so the result runs on
any runtime; the extended levels add onnxruntime-only fused ops. Weights stored as `Constant` nodes
(common with paddle2onnx and spox exports) become initializers, or the quantizer would see none.
Opsets below 13 are raised to 13 where possible, since per-channel quantization needs it.
Long or odd tensor and node names (tf2onnx writes `StatefulPartitionedCall/model/conv1d_25;...__306`)
are shortened: onnxruntime's QDQ quantizer wrote a graph that did not load from such a model, and the
names alone were 30 % of its file.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import onnx
import onnxruntime as ort
from onnx import version_converter

from edgeops.compiler.model import opset_of
from edgeops.compiler.passes import PassContext, PassError

log = logging.getLogger(__name__)
MIN_OPSET = 13
GROWTH_LIMIT = 1.01
PLAIN_NAME = re.compile(r"^[A-Za-z0-9_.:/@-]{1,64}$")


def constants_to_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    kept = []
    for node in graph.node:
        if node.op_type == "Constant" and len(node.attribute) == 1 and node.attribute[0].name == "value":
            tensor = onnx.TensorProto()
            tensor.CopyFrom(node.attribute[0].t)
            tensor.name = node.output[0]
            graph.initializer.append(tensor)
        else:
            kept.append(node)
    del graph.node[:]
    graph.node.extend(kept)
    return model


def upgrade_opset(model: onnx.ModelProto, target: int = MIN_OPSET) -> onnx.ModelProto:
    if opset_of(model) >= target:
        return model
    try:
        upgraded = version_converter.convert_version(model, target)
        onnx.checker.check_model(upgraded)
        return upgraded
    except Exception as exc:  # the converter raises many types; keep the original model then
        log.info("opset %d kept: upgrade to %d failed (%s)", opset_of(model), target, exc)
        return model


@dataclass(frozen=True)
class Optimize:
    name: str = "optimize"
    level: str = "basic"

    def apply(self, model: onnx.ModelProto, ctx: PassContext) -> onnx.ModelProto:
        model = upgrade_opset(constants_to_initializers(model))
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.log_severity_level = 3
        out = ctx.workdir / "optimized.onnx"
        options.optimized_model_filepath = str(out)
        try:
            ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types for unsupported graphs
            raise PassError(f"onnxruntime cannot load the model: {str(exc).splitlines()[0]}") from None
        optimized = onnx.load(str(out))
        out.unlink()
        if optimized.ByteSize() > model.ByteSize() * GROWTH_LIMIT:
            # constant folding can duplicate weights (seen inside If branches): a bigger model is no gain
            log.info("graph optimization grew the model from %d to %d bytes; not kept", model.ByteSize(), optimized.ByteSize())
            optimized = model
        return name_nodes(short_names(optimized))


def name_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Give every node a unique name: quantizers select and exclude nodes by name."""
    taken = {node.name for node in model.graph.node if node.name}
    for index, node in enumerate(model.graph.node):
        if not node.name:
            node.name = f"{node.op_type}_{index}"
            while node.name in taken:
                node.name += "_"
            taken.add(node.name)
    return model



def _subgraph_names(graph: onnx.GraphProto) -> set[str]:
    """Every name a subgraph (If/Loop/Scan body) mentions: those may refer to the outer graph's tensors."""
    names: set[str] = set()
    for node in graph.node:
        for attr in node.attribute:
            for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
                for inner in sub.node:
                    names.update(inner.input)
                    names.update(inner.output)
                names.update(_subgraph_names(sub))
    return names


def short_names(model: onnx.ModelProto) -> onnx.ModelProto:
    """Rename inner tensors and nodes whose names are long or hold odd characters; graph inputs and
    outputs, and names a subgraph refers to, keep theirs."""
    graph = model.graph
    kept = {v.name for v in [*graph.input, *graph.output]} | _subgraph_names(graph) | {""}
    tensors = [*(out for node in graph.node for out in node.output), *(init.name for init in graph.initializer)]
    taken = set(tensors) | {node.name for node in graph.node} | kept
    renamed: dict[str, str] = {}
    for name in tensors:
        if name not in kept and name not in renamed and not PLAIN_NAME.match(name):
            new = f"t{len(renamed)}"
            while new in taken:
                new += "_"
            taken.add(new)
            renamed[name] = new
    for index, node in enumerate(graph.node):
        node.input[:] = [renamed.get(n, n) for n in node.input]
        node.output[:] = [renamed.get(n, n) for n in node.output]
        if node.name and not PLAIN_NAME.match(node.name):
            node.name = f"{node.op_type}_{index}"
            while node.name in taken:
                node.name += "_"
            taken.add(node.name)
    for item in [*graph.initializer, *graph.value_info]:
        item.name = renamed.get(item.name, item.name)
    return model
