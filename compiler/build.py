"""`edgeops build`: an ONNX model, a profile and data in; a bundle and a report out.

Order matters for users: every input is validated (and the output folder checked writable) before
the slow work starts, and nothing is written to the output folder until the bundle is complete.
"""

from __future__ import annotations

import logging
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
import onnxruntime

import edgeops
from edgeops.compiler import data as datamod
from edgeops.compiler import measure, reference
from edgeops.compiler.chart import candidates_html
from edgeops.compiler.model import inputs_of, load_model, outputs_of, opset_of, parameter_count
from edgeops.compiler.passes import PassContext, PassError, describe
from edgeops.compiler.passes.optimize import Optimize
from edgeops.compiler.search import Result, Search, reduces_precision, run_search
from edgeops.protocol import bundle as bundlemod
from edgeops.protocol.errors import EdgeopsError
from edgeops.protocol.profiles import Profile, load_profile

log = logging.getLogger(__name__)
HOLDOUT = 0.3
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


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
    metric: str | None = None


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
    latency: dict[str, float] = field(default_factory=dict)
    memory: dict[str, float] = field(default_factory=dict)


def build(req: BuildRequest, progress: Callable[[str], None] = lambda message: None) -> dict[str, Any]:
    """Compile, validate and bundle; return the report. Raises EdgeopsError when no candidate fits."""
    profile = load_profile(req.profile)
    if profile.runtime.name != "onnxruntime":
        raise EdgeopsError(
            f"profile {profile.name} runs {profile.runtime.name}; the LiteRT/TFLite target is not available yet, "
            "pick an onnxruntime profile (see `edgeops profiles list`)"
        )
    if not 0 <= req.max_drop < 1:
        raise EdgeopsError(f"--max-accuracy-drop must be between 0 and 1, got {req.max_drop}")
    name = _check_name(req.name or req.model.stem, "model name")
    version = _check_name(req.version, "version")
    _check_outdir(req.outdir)
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
        search = run_search(Search(base, ctx, evaluation, req.max_drop, req.metric, progress))
        chosen = search.best()
        if chosen is None:
            raise EdgeopsError(_no_fit_message(search, profile))
        compiled = Compiled(req, profile, name, version, source, calib, evaluation, search, chosen, notes)
        progress("measuring fp32 and the chosen model's latency side by side")
        _validate(compiled, Path(tmp))
        report = _report(compiled)
        payload = package(compiled, report)
    path = req.outdir / bundlemod.bundle_filename(name, version, profile.name)
    report["bundle"] = str(path)
    report["bundle_bytes"] = len(payload)
    report["chart"] = str(path.with_suffix(".html"))
    bundlemod.atomic_write(path, payload)
    bundlemod.atomic_write(Path(report["chart"]), candidates_html(report).encode())
    return report


def _validate(c: Compiled, tmp: Path) -> None:
    """Final figures for the chosen model against fp32, with the notes a user must read."""
    if c.profile.precision != "fp32" and not reduces_precision(c.chosen):
        failures = sorted({r.error or "; ".join(r.misses) for r in c.search.results if not r.ok})
        c.notes.append(f"no {c.profile.precision} candidate fit, so the bundle holds the fp32 model: {' / '.join(failures)}")
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
    if c.memory["compiled"] > c.profile.budget.max_runtime_memory_mb:
        raise EdgeopsError(
            f"the compiled model needs {c.memory['compiled']:.0f} MB at run time, over the profile's "
            f"{c.profile.budget.max_runtime_memory_mb} MB budget"
        )


def _no_fit_message(search: Search, profile: Profile) -> str:
    closest = search.closest()
    if closest is None:
        errors = "; ".join(sorted({r.error or "" for r in search.results}))[:300]
        return f"no candidate could be built for profile {profile.name}: {errors}"
    return (
        f"no candidate fits profile {profile.name} within the tolerance: the closest, '{closest.label}', has "
        f"quality {closest.quality:.4f} vs fp32 {search.fp32_quality:.4f}, {closest.download_bytes} B, "
        f"{closest.latency_ms:.2f} ms ({'; '.join(closest.misses)}). Try a larger --max-accuracy-drop, more "
        "representative --calib data, or a profile with a larger budget"
    )


def _report(c: Compiled) -> dict[str, Any]:
    search, chosen = c.search, c.chosen
    return {
        "bundle": None,
        "name": c.name,
        "version": c.version,
        "profile": c.profile.name,
        "runtime": {"name": c.profile.runtime.name, "device_version": c.profile.runtime.version,
                    "validated_with": onnxruntime.__version__},
        "size_bytes": chosen.size_bytes,
        "download_bytes": chosen.download_bytes,
        "fp32_size_bytes": _source_size(c.req.model, c.source),
        "parameters": parameter_count(search.base),
        "quality": {
            "metric": search.metric.name,
            "fp32": round(search.fp32_quality, 6),
            "compiled": round(chosen.quality, 6),
            "drop": round(chosen.drop, 6),
            "max_drop": c.req.max_drop,
            "eval_samples": c.evaluation.usable(),
        },
        "latency_ms": c.latency,
        "peak_memory_mb": c.memory,
        "chosen": chosen.label,
        "passes": [describe(Optimize()), *(describe(p) for p in chosen.passes)],
        "candidates": [r.to_dict() for r in search.results],
        "notes": c.notes,
    }


def package(c: Compiled, report: dict[str, Any]) -> bytes:
    """The bundle: the chosen model, its manifest, drift reference and self-test (docs/bundle.md)."""
    model = c.chosen.model
    model_data = model.SerializeToString(deterministic=True)
    out_names = [o.name for o in outputs_of(model)]
    sess = measure.session(model_data)
    ref_data = c.evaluation if c.calib is None else c.calib
    classifier = c.search.metric.output if c.search.metric.name != "cosine" else None
    summaries = reference.reference_summaries(ref_data, out_names, measure.run_dataset(sess, ref_data), classifier)
    golden = measure.run_dataset(sess, c.evaluation, reference.SELFTEST_SAMPLES)
    arrays, selftest = reference.selftest_arrays(c.evaluation, out_names, golden)
    manifest = {
        "name": c.name,
        "version": c.version,
        "profile": c.profile.name,
        "runtime": {"name": c.profile.runtime.name, "min_version": c.profile.runtime.version},
        "model": {"file": "model.onnx", "format": "onnx", "opset": opset_of(model), "ir_version": model.ir_version,
                  "sha256": bundlemod.sha256_bytes(model_data), "size": len(model_data)},
        "inputs": [spec.to_dict() for spec in inputs_of(model)],
        "outputs": [spec.to_dict() for spec in outputs_of(model)],
        "classifier_output": classifier,
        "selftest": selftest,
        "compiler": {"engine": "edgeops", "chosen": c.chosen.label, "passes": report["passes"], "max_drop": c.req.max_drop},
        "metrics": {"quality": report["quality"], "size_bytes": c.chosen.size_bytes, "fp32_size_bytes": report["fp32_size_bytes"]},
        "lineage": {
            "source_sha256": bundlemod.sha256_file(c.req.model),
            "calib_sha256": c.calib.digest if c.calib is not None else None,
            "eval_sha256": c.evaluation.digest,
            "edgeops_version": edgeops.__version__,
            "onnx_version": onnx.__version__,
            "onnxruntime_version": onnxruntime.__version__,
        },
    }
    members = {
        "model.onnx": model_data,
        "reference.json": bundlemod.canonical_json(summaries),
        "selftest.npz": bundlemod.npz_bytes(arrays),
    }
    return bundlemod.build_bundle(manifest, members)
