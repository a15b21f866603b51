"""Compiler benchmark: fp32 vs plain onnxruntime.quantization defaults vs edgeops, per real model.

All three are measured in the same run, on the same eval data, with the same quality metric and
the same latency measurement, so the ratios hold on a noisy 2-core machine even when absolute
times do not. "Plain ORT" is what a user gets from one call with default settings: quantize_static
(QDQ, per-tensor, MinMax) when there is calibration data, quantize_dynamic otherwise.

    python bench/compiler_bench.py [--profile x86-vnni] [--models digits_cnn,magika] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import zlib
from pathlib import Path


from onnxruntime.quantization import CalibrationDataReader, quantize_dynamic, quantize_static

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import zoo  # noqa: E402  (tests/zoo.py: models trained on real data)
import zoo_thirdparty  # noqa: E402  (tests/zoo_thirdparty.py: models shipped in PyPI packages)

from edgeops.compiler import measure, quality  # noqa: E402
from edgeops.compiler.build import BuildRequest, build  # noqa: E402
from edgeops.compiler.data import load_npz  # noqa: E402
from edgeops.compiler.model import inputs_of, load_model, outputs_of  # noqa: E402
from edgeops.protocol.bundle import read_bundle  # noqa: E402

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


def _plain_ort(model_path: Path, calib, out: Path) -> None:
    if calib is not None:
        quantize_static(str(model_path), str(out), _Reader(calib))
    else:
        quantize_dynamic(str(model_path), str(out))


def _measure(model_bytes: bytes, evaluation, metric, reference, threads: int) -> dict:
    sess = measure.session(model_bytes, threads)
    outputs = measure.run_dataset(sess, evaluation)
    return {
        "size": len(model_bytes),
        "download": len(zlib.compress(model_bytes, 9)),
        "quality": quality.score(metric, reference, outputs, evaluation.labels),
        "session": sess,
    }


def _paired_latency(figures: list[dict], evaluation) -> None:
    """Latency of all variants measured in alternation, so machine load affects them alike."""
    measured = [f for f in figures if "session" in f]
    times = measure.paired_latency_ms([f.pop("session") for f in measured], measure.first_sample(evaluation))
    for f, ms in zip(measured, times):
        f["latency_ms"] = ms


def setup(example) -> tuple:
    """The model, its data, fp32 outputs and metric, and the threads every variant is measured with."""
    model = load_model(example.onnx)
    inputs = inputs_of(model)
    calib = load_npz(example.calib, inputs, "calibration")
    evaluation = load_npz(example.eval, inputs, "eval")
    threads = 2
    reference = measure.run_dataset(measure.session(model.SerializeToString(), threads), evaluation)
    metric = quality.choose_metric(model, outputs_of(model), reference, evaluation.labels is not None, None)
    return model, calib, evaluation, reference, metric, threads


def bench_model(name: str, make, profile: str, workdir: Path) -> dict:
    example = make(workdir / name)
    model, calib, evaluation, reference, metric, threads = setup(example)
    fp32 = _measure(model.SerializeToString(), evaluation, metric, reference, threads)
    plain_path = workdir / f"{name}-plain.onnx"
    try:
        _plain_ort(example.onnx, calib, plain_path)
        plain = _measure(plain_path.read_bytes(), evaluation, metric, reference, threads)
    except Exception as exc:  # plain ORT failing on a real model is itself a result
        plain = {"error": f"{type(exc).__name__}: {exc}"[:120]}
    report = build(BuildRequest(example.onnx, profile, example.calib, example.eval, name=name, outdir=workdir / "bundles"))
    bundle = read_bundle(report["bundle"])
    ours = _measure(bundle.model_bytes, evaluation, metric, reference, threads)
    ours["bundle"] = report["bundle_bytes"]
    ours["chosen"] = report["chosen"]
    _paired_latency([fp32, plain, ours], evaluation)
    return {"model": name, "metric": metric.name, "fp32": fp32, "plain_ort": plain, "edgeops": ours}


def _row(label: str, r: dict, fp32: dict, plain: dict | None) -> str:
    if "error" in r:
        return f"  {label:<10} failed: {r['error']}"
    vs_plain = ""
    if plain and "error" not in plain:
        vs_plain = (f" | vs plain: size {r['size'] / plain['size']:.2f}x, "
                    f"quality {r['quality'] - plain['quality']:+.4f}, latency {r['latency_ms'] / plain['latency_ms']:.2f}x")
    return (f"  {label:<10} size {r['size'] / 1e6:8.3f} MB ({r['size'] / fp32['size']:.2f}x)  "
            f"download {r['download'] / 1e6:7.3f} MB ({r['download'] / fp32['size']:.2f}x)  "
            f"quality {r['quality']:.4f} ({r['quality'] - fp32['quality']:+.4f})  "
            f"latency {r['latency_ms']:.3f} ms ({r['latency_ms'] / fp32['latency_ms']:.2f}x){vs_plain}")


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
            fp32, plain, ours = result["fp32"], result["plain_ort"], result["edgeops"]
            print(f"{name} ({result['metric']}), edgeops chose: {ours['chosen']}")
            print(_row("fp32", fp32, fp32, None))
            print(_row("plain ORT", plain, fp32, None))
            print(_row("edgeops", ours, fp32, plain))
            results.append(result)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
