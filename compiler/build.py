"""`edgeops build`: an ONNX model, a profile and data in; a bundle and a report out.

Order matters for users: every input is validated (and the output folder checked writable) before
the slow work starts, and nothing is written to the output folder until the bundle is complete.
"""

from __future__ import annotations

import logging
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
import onnxruntime

import edgeops
from edgeops.compiler import data as datamod
from edgeops.compiler import litert, measure, metrics, reference
from edgeops.compiler.chart import candidates_html
from edgeops.compiler.model import inputs_of, load_model, outputs_of, opset_of, parameter_count
from edgeops.compiler.passes import PassContext, PassError, describe
from edgeops.compiler.passes.optimize import Optimize
from edgeops.compiler.search import DEFAULT_TIME_LIMIT_S, Result, Search, precision_of, run_inc, run_search
from edgeops.protocol import bundle as bundlemod
from edgeops.protocol.errors import BuildFailed, EdgeopsError
from edgeops.protocol.profiles import Profile, load_profile

log = logging.getLogger(__name__)
HOLDOUT = 0.3
ENGINES = {"edgeops": run_search, "inc": run_inc}
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
FALLBACK_SHOWN = 3  # smaller candidates the fallback note names, best quality first


@dataclass(frozen=True)
class BuildRequest:
    model: Path
    profile: str | Path
    calib: Path | None = None
    eval: Path | None = None
    max_drop: float = 0.01
    name: str | None = None
    version: str = "1.0.0"
    outdir: Path = Path(".")
    metric: str | None = None  # a built-in metric's name, or PATH.py:FUNCTION (compiler/metrics/user.py)
    engine: str = "edgeops"  # "edgeops" (the built-in search) or "inc" (Intel Neural Compressor's tuning)
    search_time: float = DEFAULT_TIME_LIMIT_S  # seconds; past it only the float fallbacks are measured


def _check_outdir(outdir: Path) -> None:
    try:
        outdir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=outdir):
            pass
    except OSError as exc:
        raise EdgeopsError(f"cannot write to output folder {outdir}: {exc.strerror or exc}; pick another with -o") from None


def _check_name(value: str, what: str) -> str:
    if not NAME_RE.match(value):
        raise EdgeopsError(f"{what} {value!r} must be letters, digits, '.', '_' or '-' (at most 100)")
    return value


def _source_size(path: Path, model: onnx.ModelProto) -> int:
    """Bytes of the fp32 model as shipped: the .onnx file plus its external data files."""
    locations = {
        entry.value
        for tensor in onnx.external_data_helper._get_all_tensors(model)
        for entry in tensor.external_data
        if entry.key == "location"
    }
    return path.stat().st_size + sum((path.parent / loc).stat().st_size for loc in locations)


def _datasets(req: BuildRequest, model: onnx.ModelProto) -> tuple[datamod.Dataset | None, datamod.Dataset, list[str]]:
    inputs = inputs_of(model)
    notes = []
    calib = datamod.load_npz(req.calib, inputs, "calibration") if req.calib else None
    if req.eval:
        evaluation = datamod.load_npz(req.eval, inputs, "eval")
    elif calib is not None:
        calib, evaluation = datamod.split(calib, HOLDOUT)
        notes.append(f"no --eval given: quality measured on a held-out {HOLDOUT:.0%} of the calibration data")
    else:
        raise EdgeopsError("give --calib (calibration data), or at least --eval; see `edgeops build --help`")
    if calib is None:
        notes.append("no calibration data: only weight-only/dynamic quantization was tried")
    return calib, evaluation, notes


@dataclass
class Compiled:
    """Everything one build decided and measured, from which the report and the bundle are made."""

    req: BuildRequest
    profile: Profile
    name: str
    version: str
    source: onnx.ModelProto
    calib: datamod.Dataset | None
    evaluation: datamod.Dataset
    search: Search
    chosen: Result
    notes: list[str]
    started: float = 0.0  # time.monotonic() when the build began
    latency: dict[str, float] = field(default_factory=dict)
    memory: dict[str, float] = field(default_factory=dict)


