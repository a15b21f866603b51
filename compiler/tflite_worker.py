"""ONNX -> TensorFlow -> TFLite, in a child process with TensorFlow and onnx2tf: `python tflite_worker.py REQUEST.json`.

Standalone on purpose (numpy, onnx, onnx2tf and TensorFlow only; no edgeops import): it runs under
whichever Python has the heavy `tflite` extra (EDGEOPS_TFLITE_PYTHON, default the caller's), and a
process of its own contains onnx2tf's habits: it calls sys.exit on errors, prints to stdout,
rewrites its input file, and downloads sample images unless stopped.

Request: {"model": ONNX path, "calib": npz keyed by input name in the ONNX layout, "outdir": dir,
          "variants": ["fp32", "fp16", "dynamic", "dynamic-per-tensor", "int8"]}
Result (OUTDIR/result.json): {"files": {variant: path}, "outputs": [kept ONNX output names],
          "dropped": [{"output", "op", "node"}], "error": str|null, "op": str|null, "node": str|null,
          "missing": the module this Python lacks, or null}

Invariants: nothing is downloaded (onnx2tf's download function is replaced before it can run); every
variant is converted from the one SavedModel onnx2tf made, with TFLite builtin ops only (no Flex
ops); int8 is full-integer (int8 inputs and outputs) calibrated on the caller's data.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import re
import shutil
import sys
import traceback
from pathlib import Path

import numpy as np
import onnx

STANDARD_DOMAINS = ("", "ai.onnx")
CALIBRATION_SAMPLES = 200


def _unsupported(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Nodes onnx2tf has no converter for (it ignores domains, so another domain is unsupported too)."""
    found = []

    def visit(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            if node.domain not in STANDARD_DOMAINS or importlib.util.find_spec(f"onnx2tf.ops.{node.op_type}") is None:
                found.append(node)
            for attr in node.attribute:
                for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
                    visit(sub)

    visit(model.graph)
    return found


def _cone(model: onnx.ModelProto, output: str) -> set[str]:
    """Names of the top-level nodes `output` depends on."""
    producer = {out: node for node in model.graph.node for out in node.output}
    seen, todo = set(), [output]
    while todo:
        node = producer.get(todo.pop())
        if node is None or node.name in seen:
            continue
        seen.add(node.name)
        todo.extend(node.input)
    return seen


def _prepare(source: Path, dest: Path, result: dict) -> None:
    """Name every node TensorFlow-safely, and cut outputs that depend on ops TFLite lacks (e.g. the
    `label` of a scikit-learn export), or fail naming the op and the node when none is left."""
    model = onnx.load(str(source))
    for i, node in enumerate(model.graph.node):
        node.name = re.sub(r"[^A-Za-z0-9_./-]", "_", node.name) or f"node_{i}"
    bad = _unsupported(model)
    if bad:
        keep, dropped = [], []
        for output in model.graph.output:
            hit = next((node for node in bad if node.name in _cone(model, output.name)), None)
            if hit is None:
                keep.append(output.name)
            else:
                dropped.append({"output": output.name, "op": _op(hit), "node": hit.name})
        if not keep or not dropped:  # nothing left, or the op sits in a subgraph every output needs
            first = bad[0]
            result.update(error=f"TFLite has no conversion for op {_op(first)} (node {first.name!r})",
                          op=_op(first), node=first.name)
            raise _Refused()
        onnx.save(model, str(dest))
        onnx.utils.extract_model(str(dest), str(dest), [i.name for i in model.graph.input
                                                        if i.name not in {t.name for t in model.graph.initializer}],
                                 keep, check_model=False)
        result["dropped"] = dropped
    else:
        onnx.save(model, str(dest))
    result["outputs"] = [o.name for o in onnx.load(str(dest)).graph.output]


def _op(node: onnx.NodeProto) -> str:
    return f"{node.domain}::{node.op_type}" if node.domain not in STANDARD_DOMAINS else node.op_type


class _Refused(Exception):
    """The model cannot be converted; the result already says why."""


def _tf_layout(calib: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Calibration arrays as TensorFlow sees the inputs: 4-D NCHW becomes NHWC."""
    return {k: (v.transpose(0, 2, 3, 1) if v.ndim == 4 else v).astype(np.float32)[:CALIBRATION_SAMPLES]
            for k, v in calib.items()}


def _convert(request: dict, result: dict) -> None:
    missing = next((m for m in ("onnx2tf", "tensorflow") if importlib.util.find_spec(m) is None), None)
    if missing:  # the `tflite` extra is not installed for this Python
        result.update(error=f"no module {missing}", missing=missing)
        raise _Refused()
    out = Path(request["outdir"])
    model_path = out / "input.onnx"  # onnx2tf rewrites its input: it gets a copy
    _prepare(Path(request["model"]), model_path, result)
    with np.load(request["calib"], allow_pickle=False) as data:
        calib = _tf_layout({name: data[name] for name in data.files})

    import onnx2tf
    import onnx2tf.onnx2tf as o2t

    images = next((v for v in calib.values() if v.ndim == 4), None)

    def no_download():  # onnx2tf fetches sample images from GitHub for 3-channel inputs; ours serve instead
        if images is None:
            raise RuntimeError("onnx2tf asked for sample images and this model has no image input")
        return images[:20]

    o2t.download_test_image_data = no_download
    cind = []
    for name, values in calib.items():
        np.save(out / f"calib_{len(cind)}.npy", values)
        cind.append([name, str(out / f"calib_{len(cind)}.npy"), np.zeros(1, np.float32), np.ones(1, np.float32)])
    saved = out / "saved_model"
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            onnx2tf.convert(input_onnx_file_path=str(model_path), output_folder_path=str(saved),
                            custom_input_op_name_np_data_path=cind, non_verbose=True, output_signaturedefs=True)
    except BaseException as exc:  # onnx2tf ends many errors with sys.exit(1)
        node = re.findall(r"onnx_op_name:\s*(\S+)", printed.getvalue())
        result.update(error=f"onnx2tf could not convert the model: {_line(exc)}", node=node[-1] if node else None)
        raise _Refused() from None
    for variant in request["variants"]:
        path = out / f"{variant}.tflite"
        path.write_bytes(_tflite(saved, variant, calib))
        result["files"][variant] = str(path)


def _tflite(saved: Path, variant: str, calib: dict[str, np.ndarray]) -> bytes:
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_saved_model(str(saved))
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    if variant == "fp16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    elif variant in ("dynamic", "dynamic-per-tensor"):
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        # per-tensor weights keep op versions old runtimes know (FULLY_CONNECTED 9, not 12)
        converter._experimental_disable_per_channel = variant == "dynamic-per-tensor"
    elif variant == "int8":
        count = len(next(iter(calib.values())))

        def representative():
            for i in range(count):
                yield {name: values[i : i + 1] for name, values in calib.items()}

        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.representative_dataset = representative
        converter.inference_input_type = tf.int8
        converter.inference_output_type = tf.int8
    elif variant != "fp32":
        raise ValueError(f"unknown variant {variant!r}")
    return converter.convert()


def _line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[-1] if text else ''}".strip()


def main(request_path: str) -> int:
    request = json.loads(Path(request_path).read_text())
    result: dict = {"files": {}, "outputs": [], "dropped": [], "error": None, "op": None, "node": None, "missing": None}
    try:
        _convert(request, result)
    except _Refused:
        pass
    except BaseException as exc:  # a converter bug must come back as a reason, not a silent exit
        result["error"] = f"conversion failed: {_line(exc)}"
        traceback.print_exc(file=sys.stderr)
    shutil.rmtree(Path(request["outdir"]) / "saved_model", ignore_errors=True)
    (Path(request["outdir"]) / "result.json").write_text(json.dumps(result))
    return 0 if result["error"] is None else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
