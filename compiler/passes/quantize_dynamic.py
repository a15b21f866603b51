"""Dynamic int8 quantization: int8 weights, activations quantized on the fly at run time.

No calibration data needed, and the usual choice for MatMul-heavy graphs (transformers, MLPs).
On convolutions onnxruntime's ConvInteger is slow, so the search measures before choosing it.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx
from onnxruntime.quantization import quantize_dynamic

from edgeops.compiler.model import opset_of
from edgeops.compiler.passes import PassContext, PassError
from edgeops.compiler.passes.quantize_common import quantized_op_types, QUANT_TYPES, check_quantized, quiet_quantizer, quantizer_input


@dataclass(frozen=True)
class DynamicQuantize:
    per_channel: bool = True
    op_types: tuple[str, ...] = ("MatMul", "Gemm")
    exclude: tuple[str, ...] = ()
    name: str = "quantize-dynamic"

    def apply(self, model: onnx.ModelProto, ctx: PassContext) -> onnx.ModelProto:
        out = ctx.workdir / "dynamic.onnx"
        try:
            with quiet_quantizer():
                quantize_dynamic(
                    quantizer_input(model, ctx.workdir),
                    str(out),
                    op_types_to_quantize=quantized_op_types(self.op_types),
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
