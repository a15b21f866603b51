"""How a LiteRT (.tflite) model is fed and read: the contract between the compiler, which computes a
bundle's self-test outputs through it, and the agent, which runs the model through it.

Invariants: names are signature names when the model's signature covers its main graph, else tensor
names; apps talk float (int8/uint8 tensors with a scale are quantized on the way in, dequantized on
the way out); only dynamic (-1) dimensions are resized; the interpreter is given, never imported here.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edgeops.protocol.errors import EdgeopsError


class LiteRTModel:
    """A LiteRT interpreter fed and read by name, with tensor indices and quantization looked up at load.

    Names: a model with one signature (or several, one of them `serving_default`) whose tensors are
    the main graph's inputs and outputs is fed by its signature names (`input_audio`, not
    `serving_default_input_audio:0`); any other model by its tensor names.
    Shapes: a feed whose shape differs from the allocated one resizes the input and reallocates;
    only dimensions the model declares dynamic (-1) may change: LiteRT would run a fixed batch-1
    graph on a batch of 2 and return wrongly shaped numbers.
    Integers: float feeds to int8/uint8 inputs with a scale are quantized (round, clip); such
    outputs come back dequantized as float32. Integer feeds pass through as they are.
    """

    def __init__(self, interpreter: Any):
        self._interpreter = interpreter
        inputs, outputs = _io_details(interpreter)
        # (name, tensor index, (scale, zero point, lowest, highest, dtype) or None)
        self._inputs = [(d["name"], d["index"], _quantization(d)) for d in inputs]
        self._outputs = [(d["name"], d["index"], _quantization(d)) for d in outputs]
        self._names = frozenset(d["name"] for d in inputs)
        self._shapes: list[tuple[int, ...] | None] = [tuple(int(n) for n in d["shape"]) for d in inputs]

    def run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if feed.keys() != self._names:
            raise EdgeopsError(f"LiteRT could not run the model: it takes inputs "
                               f"{[name for name, _, _ in self._inputs]}, the feed has {sorted(feed)}")
        interpreter = self._interpreter
        try:
            values = []
            for i, (name, index, quant) in enumerate(self._inputs):
                value = feed[name]
                if quant is not None and value.dtype.kind == "f":
                    scale, zero, low, high, dtype = quant
                    value = np.clip(np.round(value / scale) + zero, low, high).astype(dtype)
                if value.shape != self._shapes[i]:
                    self._shapes[i] = None  # unknown until allocate_tensors succeeds
                    interpreter.resize_tensor_input(index, value.shape, strict=True)
                values.append(value)
            if None in self._shapes:
                interpreter.allocate_tensors()
                self._shapes = [value.shape for value in values]
            for (_, index, _), value in zip(self._inputs, values):
                interpreter.set_tensor(index, value)
            interpreter.invoke()
            result = {}
            for name, index, quant in self._outputs:
                value = interpreter.get_tensor(index)
                result[name] = value if quant is None else (value.astype(np.float32) - quant[1]) * quant[0]
            return result
        except Exception as exc:  # the interpreter raises ValueError and RuntimeError; see OnnxRuntimeModel.run
            raise EdgeopsError(f"LiteRT could not run the model: {one_line(exc)}") from exc


def _io_details(interpreter: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Input and output tensor details, `name` set as LiteRTModel's docstring says (signature or tensor name)."""
    inputs, outputs = interpreter.get_input_details(), interpreter.get_output_details()
    signatures = interpreter.get_signature_list()
    if "serving_default" in signatures:
        key = "serving_default"
    elif len(signatures) == 1:
        key = next(iter(signatures))
    else:
        return inputs, outputs
    runner = interpreter.get_signature_runner(key)  # dropped at return: a live runner blocks invoke()
    named_inputs, named_outputs = runner.get_input_details(), runner.get_output_details()
    main = ({d["index"] for d in inputs}, {d["index"] for d in outputs})
    if main != ({d["index"] for d in named_inputs.values()}, {d["index"] for d in named_outputs.values()}):
        return inputs, outputs  # the signature runs another subgraph
    return ([dict(d, name=name) for name, d in named_inputs.items()],
            [dict(d, name=name) for name, d in named_outputs.items()])


def _quantization(detail: dict[str, Any]) -> tuple[np.float32, int, int, int, type] | None:
    """(scale, zero point, lowest, highest, dtype) of a per-tensor quantized int8/uint8 tensor, else None."""
    dtype, params = detail["dtype"], detail["quantization_parameters"]
    if dtype not in (np.int8, np.uint8) or len(params["scales"]) != 1 or not params["scales"][0]:
        return None
    info = np.iinfo(dtype)
    return np.float32(params["scales"][0]), int(params["zero_points"][0]), int(info.min), int(info.max), dtype


def one_line(exc: BaseException) -> str:
    """LiteRT's messages span several lines (op registration, tracebacks of delegates)."""
    return " ".join(str(exc).split()) or type(exc).__name__
