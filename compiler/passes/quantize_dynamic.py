"""Dynamic int8 quantization: int8 weights, activations quantized on the fly at run time.

No calibration data needed, and the usual choice for MatMul-heavy graphs (transformers, MLPs).
onnxruntime has no dynamic Gemm kernel, so plain Gemms (which graph optimization fuses from
MatMul+Add) are split back into MatMul+Add first. On convolutions onnxruntime's ConvInteger is
slow, so the search measures before choosing it.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx
from onnx import helper
from onnxruntime.quantization import quantize_dynamic

from edgeops.compiler.model import opset_of
from edgeops.compiler.passes import PassContext, PassError
from edgeops.compiler.passes.quantize_common import QUANT_TYPES, check_quantized, quantizer_input


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


@dataclass(frozen=True)
class DynamicQuantize:
    per_channel: bool = True
    op_types: tuple[str, ...] = ("MatMul", "Gemm")
    exclude: tuple[str, ...] = ()
    name: str = "quantize-dynamic"

    def apply(self, model: onnx.ModelProto, ctx: PassContext) -> onnx.ModelProto:
        out = ctx.workdir / "dynamic.onnx"
        try:
            quantize_dynamic(
                quantizer_input(split_gemms(model), ctx.workdir),
                str(out),
                op_types_to_quantize=list(self.op_types) or None,
                per_channel=self.per_channel and opset_of(model) >= 13,
                reduce_range=ctx.profile.quantization.reduce_range,
                weight_type=QUANT_TYPES[ctx.profile.quantization.weight_type],
                nodes_to_exclude=list(self.exclude) or None,
            )
        except (ValueError, RuntimeError, KeyError, IndexError, TypeError) as exc:
            raise PassError(f"onnxruntime dynamic quantization failed: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
        quantized = onnx.load(str(out))
        out.unlink()
        return check_quantized(quantized)