def build(req: BuildRequest, progress: Callable[[str], None] = lambda message: None) -> dict[str, Any]:
    """Compile, validate and bundle; return the report. Raises BuildFailed (with the report of every
    candidate) when no candidate fits, EdgeopsError on bad input."""
    started = time.monotonic()
    profile = load_profile(req.profile)
    tflite = profile.runtime.name in litert.RUNTIMES
    if req.engine not in ENGINES:
        raise EdgeopsError(f"unknown engine {req.engine!r}: pick one of {', '.join(ENGINES)}")
    if tflite and req.engine != "edgeops":
        raise EdgeopsError(f"--engine {req.engine} quantizes ONNX for onnxruntime, and profile {profile.name} runs "
                           f"{profile.runtime.name}; drop --engine, or pick an onnxruntime profile")
    if not 0 <= req.max_drop < 1:
        raise EdgeopsError(f"--max-accuracy-drop must be between 0 and 1, got {req.max_drop}")
    if not 0 < req.search_time < 1e7:
        raise EdgeopsError(f"--search-time must be a positive duration, got {req.search_time}")
    name = _check_name(req.name or req.model.stem, "model name")
    version = _check_name(req.version, "version")
    _check_outdir(req.outdir)
    forced_metric = metrics.parse(req.metric)
    progress(f"loading {req.model}")
    source = load_model(req.model)
    calib, evaluation, notes = _datasets(req, source)
    with tempfile.TemporaryDirectory(prefix="edgeops-build-") as tmp:
        ctx = PassContext(profile=profile, calib=calib, workdir=Path(tmp))
        progress("optimizing the fp32 graph")
        try:
            base = Optimize().apply(source, ctx)
        except PassError as exc:
            raise EdgeopsError(f"{req.model}: {exc}") from None
        progress(f"measuring fp32 on {evaluation.usable()} eval samples")
        if tflite:
            search = litert.LiteRTSearch(base, ctx, evaluation, req.max_drop, forced_metric, progress).run()
        else:
            search = ENGINES[req.engine](Search(base, ctx, evaluation, req.max_drop, forced_metric, progress, req.search_time))
        notes.extend(search.notes)
        chosen = search.best()
        compiled = Compiled(req, profile, name, version, source, calib, evaluation, search, chosen, notes, started)
        if chosen is None:
            message = _no_fit_message(search, profile)
            raise BuildFailed(message, {**_report(compiled), "error": message})
        progress("measuring fp32 and the chosen model's latency side by side")
        (_validate_tflite if tflite else _validate)(compiled, Path(tmp))
        report = _report(compiled)
        payload = (package_tflite if tflite else package)(compiled, report)
    path = req.outdir / bundlemod.bundle_filename(name, version, profile.name)
    report["bundle"] = str(path)
    report["bundle_bytes"] = len(payload)
    report["chart"] = str(path.with_suffix(".html"))
    bundlemod.atomic_write(path, payload)
    bundlemod.atomic_write(Path(report["chart"]), candidates_html(report).encode())
    return report


def _fallback_note(c: Compiled) -> None:
    """When the bundle is less compressed than the profile asks (fp16 or fp32 for int8), say why, with numbers."""
    rank = {"int4": 0, "int8": 0, "fp16": 1, "fp32": 2}
    shipped = precision_of(c.chosen)
    if rank[shipped] <= rank[c.profile.precision]:
        return
    metric = c.search.metric.name
    smaller = [r for r in c.search.results if rank[precision_of(r)] < rank[shipped]]
    measured = sorted((r for r in smaller if r.error is None and not r.ok), key=lambda r: -r.quality)
    missed = [f"{r.label}: {metric} {r.quality:.4f} ({'; '.join(r.misses)})" for r in measured]
    missed += [f"{r.label}: {r.error}" for r in smaller if r.error is not None]  # those that could not be built
    closest = missed[:FALLBACK_SHOWN]
    slower = [f"{r.label} {r.latency_ms:.2f} ms" for r in smaller if r.ok and r.clearly_slower]
    why = " / ".join(closest + ([f"clearly slower than fp32 here: {', '.join(slower)}"] if slower else []))
    more = len(missed) - len(closest)
    c.notes.append(f"no {c.profile.precision} candidate fit, so the bundle holds the {shipped} model "
                   f"(fp32 {metric} {c.search.fp32_quality:.4f}); the closest: {why or 'none could be built'}"
                   + (f"; {more} more in the candidate table" if more else ""))


def _check_memory(c: Compiled) -> None:
    if c.memory["compiled"] > c.profile.budget.max_runtime_memory_mb:
        raise EdgeopsError(
            f"the compiled model needs {c.memory['compiled']:.0f} MB at run time, over the profile's "
            f"{c.profile.budget.max_runtime_memory_mb} MB budget"
        )


