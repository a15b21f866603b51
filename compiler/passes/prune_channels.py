"""Structured pruning: remove whole output channels, so the model gets smaller *and* faster.

Unlike magnitude pruning, which leaves dense tensors full of zeros, removing channels shrinks the
matrices every runtime multiplies. A channel can go when nothing but the next weight layer reads
it: a chain producer -> per-channel ops -> consumer, where

- the producer is a Conv (group 1) or a MatMul/Gemm with constant weights (and optional bias Add),
- the ops between act on each channel alone (Relu, Clip, Sigmoid, ... and pooling for Conv),
- the consumer is a Conv (group 1) or a MatMul/Gemm reading the channels as its input rows,
- every tensor along the chain has exactly one reader and is not a graph output.

Per chain, the producer's channels with the smallest L1 norm go; `ratio` is the share removed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgeops.compiler.passes import PassContext, PassError

CHANNELWISE = {"Relu", "LeakyRelu", "Clip", "Sigmoid", "Tanh", "HardSigmoid", "Elu", "Selu", "Softplus", "HardSwish"}
CONV_CHANNELWISE = CHANNELWISE | {"MaxPool", "AveragePool"}


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


class _Graph:
    """Name lookups over a graph, with initializers as numpy arrays to edit in place."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        graph = model.graph
        self.weights = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
        self.readers: dict[str, list[onnx.NodeProto]] = {}
        for node in graph.node:
            for name in node.input:
                self.readers.setdefault(name, []).append(node)
        self.outputs = {o.name for o in graph.output}

    def only_reader(self, tensor: str) -> onnx.NodeProto | None:
        readers = self.readers.get(tensor, [])
        return readers[0] if len(readers) == 1 and tensor not in self.outputs else None

    def private_weight(self, name: str) -> bool:
        """A constant that only this one node reads, so slicing it changes nothing else."""
        return name in self.weights and len(self.readers.get(name, [])) == 1


def _producer_axis(node: onnx.NodeProto, g: _Graph) -> int | None:
    """Axis of the producer's weight that indexes its output channels, or None if not prunable."""
    if len(node.input) < 2 or not g.private_weight(node.input[1]):
        return None
    if node.op_type == "Conv" and _attrs(node).get("group", 1) == 1:
        return 0
    if node.op_type == "MatMul" and g.weights[node.input[1]].ndim == 2:
        return 1
    if node.op_type == "Gemm" and not _attrs(node).get("transA", 0):
        return 0 if _attrs(node).get("transB", 0) else 1
    return None


def _consumer_axis(node: onnx.NodeProto, tensor: str, g: _Graph) -> int | None:
    """Axis of the consumer's weight that indexes its input channels, or None if not prunable."""
    if len(node.input) < 2 or node.input[0] != tensor or not g.private_weight(node.input[1]):
        return None
    if node.op_type == "Conv" and _attrs(node).get("group", 1) == 1:
        return 1
    if node.op_type == "MatMul" and g.weights[node.input[1]].ndim == 2:
        return 0
    if node.op_type == "Gemm" and not _attrs(node).get("transA", 0):
        return 1 if _attrs(node).get("transB", 0) else 0
    return None


def _bias(node: onnx.NodeProto, g: _Graph) -> tuple[str | None, onnx.NodeProto | None]:
    """The producer's bias tensor (Conv/Gemm input 2, or a following Add), and the Add if there is one."""
    if node.op_type in ("Conv", "Gemm") and len(node.input) > 2 and node.input[2]:
        return (node.input[2] if g.private_weight(node.input[2]) else "unprunable"), None
    add = g.only_reader(node.output[0])
    if node.op_type == "MatMul" and add is not None and add.op_type == "Add":
        other = [name for name in add.input if name != node.output[0]]
        if len(other) == 1 and g.private_weight(other[0]):
            return other[0], add
    return None, None


def _chains(g: _Graph):
    """Yield (producer, producer axis, bias name, consumer, consumer axis) for every prunable chain."""
    for node in g.model.graph.node:
        axis = _producer_axis(node, g)
        if axis is None:
            continue
        bias, add = _bias(node, g)
        if bias == "unprunable":
            continue
        tensor = (add or node).output[0]
        allowed = CONV_CHANNELWISE if node.op_type == "Conv" else CHANNELWISE
        reader = g.only_reader(tensor)
        while reader is not None and reader.op_type in allowed and all(
            name == tensor or name in g.weights and g.weights[name].size == 1 for name in reader.input if name
        ):
            tensor = reader.output[0]
            reader = g.only_reader(tensor)
        if reader is None:
            continue
        consumer_axis = _consumer_axis(reader, tensor, g)
        if consumer_axis is not None:
            yield node, axis, bias, reader, consumer_axis


def _keep(weights: np.ndarray, axis: int, ratio: float) -> np.ndarray:
    norms = np.abs(np.moveaxis(weights, axis, 0)).reshape(weights.shape[axis], -1).sum(1)
    keep = max(1, int(round(weights.shape[axis] * (1 - ratio))))
    return np.sort(np.argsort(-norms, kind="stable")[:keep])


@dataclass(frozen=True)
class ChannelPrune:
    ratio: float = 0.25
    name: str = "prune-channels"

    def apply(self, model: onnx.ModelProto, ctx: PassContext) -> onnx.ModelProto:
        model = onnx.ModelProto.FromString(model.SerializeToString())
        g = _Graph(model)
        edits: dict[str, np.ndarray] = {}
        for producer, p_axis, bias, consumer, c_axis in list(_chains(g)):
            w_name, c_name = producer.input[1], consumer.input[1]
            if w_name in edits or c_name in edits:
                continue  # one chain per tensor: a layer's channels are pruned once
            channels = g.weights[w_name].shape[p_axis]
            if g.weights[c_name].shape[c_axis] != channels or (bias and g.weights[bias].shape[-1] != channels):
                continue
            keep = _keep(g.weights[w_name], p_axis, self.ratio)
            edits[w_name] = np.take(g.weights[w_name], keep, axis=p_axis)
            edits[c_name] = np.take(g.weights[c_name], keep, axis=c_axis)
            if bias is not None:
                edits[bias] = np.take(g.weights[bias], keep, axis=-1)
        if not edits:
            raise PassError("no layer whose channels can be removed (needs weight -> per-channel ops -> weight chains)")
        for init in model.graph.initializer:
            if init.name in edits:
                init.CopyFrom(numpy_helper.from_array(edits[init.name], init.name))
        del model.graph.value_info[:]  # shapes changed inside the chains; inferred again when needed
        return model
