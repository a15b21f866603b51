"""Will the device's runtime load this model? Checked at build time, not discovered on the device.

An onnxruntime release implements ONNX opsets up to a maximum and reads IR versions up to a maximum
(onnxruntime's docs/Versioning.md). A model stamped with a newer opset is converted down when the
ONNX version converter can; otherwise the build fails naming the device's runtime version.
"""

from __future__ import annotations

import onnx
from onnx import helper, version_converter

from edgeops.compiler.model import opset_of
from edgeops.protocol.errors import EdgeopsError
from edgeops.protocol.profiles import Profile, version_tuple

# onnxruntime minor version -> (highest ONNX opset, highest IR version) it implements.
ORT_LIMITS = {
    (1, 10): (15, 8), (1, 11): (16, 8), (1, 12): (17, 8), (1, 13): (17, 8), (1, 14): (18, 8),
    (1, 15): (19, 9), (1, 16): (19, 9), (1, 17): (20, 9), (1, 18): (21, 10), (1, 19): (21, 10),
    (1, 20): (21, 10), (1, 21): (22, 10), (1, 22): (22, 11), (1, 23): (23, 11),
}
# The lowest IR version that can carry each opset (onnx/helper.py VERSION_TABLE).
MIN_IR_FOR_OPSET = {15: 8, 16: 8, 17: 8, 18: 8, 19: 9, 20: 9, 21: 10, 22: 10, 23: 11}


def runtime_limits(profile: Profile) -> tuple[int, int]:
    """(max opset, max IR version) of the runtime the profile names."""
    minor = version_tuple(profile.runtime.version)[:2]
    if minor < min(ORT_LIMITS):
        raise EdgeopsError(
            f"profile {profile.name}: onnxruntime {profile.runtime.version} is older than edgeops supports (1.10+)"
        )
    known = [v for v in ORT_LIMITS if v <= minor]
    return ORT_LIMITS[max(known)]


def _ml_limit(max_opset: int) -> int:
    """Highest ai.onnx.ml opset released alongside the given ai.onnx opset (onnx.helper.VERSION_TABLE)."""
    rows = [row for row in helper.VERSION_TABLE if row[2] <= max_opset]
    return max(row[3] for row in rows)


def _used_domains(graph: onnx.GraphProto) -> dict[str, set[str]]:
    """Operator types used per domain, subgraphs (If/Loop bodies) included."""
    used: dict[str, set[str]] = {}
    for node in graph.node:
        used.setdefault(node.domain or "", set()).add(node.op_type)
        for attr in node.attribute:
            for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
                for domain, ops in _used_domains(sub).items():
                    used.setdefault(domain, set()).update(ops)
    return used


def _lowerable(domain: str, ops: set[str], current: int, target: int) -> bool:
    """True when every op's definition at `current` already existed at `target`."""
    try:
        return all(onnx.defs.get_schema(op, current, domain).since_version <= target for op in ops)
    except onnx.defs.SchemaError:
        return False


def fit_to_runtime(model: onnx.ModelProto, profile: Profile) -> onnx.ModelProto:
    """Return the model stamped so the profile's runtime loads it, or raise saying why it cannot.

    Unused opset imports are dropped (onnxruntime's optimizer adds several), the default domain is
    converted down when needed, and ai.onnx.ml is stamped down when the ops used are unchanged.
    """
    max_opset, max_ir = runtime_limits(profile)
    runtime = f"onnxruntime {profile.runtime.version} (opset <= {max_opset}, IR <= {max_ir})"
    if opset_of(model) > max_opset:
        try:
            model = version_converter.convert_version(model, max_opset)
            onnx.checker.check_model(model)
        except Exception as exc:  # the converter raises many types
            raise EdgeopsError(
                f"the model needs opset {opset_of(model)} but the device runs {runtime}, and converting it "
                f"down failed ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); "
                "re-export the model at a lower opset or update the device's runtime"
            ) from None
    model = onnx.ModelProto.FromString(model.SerializeToString())
    used = _used_domains(model.graph)
    limits = {"": max_opset, "ai.onnx": max_opset, "ai.onnx.ml": _ml_limit(max_opset), "com.microsoft": 1}
    imports = []
    for entry in model.opset_import:
        if entry.domain not in used and entry.domain not in ("", "ai.onnx"):
            continue
        limit = limits.get(entry.domain)
        if limit is None:
            op = sorted(used[entry.domain])[0]
            raise EdgeopsError(f"the model uses operator {entry.domain}::{op}, which {runtime} does not implement")
        if entry.version > limit:
            if not _lowerable(entry.domain, used.get(entry.domain, set()), entry.version, limit):
                raise EdgeopsError(f"the model needs {entry.domain} opset {entry.version}; the device runs {runtime}")
            entry.version = limit
        imports.append(entry)
    del model.opset_import[:]
    model.opset_import.extend(imports)
    if model.ir_version > max_ir:
        if MIN_IR_FOR_OPSET.get(opset_of(model), 3) > max_ir:
            raise EdgeopsError(f"the model needs IR version {model.ir_version}; the device runs {runtime}")
        model.ir_version = max_ir
    return model
