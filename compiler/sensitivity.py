"""Which layers lose the most accuracy when quantized: those are the ones to keep in float.

Both models expose the outputs of every weight-bearing node (the QDQ quantizer keeps those tensor
names), run on a few samples, and each node is scored by how much the relative error *grows* at it
compared to the weight node before it. Cost: one extra run of each model, not one build per layer.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from edgeops.compiler import measure
from edgeops.compiler.data import Dataset
from edgeops.compiler.model import WEIGHT_OPS

SAMPLES = 64
PROBE_STEPS = 4


def _with_outputs(model: onnx.ModelProto, names: list[str]) -> bytes:
    probe = onnx.ModelProto.FromString(model.SerializeToString())
    existing = {o.name for o in probe.graph.output}
    for name in names:
        if name not in existing:
            probe.graph.output.append(helper.ValueInfoProto(name=name))
    return probe.SerializeToString()


def _run(model_bytes: bytes, data: Dataset, names: list[str]) -> dict[str, np.ndarray]:
    sess = measure.session(model_bytes, quiet=True)
    results: dict[str, list[np.ndarray]] = {name: [] for name in names}
    for feed in data.batches(SAMPLES):
        for name, value in zip(names, sess.run(names, feed)):
            results[name].append(np.asarray(value, dtype=np.float64).ravel())
    return {name: np.concatenate(chunks) for name, chunks in results.items()}


def _probe(node: onnx.NodeProto, readers: dict[str, list[onnx.NodeProto]], produced: set[str]) -> str | None:
    """The first tensor at or after the node's output that the quantized graph still has.

    The quantizer folds some ops into quantization (a Relu after a Conv, say), so the weight node's
    own output may be gone; the next tensor along a single-reader chain measures the same layer.
    """
    tensor = node.output[0]
    for _ in range(PROBE_STEPS):
        if tensor in produced:
            return tensor
        following = readers.get(tensor, [])
        if len(following) != 1:
            return None
        tensor = following[0].output[0]
    return None


def sensitive_nodes(fp32: onnx.ModelProto, quantized: onnx.ModelProto, data: Dataset) -> list[str]:
    """Names of weight-bearing nodes, most sensitive first."""
    produced = {out for node in quantized.graph.node for out in node.output}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in fp32.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    probes = {n.name: _probe(n, readers, produced) for n in fp32.graph.node if n.op_type in WEIGHT_OPS and n.name}
    nodes = [n for n in fp32.graph.node if probes.get(n.name)]
    names = [probes[n.name] for n in nodes]
    if not names:
        return []
    reference = _run(_with_outputs(fp32, names), data, names)
    candidate = _run(_with_outputs(quantized, names), data, names)
    errors = [
        float(np.linalg.norm(candidate[n] - reference[n]) / (np.linalg.norm(reference[n]) or 1.0)) for n in names
    ]
    growth = np.diff([0.0, *errors])
    order = np.argsort(-growth, kind="stable")
    return [nodes[i].name for i in order]


def _weight_nodes(model: onnx.ModelProto) -> set[str]:
    initializers = {init.name for init in model.graph.initializer}
    return {n.name for n in model.graph.node if n.op_type in WEIGHT_OPS and len(n.input) > 1 and n.input[1] in initializers}


def _no_weight_beyond(nodes: list[onnx.NodeProto], weights: set[str], downstream: bool) -> list[str]:
    """Names of nodes past which (downstream, or upstream) no weight node lies, in graph order."""
    producer = {out: node for node in nodes for out in node.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in nodes:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    beyond: dict[str, bool] = {}
    # ONNX graphs are topologically sorted: walk from the far side so every neighbour is decided first
    for node in (reversed(nodes) if downstream else nodes):
        if downstream:
            neighbours = [c for out in node.output for c in consumers.get(out, [])]
        else:
            neighbours = [producer[name] for name in node.input if name in producer]
        beyond[node.name] = any(n.name in weights or beyond[n.name] for n in neighbours)
    return [n.name for n in nodes if not beyond[n.name]]


def head_and_front(model: onnx.ModelProto) -> tuple[list[str], list[str]]:
    """The head (the last weight layers and everything after them: decoding, output activations) and
    the front end (everything up to and including the first weight layers: normalisation, feature
    extraction), by node name. These are what keeps a detector's scores and an audio model's features
    alive when the rest is int8, so the search keeps them in float before ranking single layers."""
    weights = _weight_nodes(model)
    nodes = list(model.graph.node)
    return _no_weight_beyond(nodes, weights, True), _no_weight_beyond(nodes, weights, False)
