"""Engines side by side: plain onnxruntime.quantization defaults, `edgeops build` (the built-in search)
and `edgeops build --engine inc` (Intel Neural Compressor's accuracy-aware tuning), per real model.

Everything is measured in the same run, on the same calibration and eval data, with the same quality
metric (edgeops' own) and the same latency measurement: fp32 and the three results are timed in
alternation (batch 1), so the ratios to fp32 hold on a busy 2-core machine even when absolute times
drift. Compile time is wall time: one `quantize_static` call for plain ORT; the whole `build()`
(optimization, search or tuning, validation, memory probe, bundle) for the two engines.
"Plain ORT" is compiler_bench.py's: `quantize_static` with its defaults (QDQ, all op types, per-tensor,
MinMax). INC needs its own venv: set EDGEOPS_INC_PYTHON (docs/compiler.md).

    EDGEOPS_INC_PYTHON=/path/inc-venv/bin/python python bench/engines_bench.py [--profile x86-vnni]
        [--models digits_mlp,digits_cnn,ocr-cls,magika] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import compiler_bench as cb  # noqa: E402  (its models, plain-ORT call and measurements; it puts tests/ on sys.path)
import zoo_thirdparty  # noqa: E402

from edgeops.compiler.build import BuildRequest, build  # noqa: E402
from edgeops.protocol.bundle import read_bundle  # noqa: E402
from edgeops.protocol.errors import EdgeopsError  # noqa: E402

DEFAULT_MODELS = "digits_mlp,digits_cnn,ocr-cls,magika"
VARIANTS = ("plain_ort", "edgeops", "inc")


def _engine(engine: str, name: str, example, profile: str, outdir: Path, measure_args: tuple) -> dict:
    started = time.perf_counter()
    try:
        report = build(BuildRequest(example.onnx, profile, example.calib, example.eval, name=name,
                                    outdir=outdir / engine, engine=engine))
    except EdgeopsError as exc:
        return {"error": str(exc)[:160], "compile_s": time.perf_counter() - started}
    compile_s = time.perf_counter() - started
    figures = cb._measure(read_bundle(report["bundle"]).model_bytes, *measure_args)
    figures.update(compile_s=compile_s, bundle=report["bundle_bytes"], chosen=report["chosen"],
                   fp32_fallback=not report["passes"][1:])
    return figures


def bench_model(name: str, profile: str, workdir: Path) -> dict:
    example = cb.MODELS[name](workdir / name)
    model, calib, evaluation, reference, metric, threads = cb.setup(example)
    measure_args = (evaluation, metric, reference, threads)
    fp32 = cb._measure(model.SerializeToString(), *measure_args)
    plain_path = workdir / f"{name}-plain.onnx"
    started = time.perf_counter()
    try:
        cb._plain_ort_static(example.onnx, calib, plain_path)
        plain_s = time.perf_counter() - started
        plain = cb._measure(plain_path.read_bytes(), *measure_args)
        plain["compile_s"] = plain_s
    except Exception as exc:  # plain ORT failing on a real model is itself a result
        plain = {"error": f"{type(exc).__name__}: {exc}"[:160]}
    result = {"model": name, "metric": metric.name, "fp32": fp32, "plain_ort": plain}
    for engine in ("edgeops", "inc"):
        result[engine] = _engine(engine, name, example, profile, workdir / "bundles", measure_args)
    cb._paired_latency([fp32, *(result[v] for v in VARIANTS)], evaluation)
    return result


def _row(label: str, r: dict, fp32: dict) -> str:
    if "error" in r:
        return f"| | {label} | failed: {r['error']} | | | | |"
    chosen = f" ({r['chosen']})" if "chosen" in r else ""
    return (f"| | {label}{chosen} | {r['size'] / fp32['size']:.2f} | {r['download'] / fp32['size']:.2f} | "
            f"{r['quality']:.4f} ({r['quality'] - fp32['quality']:+.4f}) | {r['latency_ms'] / fp32['latency_ms']:.2f} | "
            f"{r['compile_s']:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="x86-vnni")
    parser.add_argument("--models", default=DEFAULT_MODELS, help=f"comma-separated, from: {', '.join(cb.MODELS)}")
    parser.add_argument("--json", type=Path, help="Also write the figures as JSON here.")
    args = parser.parse_args()
    results = []
    print("| model | variant | size (x fp32) | download (x fp32) | quality (vs fp32) | latency (x fp32) | compile s |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="edgeops-engines-") as tmp:
        for name in args.models.split(","):
            try:
                result = bench_model(name, args.profile, Path(tmp))
            except zoo_thirdparty.ModelUnavailable as exc:
                print(f"| {name} | unavailable: {exc} | | | | | |")
                continue
            fp32 = result["fp32"]
            print(f"| {name} | fp32: {fp32['size'] / 1e6:.3f} MB, {result['metric']} {fp32['quality']:.4f}, "
                  f"{fp32['latency_ms']:.3f} ms | 1.00 | {fp32['download'] / fp32['size']:.2f} | | 1.00 | |")
            for variant in VARIANTS:
                print(_row({"plain_ort": "plain ORT", "edgeops": "edgeops", "inc": "INC"}[variant], result[variant], fp32))
            sys.stdout.flush()
            results.append(result)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