def _validate_tflite(c: Compiled, tmp: Path) -> None:
    """Final figures for the chosen TFLite model against the fp32 TFLite one (both measured in LiteRT)."""
    _fallback_note(c)
    fp32 = next(r for r in c.search.results if r.passes[0].variant == "fp32")
    c.latency = {"fp32": round(fp32.latency_ms, 4), "compiled": round(c.chosen.latency_ms, 4)}
    feed_path = tmp / "feed.npz"
    np.savez(feed_path, **measure.first_sample(c.search.tf_evaluation))
    for key, result in (("fp32", fp32), ("compiled", c.chosen)):
        path = tmp / f"{key}.tflite"
        path.write_bytes(c.search.models.get(id(result), b""))
        c.memory[key] = round(measure.peak_memory_mb(path, feed_path, c.profile.runtime.threads), 1) if path.stat().st_size else 0.0
    _check_memory(c)


def _validate(c: Compiled, tmp: Path) -> None:
    """Final figures for the chosen model against fp32, with the notes a user must read."""
    _fallback_note(c)
    threads = c.profile.runtime.threads
    feed = measure.first_sample(c.evaluation)
    models = {"fp32": c.search.base, "compiled": c.chosen.model}
    sessions = [measure.session(m.SerializeToString(), threads) for m in models.values()]
    c.latency = {k: round(v, 4) for k, v in zip(models, measure.paired_latency_ms(sessions, feed))}
    if c.latency["compiled"] > c.latency["fp32"]:
        close = " (within measurement noise)" if c.latency["compiled"] < c.latency["fp32"] * 1.05 else ""
        c.notes.append(
            f"the chosen model is slower than fp32 here{close}: {c.latency['compiled']:.3f} ms vs "
            f"{c.latency['fp32']:.3f} ms; no faster candidate met the tolerance"
        )
    feed_path = tmp / "feed.npz"
    np.savez(feed_path, **feed)
    for key, model in models.items():
        path = tmp / f"{key}.onnx"
        path.write_bytes(model.SerializeToString())
        c.memory[key] = round(measure.peak_memory_mb(path, feed_path, threads), 1)
    _check_memory(c)


def _no_fit_message(search: Search, profile: Profile) -> str:
    closest = search.closest()
    if closest is None:
        errors = "; ".join(sorted({r.error or "" for r in search.results}))[:300]
        return f"no candidate could be built for profile {profile.name}: {errors}"
    budget = profile.budget
    advice = []
    if any(m.startswith("drop") for m in closest.misses):
        advice.append("a larger --max-accuracy-drop or more representative --calib data")
    if any("B > budget" in m for m in closest.misses):
        advice.append(f"a profile with a larger bundle budget (max_bundle_bytes {budget.max_bundle_bytes})")
    if any("ms > budget" in m for m in closest.misses):
        advice.append(f"a profile with a larger latency budget (max_latency_ms {budget.max_latency_ms}), a smaller "
                      "model, or a build on an idle machine: latency is measured on this one")
    return (
        f"no candidate fits profile {profile.name}: the closest, '{closest.label}', has {search.metric.name} "
        f"{closest.quality:.4f} vs fp32 {search.fp32_quality:.4f}, {closest.download_bytes} B, "
        f"{closest.latency_ms:.2f} ms ({'; '.join(closest.misses)}). Try {', or '.join(advice) or 'another profile'}"
    )


def _report(c: Compiled) -> dict[str, Any]:
    """The report of a build; on failure (`c.chosen` is None) the chosen model's figures are absent."""
    search, chosen = c.search, c.chosen
    report = {
        "bundle": None,
        "name": c.name,
        "version": c.version,
        "profile": c.profile.name,
        "engine": c.req.engine,
        "runtime": {"name": c.profile.runtime.name, "device_version": c.profile.runtime.version,
                    "validated_with": _validated_with(c.profile)},
        "fp32_size_bytes": _source_size(c.req.model, c.source),
        "parameters": parameter_count(search.base),
        "quality": {
            "metric": search.metric.name,
            "why": search.metric.reason,
            "fp32": round(search.fp32_quality, 6),
            "max_drop": c.req.max_drop,
            "eval_samples": c.evaluation.usable(),
        },
        "search": {"seconds": round(search.elapsed_s, 1), "time_limit_s": c.req.search_time, "skipped": search.skipped},
        "candidates": [r.to_dict() for r in search.results],
        "warnings": search.warnings,
        "notes": c.notes,
        "compile_seconds": round(time.monotonic() - c.started, 1),
    }
    if chosen is not None:
        report.update(size_bytes=chosen.size_bytes, download_bytes=chosen.download_bytes, chosen=chosen.label,
                      precision=precision_of(chosen), latency_ms=c.latency, peak_memory_mb=c.memory,
                      passes=[describe(Optimize()), *(describe(p) for p in chosen.passes)])
        report["quality"].update(compiled=round(chosen.quality, 6), drop=round(chosen.drop, 6))
    return report


