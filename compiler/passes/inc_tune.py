"""Intel Neural Compressor's accuracy-aware int8 tuning (`edgeops build --engine inc`), as one pass.

INC for ONNX is the `onnx-neural-compressor` package, which pins numpy<2 and so cannot live in
edgeops' venv. The pass therefore runs `compiler/inc_worker.py` under another Python: the one in the
environment variable EDGEOPS_INC_PYTHON (default: this interpreter, which works only where INC was
installed next to edgeops). It writes the model and the data into `ctx.workdir`, runs the worker in a
subprocess with a timeout, and returns the tuned model. The search then measures that model again with
edgeops' own metric, budgets and runtime check, like any other candidate.

Unlike the other passes, INC measures quality itself while it tunes, so it needs the eval data and the
metric. The metric's name and output, the tolerance and the trial limit are this pass's settings (so
the report records them); the eval data rides on `PassContext.evaluation`, an optional field that only
this pass reads, because a dataset is not a setting and would not belong in the report.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from edgeops.compiler.passes import PassContext, PassError
from edgeops.compiler.passes.quantize_common import check_quantized
from edgeops.compiler.passes.quantize_static import MINMAX_SAMPLES

PYTHON_ENV = "EDGEOPS_INC_PYTHON"
WORKER = Path(__file__).resolve().parents[1] / "inc_worker.py"
TRIALS_FILE = "inc-trials.json"  # in ctx.workdir after apply(): the worker's report, for the search's label
REQUIRED = ("numpy", "onnx", "onnxruntime", "onnx_neural_compressor", "prettytable", "scipy")
INSTALL = "pip install onnx-neural-compressor prettytable scipy"
PROBE_TIMEOUT_S = 120


def inc_python() -> str:
    """The Python that runs INC: $EDGEOPS_INC_PYTHON, else this one."""
    return os.environ.get(PYTHON_ENV) or sys.executable


def _install_hint(python: str) -> str:
    return (f"create a venv for it (`python3 -m venv inc-venv && inc-venv/bin/{INSTALL}`; it pins numpy<2, so "
            f"not in edgeops' venv) and set {PYTHON_ENV}=inc-venv/bin/python (now: {python})")


def check_available(python: str | None = None) -> str:
    """Raise PassError, with what to install, unless `python` can import INC and what it needs."""
    python = python or inc_python()
    if shutil.which(python) is None and not os.access(python, os.X_OK):
        raise PassError(f"{PYTHON_ENV}={python} is not an executable Python: {_install_hint(python)}")
    probe = ("import importlib.util as u, json; print(json.dumps([m for m in %r if u.find_spec(m) is None]))" % (REQUIRED,))
    try:
        proc = subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=PROBE_TIMEOUT_S)
        missing = json.loads(proc.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.TimeoutExpired, ValueError, IndexError) as exc:
        raise PassError(f"cannot run {python} to check for onnx-neural-compressor ({type(exc).__name__}): "
                        f"{_install_hint(python)}") from None
    if missing:
        raise PassError(f"onnx-neural-compressor is not installed for {python} (missing: {', '.join(missing)}): "
                        f"{_install_hint(python)}")
    return python


def _write_feeds(path: Path, feeds: list[dict[str, np.ndarray]], names: list[str], labels: np.ndarray | None) -> int:
    arrays = {f"f{i}_{j}": feed[name] for i, feed in enumerate(feeds) for j, name in enumerate(names)}
    if labels is not None:
        arrays["labels"] = labels
    np.savez(path, **arrays)
    return len(feeds)


def read_trials(ctx: PassContext) -> dict[str, Any] | None:
    """The worker's report from the last apply() in this workdir (trials, baseline, accepted trial)."""
    try:
        return json.loads((ctx.workdir / TRIALS_FILE).read_text())
    except (OSError, ValueError):
        return None


@dataclass(frozen=True)
class IncTune:
    metric: str = "accuracy"  # accuracy, top1 or cosine (compiler/metrics/), mirrored in the worker
    output: int = 0  # which output holds the class scores (accuracy / top1)
    max_drop: float = 0.01  # absolute, as --max-accuracy-drop; the worker converts it for INC
    max_trials: int = 16
    timeout_s: float = 1800.0
    name: str = "inc-tune"

    def apply(self, model: onnx.ModelProto, ctx: PassContext) -> onnx.ModelProto:
        evaluation = ctx.evaluation
        if evaluation is None:
            raise PassError("INC tuning needs the eval data in PassContext.evaluation")
        python = check_available()
        q = ctx.profile.quantization
        names = [i.name for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
        (ctx.workdir / TRIALS_FILE).unlink(missing_ok=True)
        with tempfile.TemporaryDirectory(prefix="inc-", dir=ctx.workdir) as tmp:
            work = Path(tmp)
            onnx.save(model, str(work / "model.onnx"), save_as_external_data=model.ByteSize() > 1_800_000_000)
            calib_feeds = 0
            if ctx.calib is not None:
                calib_feeds = _write_feeds(work / "calib.npz", list(ctx.calib.batches(MINMAX_SAMPLES, uniform=True)), names, None)
            eval_feeds = _write_feeds(work / "eval.npz", list(evaluation.batches()), names, evaluation.labels)
            request = {
                "model": str(work / "model.onnx"),
                "inputs": names,
                "calib": str(work / "calib.npz") if calib_feeds else None,
                "calib_feeds": calib_feeds,
                "eval": str(work / "eval.npz"),
                "eval_feeds": eval_feeds,
                "stacked": evaluation.stacked,
                "metric": {"name": self.metric, "output": self.output},
                "max_drop": self.max_drop,
                "quant_format": q.format,
                "activation_type": q.activation_type,
                "weight_type": q.weight_type,
                "per_channel": q.per_channel,
                "reduce_range": q.reduce_range,
                "max_trials": self.max_trials,
                "threads": max(1, min(ctx.profile.runtime.threads, os.cpu_count() or 1)),
                "output": str(work / "tuned.onnx"),
                "report": str(ctx.workdir / TRIALS_FILE),
            }
            (work / "request.json").write_text(json.dumps(request, indent=2))
            try:
                proc = subprocess.run([python, str(WORKER), str(work / "request.json")], cwd=work, capture_output=True,
                                      text=True, timeout=self.timeout_s, env={**os.environ, "PYTHONNOUSERSITE": "1"})
            except subprocess.TimeoutExpired:
                raise PassError(f"INC tuning did not finish within {self.timeout_s:.0f} s; try fewer eval samples "
                                "or the built-in engine (--engine edgeops)") from None
            report = read_trials(ctx)
            if proc.returncode != 0 or report is None or not report.get("ok"):
                raise PassError(self._failure(proc, report, python))
            tuned = onnx.load(str(work / "tuned.onnx"))
        return check_quantized(tuned)

    @staticmethod
    def _failure(proc: subprocess.CompletedProcess, report: dict | None, python: str) -> str:
        if report is not None and report.get("reason"):
            reason = report["reason"]
            if "is not installed" in reason:
                return f"onnx-neural-compressor cannot run under {python} ({reason.split(':')[0]}): {_install_hint(python)}"
            return reason
        lines = [line for line in (proc.stderr or "").splitlines() if line.strip()]
        tail = lines[-1].strip()[:300] if lines else f"exit status {proc.returncode}"
        return f"the INC worker failed under {python}: {tail}"
