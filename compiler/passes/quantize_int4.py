"""4-bit block-wise MatMul weights (onnxruntime's MatMulNBits), for MatMul-heavy models.

Weights of MatMul nodes become 4-bit integers in blocks of BLOCK_SIZE values with one scale each,
computed by onnxruntime's own MatMulNBitsQuantizer; activations stay float. MatMulNBits is a
com.microsoft operator that onnxruntime implements on CPU from MIN_RUNTIME on, so the search tries
this pass only for profiles whose runtime has it.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx

from edgeops.compiler.passes import PassContext, PassError
from edgeops.compiler.passes.quantize_common import check_quantized, quiet_quantizer

BLOCK_SIZE = 32
MIN_RUNTIME = (1, 17)


@dataclass(frozen=True)
class Int4MatMul:
    block_size: int = BLOCK_SIZE
    name: str = "quantize-int4-matmul"

    def apply(self, model: onnx.ModelProto, ctx: PassContext) -> onnx.ModelProto:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        try:
            with quiet_quantizer():
                quantizer = MatMulNBitsQuantizer(onnx.ModelProto.FromString(model.SerializeToString()),
                                                 block_size=self.block_size, is_symmetric=True)
                quantizer.process()
        except (ValueError, RuntimeError, KeyError, IndexError, TypeError, AssertionError) as exc:
            raise PassError(f"onnxruntime 4-bit MatMul quantization failed: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
        return check_quantized(quantizer.model.model)
