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


def sensitive_nodes(fp32: onnx.ModelProto, quantized: onnx.ModelProto, data: Dataset) -> list[str]:
    """Names of weight-bearing nodes, most sensitive first."""
    produced = {out for node in quantized.graph.node for out in node.output}
    nodes = [n for n in fp32.graph.node if n.op_type in WEIGHT_OPS and n.name and n.output[0] in produced]
    names = [n.output[0] for n in nodes]
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
