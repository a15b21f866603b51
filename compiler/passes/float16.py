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
            return convert_float_to_float16(model, keep_io_types=True)
        except Exception as exc:  # the converter raises many types on unusual graphs
            raise PassError(f"fp16 conversion failed: {exc}") from None
