"""Load an ONNX model from an untrusted file and describe its interface.

Invariants: external data is read only from files inside the model's own folder (no `..`, no
absolute paths, no symlinks leading out); dimensions and tensor sizes are bounded before anything
allocates them; nesting is bounded by protobuf's depth limit (31 levels of If or Loop); every
node is in a domain onnxruntime implements, or calls a function the model defines; every failure
is an EdgeopsError with one line saying what is wrong. Limits on memory and CPU time are not here:
the build runs in a limited child process (compiler/sandbox.py).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import helper

from edgeops.protocol.errors import EdgeopsError

MAX_DIM = 2**31 - 1
MAX_TENSOR_ELEMENTS = 2**31
WEIGHT_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")
# ONNX's own domains and onnxruntime's contrib ones (onnxruntime.capi.onnxruntime_pybind11_state.
# get_all_operator_schema lists them, but takes 0.7 s); ops elsewhere need a custom-op library.
RUNTIME_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml", "ai.onnx.preview", "ai.onnx.preview.training",
                             "com.microsoft", "com.microsoft.nchwc", "com.ms.internal.nhwc"})


@dataclass(frozen=True)
class TensorSpec:
    """A model input or output. `shape` holds ints for fixed dims and names (or None) for dynamic ones."""

    name: str
    dtype: str
    shape: tuple[int | str | None, ...]

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


def _spec(value: onnx.ValueInfoProto) -> TensorSpec:
    tensor = value.type.tensor_type
    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.elem_type)).name if tensor.elem_type else "unknown"
    dims: list[int | str | None] = []
    for dim in tensor.shape.dim:
        if dim.HasField("dim_value") and dim.dim_value >= 0:
            dims.append(dim.dim_value)
        else:
            dims.append(dim.dim_param or None)
    return TensorSpec(value.name, dtype, tuple(dims))


def inputs_of(model: onnx.ModelProto) -> list[TensorSpec]:
    """Graph inputs that are fed at run time (initializers listed as inputs are not)."""
    initializers = {init.name for init in model.graph.initializer}
    return [_spec(v) for v in model.graph.input if v.name not in initializers]


def outputs_of(model: onnx.ModelProto) -> list[TensorSpec]:
    return [_spec(v) for v in model.graph.output]


def opset_of(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def count_ops(model: onnx.ModelProto) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def parameter_count(model: onnx.ModelProto) -> int:
    return sum(int(np.prod(init.dims)) for init in model.graph.initializer)


def _confined_location(model_dir: Path, location: str, tensor: str) -> Path:
    if not location or os.path.isabs(location) or Path(location).drive:
        raise EdgeopsError(f"tensor '{tensor}' has external data at an absolute path ({location!r}); refusing")
    target = (model_dir / location).resolve()
    root = model_dir.resolve()
    if ".." in Path(location).parts or root not in target.parents:
        raise EdgeopsError(
            f"tensor '{tensor}' has external data outside the model's folder ({location!r}); refusing"
        )
    if not target.is_file():
        raise EdgeopsError(f"tensor '{tensor}' needs external data file {location!r}, which is missing")
    return target


def _check_external_data(model: onnx.ModelProto, model_dir: Path) -> None:
    for tensor in _all_tensors(model):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            info = {entry.key: entry.value for entry in tensor.external_data}
            _confined_location(model_dir, info.get("location", ""), tensor.name)


def _all_tensors(model: onnx.ModelProto):
    yield from onnx.external_data_helper._get_all_tensors(model)


def _all_nodes(graph: onnx.GraphProto):
    for node in graph.node:
        yield node
        for attr in node.attribute:
            for sub in [attr.g, *attr.graphs] if attr.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) else []:
                yield from _all_nodes(sub)


def _check_domains(model: onnx.ModelProto) -> None:
    local = {(f.domain, f.name) for f in model.functions}
    for node in _all_nodes(model.graph):
        if node.domain not in RUNTIME_DOMAINS and (node.domain, node.op_type) not in local:
            raise EdgeopsError(f"node '{node.name or node.op_type}' is a custom op {node.op_type!r} of domain "
                               f"{node.domain!r}, which onnxruntime does not implement; refusing the model")


def _check_sizes(model: onnx.ModelProto) -> None:
    for value in [*model.graph.input, *model.graph.output]:
        for dim in value.type.tensor_type.shape.dim:
            # -1 is how some exporters (paddle2onnx) write a dynamic axis; onnxruntime accepts it.
            if dim.HasField("dim_value") and not -1 <= dim.dim_value <= MAX_DIM:
                raise EdgeopsError(f"'{value.name}' has an absurd dimension {dim.dim_value}; refusing the model")
    for tensor in _all_tensors(model):
        if any(d < 0 or d > MAX_DIM for d in tensor.dims) or np.prod(tensor.dims, dtype=float) > MAX_TENSOR_ELEMENTS:
            raise EdgeopsError(f"tensor '{tensor.name}' has absurd dimensions {list(tensor.dims)}; refusing the model")


def load_model(path: str | Path) -> onnx.ModelProto:
    """Parse and check an ONNX file, loading external data only from inside its folder."""
    path = Path(path)
    if not path.is_file():
        raise EdgeopsError(f"model {path} does not exist")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError, OSError) as exc:
        if "MaxDepth" in str(exc):  # upb's limit of 100 message levels: 32 levels of If or Loop
            raise EdgeopsError(f"{path} nests subgraphs deeper than protobuf's nesting limit "
                               "(31 levels of If or Loop); refusing") from None
        raise EdgeopsError(f"{path} is not a valid ONNX model (truncated or not protobuf: {exc})") from None
    if not model.graph.node and not model.graph.output:
        raise EdgeopsError(f"{path} is not a valid ONNX model (empty graph)")
    _check_sizes(model)
    _check_domains(model)
    _check_external_data(model, path.parent)
    try:
        onnx.load_external_data_for_model(model, str(path.parent))
    except (OSError, ValueError) as exc:
        raise EdgeopsError(f"cannot read external data of {path}: {exc}") from None
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "invalid graph"
        raise EdgeopsError(f"{path} is not a valid ONNX model: {first}") from None
    if not inputs_of(model):
        raise EdgeopsError(f"{path} has no runtime inputs")
    return model