def package(c: Compiled, report: dict[str, Any]) -> bytes:
    """The bundle of an ONNX model: the model, its manifest, drift reference and self-test (docs/bundle.md)."""
    model = c.chosen.model
    data = model.SerializeToString(deterministic=True)
    sess = measure.session(data)
    entry = {"file": "model.onnx", "format": "onnx", "opset": opset_of(model), "ir_version": model.ir_version}
    return _bundle(c, report, entry, data, [spec.to_dict() for spec in inputs_of(model)],
                   [spec.to_dict() for spec in outputs_of(model)],
                   lambda dataset, limit=None: measure.run_dataset(sess, dataset, limit), c.evaluation, c.calib,
                   {"onnxruntime_version": onnxruntime.__version__})


def package_tflite(c: Compiled, report: dict[str, Any]) -> bytes:
    """The bundle of a TFLite model: inputs, self-test and drift reference in TensorFlow's layout, as
    the device sees them, run through the same adapter the agent uses."""
    search = c.search
    data = search.models[id(c.chosen)]
    model = litert.interpreter(data)
    names = [spec.name for spec in search.outputs]
    inputs, outputs = litert.io_specs(data, search)
    entry = {"file": "model.tflite", "format": "tflite", "ops": [list(op) for op in litert.ops(data)],
             "min_runtime_version": litert.min_runtime_version(data)}
    calib = litert.to_tf_layout(c.calib) if c.calib is not None else None
    return _bundle(c, report, entry, data, inputs, outputs,
                   lambda dataset, limit=None: litert.run_dataset(model, dataset, names, limit), search.tf_evaluation,
                   calib, {"litert_version": _validated_with(c.profile)})


def _validated_with(profile: Profile) -> str:
    """The version of the runtime this build measured in."""
    if profile.runtime.name in litert.RUNTIMES:
        import importlib.metadata

        return importlib.metadata.version("ai-edge-litert")
    return onnxruntime.__version__


def _bundle(c: Compiled, report: dict[str, Any], entry: dict[str, Any], data: bytes, inputs: list[dict], outputs: list[dict],
            run: Callable[..., list[np.ndarray]], evaluation: datamod.Dataset, calib: datamod.Dataset | None,
            runtime_versions: dict[str, str]) -> bytes:
    out_names = [spec["name"] for spec in outputs]
    ref_data = evaluation if calib is None else calib
    metric = c.search.metric
    classifier = out_names.index(metric.output) if metric.name in ("accuracy", "top1") and metric.output in out_names else None
    summaries = reference.reference_summaries(ref_data, out_names, run(ref_data), classifier)
    arrays, selftest = reference.selftest_arrays(evaluation, out_names, run(evaluation, reference.SELFTEST_SAMPLES))
    manifest = {
        "name": c.name,
        "version": c.version,
        "profile": c.profile.name,
        "runtime": {"name": c.profile.runtime.name, "min_version": c.profile.runtime.version},
        "model": {**entry, "sha256": bundlemod.sha256_bytes(data), "size": len(data)},
        "inputs": inputs,
        "outputs": outputs,
        "classifier_output": classifier,
        "selftest": selftest,
        "compiler": {"engine": c.req.engine, "chosen": c.chosen.label, "passes": report["passes"], "max_drop": c.req.max_drop},
        "metrics": {"quality": report["quality"], "size_bytes": c.chosen.size_bytes, "fp32_size_bytes": report["fp32_size_bytes"]},
        "lineage": {
            "source_sha256": bundlemod.sha256_file(c.req.model),
            "calib_sha256": c.calib.digest if c.calib is not None else None,
            "eval_sha256": c.evaluation.digest,
            "edgeops_version": edgeops.__version__,
            "onnx_version": onnx.__version__,
            **runtime_versions,
        },
    }
    members = {
        entry["file"]: data,
        "reference.json": bundlemod.canonical_json(summaries),
        "selftest.npz": bundlemod.npz_bytes(arrays),
    }
    return bundlemod.build_bundle(manifest, members)
