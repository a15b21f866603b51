"""Compiler benchmark: fp32, plain onnxruntime.quantization defaults, fp16 and edgeops, per real model.

All variants are measured in the same run, on the same eval data, with the same task metric (the one
`edgeops build` chooses for the model, compiler/metrics/) and the same latency measurement, so the
ratios hold on a noisy 2-core machine even when absolute times do not. "Plain ORT static" and
"plain ORT dynamic" are what a user gets from one call with default settings (quantize_static: QDQ,
per-tensor, MinMax; quantize_dynamic); "fp16" is onnxruntime's float16 converter with fp32 inputs
and outputs. Models with a task metric written apart from the compiler's (docs/metrics/) are also
scored with it, in the `own` column.

    python bench/compiler_bench.py [--profile x86-vnni] [--models digits_cnn,detector] [--json out.json]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import time
import zlib
from pathlib import Path


import onnx
from onnxruntime.quantization import CalibrationDataReader, quantize_dynamic, quantize_static
from onnxruntime.transformers.float16 import convert_float_to_float16

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import zoo  # noqa: E402  (tests/zoo.py: models trained on real data)
import zoo_thirdparty  # noqa: E402  (tests/zoo_thirdparty.py: models shipped in PyPI packages)

from edgeops.compiler import measure, metrics  # noqa: E402
from edgeops.compiler.build import BuildRequest, build  # noqa: E402
from edgeops.compiler.data import load_npz  # noqa: E402
from edgeops.compiler.model import inputs_of, load_model, outputs_of  # noqa: E402
from edgeops.compiler.passes.float16 import topologically_sorted  # noqa: E402
from edgeops.protocol.bundle import read_bundle  # noqa: E402

DOCS_METRICS = Path(__file__).resolve().parents[1] / "docs" / "metrics"
# Task metrics written apart from the compiler's, for the models they fit.
OWN_METRICS = {"detector": ("yolo_f1.py", "detection_f1"), "ocr-rec": ("ctc_agreement.py", "sequence_agreement"),
               "basic-pitch": ("note_onset_f1.py", "onset_f1")}
MODELS = {
    "digits_cnn": zoo.digits_cnn,
    "digits_mlp": zoo.digits_mlp,
    "two_input": zoo.two_input_model,
    **zoo_thirdparty.ALL,
}


class _Reader(CalibrationDataReader):
    def __init__(self, data):
        self._feeds = iter(data.batches(256))

    def get_next(self):
        return next(self._feeds, None)


def _plain_ort_static(model_path: Path, calib, out: Path) -> None:
    quantize_static(str(model_path), str(out), _Reader(calib))


def _plain_ort_dynamic(model_path: Path, calib, out: Path) -> None:
    quantize_dynamic(str(model_path), str(out))


def _fp16(model_path: Path, calib, out: Path) -> None:
    onnx.save(topologically_sorted(convert_float_to_float16(onnx.load(str(model_path)), keep_io_types=True)), str(out))


BASELINES = {"plain ORT static": _plain_ort_static, "plain ORT dynamic": _plain_ort_dynamic, "fp16": _fp16}


def _own_metric(name: str):
    if name not in OWN_METRICS:
        return None
    file, function = OWN_METRICS[name]
    spec = importlib.util.spec_from_file_location(f"own_{function}", DOCS_METRICS / file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, function)


def _measure(model_bytes: bytes, evaluation, metric, reference: dict, threads: int, own=None) -> dict:
    sess = measure.session(model_bytes, threads)
    outputs = dict(zip(reference, measure.run_dataset(sess, evaluation)))
    data = {k: v[: len(next(iter(outputs.values())))] for k, v in evaluation.extras.items()}
    figures = {"size": len(model_bytes), "download": len(zlib.compress(model_bytes, 9)), "session": sess}
    try:
        figures["quality"] = metrics.score(metric, reference, outputs, data)
    except metrics.BrokenOutputs:
        figures["quality"] = float("nan")
    if own is not None:
        figures["own"] = float(own(reference, outputs, data))
    return figures


def _paired_latency(figures: list[dict], evaluation) -> None:
    """Latency of all variants measured in alternation, so machine load affects them alike."""
    measured = [f for f in figures if "session" in f]
    times = measure.paired_latency_ms([f.pop("session") for f in measured], measure.first_sample(evaluation))
    for f, ms in zip(measured, times):
        f["latency_ms"] = ms


def setup(example) -> tuple:
    """The model, its data, fp32 outputs and task metric, and the threads every variant is measured with."""
    model = load_model(example.onnx)
    inputs = inputs_of(model)
    calib = load_npz(example.calib, inputs, "calibration")
    evaluation = load_npz(example.eval, inputs, "eval")
    threads = 2
    names = [spec.name for spec in outputs_of(model)]
    reference = dict(zip(names, measure.run_dataset(measure.session(model.SerializeToString(), threads), evaluation)))
    info = metrics.ModelInfo.of(model, [spec.shape for spec in inputs], evaluation.labels)
    metric, _ = metrics.choose(reference, info, None)
    return model, calib, evaluation, reference, metric, threads


def bench_model(name: str, make, profile: str, workdir: Path) -> dict:
    example = make(workdir / name)
    model, calib, evaluation, reference, metric, threads = setup(example)
    own = _own_metric(name)
    variants = {"fp32": _measure(model.SerializeToString(), evaluation, metric, reference, threads, own)}
    for label, make_variant in BASELINES.items():
        path = workdir / f"{name}-{label.replace(' ', '-')}.onnx"
        try:
            make_variant(example.onnx, calib, path)
            variants[label] = _measure(path.read_bytes(), evaluation, metric, reference, threads, own)
        except Exception as exc:  # a baseline failing on a real model is itself a result
            variants[label] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:120]}
    started = time.monotonic()
    report = build(BuildRequest(example.onnx, profile, example.calib, example.eval, name=name, outdir=workdir / "bundles"))
    ours = _measure(read_bundle(report["bundle"]).model_bytes, evaluation, metric, reference, threads, own)
    ours |= {"bundle": report["bundle_bytes"], "chosen": report["chosen"], "compile_s": time.monotonic() - started}
    variants["edgeops"] = ours
    _paired_latency(list(variants.values()), evaluation)
    return {"model": name, "metric": metric.name, "own_metric": OWN_METRICS.get(name, (None, None))[1],
            "variants": variants}


def _row(label: str, r: dict, fp32: dict) -> str:
    if "error" in r:
        return f"  {label:<18} failed: {r['error']}"
    own = f"  own {r['own']:.4f}" if "own" in r else ""
    return (f"  {label:<18} size {r['size'] / fp32['size']:5.2f}x  download {r['download'] / fp32['size']:5.2f}x  "
            f"task {r['quality']:.4f} ({r['quality'] - fp32['quality']:+.4f}){own}  "
            f"latency {r['latency_ms'] / fp32['latency_ms']:5.2f}x ({r['latency_ms']:.3f} ms)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="x86-vnni")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--json", type=Path, help="Also write the figures as JSON here.")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="edgeops-bench-") as tmp:
        for name in args.models.split(","):
            try:
                result = bench_model(name, MODELS[name], args.profile, Path(tmp))
            except zoo_thirdparty.ModelUnavailable as exc:
                print(f"{name}: unavailable ({exc})")
                continue
            variants = result["variants"]
            print(f"{name} (task metric {result['metric']}; own: {result['own_metric'] or '-'}), "
                  f"edgeops chose: {variants['edgeops']['chosen']} in {variants['edgeops']['compile_s']:.0f} s")
            for label, figures in variants.items():
                print(_row(label, figures, variants["fp32"]))
            results.append(result)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
