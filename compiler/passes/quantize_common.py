"""What the two quantization passes share: type names, ORT workarounds, and the did-it-work check."""

from __future__ import annotations

import logging
from pathlib import Path

import onnx
from onnxruntime.quantization import QuantType
from onnxruntime.quantization.shape_inference import quant_pre_process

from edgeops.compiler.passes import PassError

log = logging.getLogger(__name__)
QUANT_TYPES = {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}
QUANTIZED_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger",
                 "ConvInteger", "QLinearConv", "QLinearMatMul"}


def quantizer_input(model: onnx.ModelProto, workdir: Path) -> str:
    """Save the model for the quantizer (which mutates a ModelProto it is given), with shapes inferred.

    onnxruntime's pre-processing adds symbolic shape inference, which lets the quantizer type every
    tensor in transformer graphs; graph optimization already ran in the optimize pass.
    """
    raw = workdir / "to-quantize-raw.onnx"
    path = workdir / "to-quantize.onnx"
    onnx.save(model, str(raw))
    try:
        quant_pre_process(str(raw), str(path), skip_optimization=True)
    except Exception as exc:  # symbolic shape inference gives up on some graphs; plain inference then
        log.info("symbolic shape inference failed (%s); using onnx shape inference", exc)
        onnx.save(onnx.shape_inference.infer_shapes(model), str(path))
    return str(path)


def ort_extra_options(activation_type: str) -> dict:
    # ORT issue #24815: the int32-bias weight-scale adjustment breaks real models.
    options = {"QDQDisableWeightAdjustForInt32Bias": True}
    if activation_type == "int8":
        options["ActivationSymmetric"] = True
    return options


def check_quantized(model: onnx.ModelProto) -> onnx.ModelProto:
    """Refuse a 'quantized' model that quantized nothing (weights hidden in Constant nodes, say)."""
    if not any(node.op_type in QUANTIZED_OPS for node in model.graph.node):
        raise PassError("the quantizer found nothing to quantize in this graph")
    return model
