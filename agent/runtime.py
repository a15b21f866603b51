"""Runtime adapters: run a bundle's model in whichever runtime its manifest names, and self-test it.

`load` picks the adapter registered in `ADAPTERS` under `manifest["runtime"]["name"]`:
"onnxruntime" (model.onnx) or "litert" (model.tflite, run by `ai-edge-litert`, else by the legacy
`tflite-runtime`). `selftest` feeds the bundle's golden inputs exactly as the manifest describes
(docs/bundle.md) and compares the outputs within its tolerances, so a model that loads but computes
something else (wrong kernels, a runtime that rounds differently) is never switched to.

Invariants:
- only numpy and the runtime itself are imported, and the runtime lazily, inside its adapter: a
  device needs just the runtime its bundles name, and this module stays within a 512 MB device;
- apps talk float: a LiteRT model with int8/uint8 inputs or outputs gets float feeds quantized and
  its outputs dequantized with the tensors' own scale and zero point;
- whatever a runtime raises while loading or running surfaces as an EdgeopsError saying which
  runtime failed and why; `selftest` raises only SelfTestFailed, naming the output when one is at fault.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import re
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import numpy as np

from edgeops.protocol.bundle import Bundle
from edgeops.protocol.litert import LiteRTModel, one_line
from edgeops.protocol.errors import EdgeopsError


class Model(Protocol):
    """A loaded model: feed arrays by input name, get every output by name."""

    def run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


class SelfTestFailed(EdgeopsError):
    """The model's outputs on the golden inputs are not the ones the bundle promises."""

    def __init__(self, reason: str, output: str | None = None):
        self.output = output
        where = f" on output {output!r}" if output else ""
        super().__init__(f"self-test failed{where}: {reason}")


class OnnxRuntimeModel:
    """An onnxruntime CPU session; `run` adds nothing but the error translation (inference overhead bar)."""

    def __init__(self, session: Any):
        self._session = session
        self._outputs = [output.name for output in session.get_outputs()]

    def run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            values = self._session.run(None, feed)
        except Exception as exc:  # onnxruntime's error classes are not public API and derive from Exception
            raise EdgeopsError(f"onnxruntime could not run the model: {exc}") from exc
        return dict(zip(self._outputs, values))


def _version(text: str) -> tuple[int, ...]:
    """'1.20.1' -> (1, 20, 1); a suffix such as 'rc1' or '+cpu' is ignored."""
    return tuple(int(m.group()) for m in (re.match(r"\d+", part) for part in text.split(".")[:3]) if m)


def _load_onnxruntime(model_bytes: bytes, min_version: str | None, threads: int) -> Model:
    import onnxruntime as ort

    if min_version and _version(ort.__version__) < _version(min_version):
        raise EdgeopsError(f"the model needs onnxruntime >= {min_version}, this device has {ort.__version__}")
    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, min(threads, os.cpu_count() or 1))
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # see OnnxRuntimeModel.run
        raise EdgeopsError(f"onnxruntime cannot load the model: {exc}") from exc
    return OnnxRuntimeModel(session)


# The LiteRT interpreters: (module, distribution). Bundles name either runtime ("litert" for
# ai-edge-litert, "tflite-runtime" for the legacy package, frozen at 2.14); either interpreter can
# run a bundle, the one it names first.
_LITERT = ("ai_edge_litert", "ai-edge-litert")
_TFLITE_RUNTIME = ("tflite_runtime", "tflite-runtime")


def _litert_loader(preferred: tuple[tuple[str, str], ...]) -> Callable[[bytes, str | None, int], Model]:
    """An adapter using the first importable interpreter of `preferred`. `min_version` is in the
    numbering of the first (the runtime the bundle names), so it is checked only against that one:
    the other package numbers its versions differently, and a model it cannot load fails at load,
    before any switch, with LiteRT's reason."""

    def load(model_bytes: bytes, min_version: str | None, threads: int) -> Model:
        for module, distribution in preferred:
            try:
                interpreter_class = importlib.import_module(f"{module}.interpreter").Interpreter
                break
            except ImportError:
                continue
        else:
            raise EdgeopsError("the bundle needs LiteRT, which is not installed: pip install 'edgeops[litert]'")
        if min_version and distribution == preferred[0][1]:
            try:
                installed = importlib.metadata.version(distribution)
            except importlib.metadata.PackageNotFoundError:
                raise EdgeopsError(f"the model needs {distribution} >= {min_version}, and the version of "
                                   f"{module} on this device is unknown (no package metadata)") from None
            if _version(installed) < _version(min_version):
                raise EdgeopsError(f"the model needs {distribution} >= {min_version}, this device has {installed}")
        try:
            interpreter = interpreter_class(model_content=model_bytes, num_threads=max(1, min(threads, os.cpu_count() or 1)))
            interpreter.allocate_tensors()
            return LiteRTModel(interpreter)
        except Exception as exc:  # ValueError for a bad flatbuffer, RuntimeError for a missing op
            raise EdgeopsError(f"LiteRT cannot load the model: {one_line(exc)}") from exc

    return load


# manifest["runtime"]["name"] -> adapter(model_bytes, manifest["runtime"].get("min_version"), threads)
ADAPTERS: dict[str, Callable[[bytes, str | None, int], Model]] = {
    "onnxruntime": _load_onnxruntime,
    "litert": _litert_loader((_LITERT, _TFLITE_RUNTIME)),
    "tflite-runtime": _litert_loader((_TFLITE_RUNTIME, _LITERT)),
}


def load(model_bytes: bytes, manifest: Mapping[str, Any], threads: int = 1) -> Model:
    """Load the model in the runtime the manifest names, with `threads` CPU threads (capped at the cores)."""
    runtime = manifest.get("runtime")
    name = runtime.get("name") if isinstance(runtime, dict) else None
    adapter = ADAPTERS.get(name) if isinstance(name, str) else None
    if adapter is None:
        raise EdgeopsError(f"the bundle needs runtime {name!r}, which this agent cannot run "
                           f"(it has: {', '.join(sorted(ADAPTERS))})")
    return adapter(model_bytes, runtime.get("min_version"), threads)


def selftest(model: Model, bundle: Bundle) -> None:
    """Run the bundle's golden inputs through `model`; raise SelfTestFailed unless every output matches."""
    spec = bundle.manifest.get("selftest")
    if not isinstance(spec, dict):
        raise SelfTestFailed("the manifest has no 'selftest' section, so the model cannot be checked")
    try:
        arrays = bundle.selftest()
        samples, batch = int(spec["samples"]), spec.get("batch")
        whole = frozenset(spec.get("whole_inputs") or ())
        tolerances = dict(spec["tolerance"])
    except (KeyError, ValueError, TypeError, OSError) as exc:  # np.load raises these on a bad npz
        raise SelfTestFailed(f"the self-test data or its manifest entry is malformed ({exc!r})") from None
    inputs = {key.removeprefix("input/"): value for key, value in arrays.items() if key.startswith("input/")}
    expected = {key.removeprefix("output/"): value for key, value in arrays.items() if key.startswith("output/")}
    if not inputs or not expected or samples < 1:
        raise SelfTestFailed("selftest.npz holds no golden inputs or no expected outputs")
    short = sorted(key for key, value in arrays.items() if value.ndim == 0 or len(value) != samples)
    if short:
        raise SelfTestFailed(f"golden arrays {', '.join(short)} do not hold the manifest's {samples} samples")
    try:
        actual = _run_golden(model, inputs, samples, batch, whole)
    except (EdgeopsError, ValueError) as exc:  # ValueError: per-sample outputs of different shapes
        raise SelfTestFailed(f"the golden inputs did not run ({exc})") from exc
    for name, want in sorted(expected.items()):
        _compare(name, actual.get(name), want, tolerances.get(name))


def _run_golden(model: Model, inputs: dict[str, np.ndarray], samples: int, batch: int | None,
                whole: frozenset[str]) -> dict[str, np.ndarray]:
    """Outputs with samples on the first axis, batched as the compiler batched them (compiler/data.py)."""
    if whole:  # one sample per run; inputs that stack get a batch of one
        feeds = [{k: np.asarray(v[i]) if k in whole else v[i : i + 1] for k, v in inputs.items()}
                 for i in range(samples)]
        join = np.stack
    else:
        step = batch or samples
        if samples % step:
            raise EdgeopsError(f"{samples} samples do not fill whole batches of {step}")
        feeds = [{k: v[start : start + step] for k, v in inputs.items()} for start in range(0, samples, step)]
        join = np.concatenate
    runs = [model.run(feed) for feed in feeds]
    return {name: join([run[name] for run in runs]) for name in runs[0]}


def _compare(name: str, got: np.ndarray | None, want: np.ndarray, tolerance: Any) -> None:
    if got is None:
        raise SelfTestFailed("the model does not produce it", name)
    if got.shape != want.shape:
        raise SelfTestFailed(f"shape {got.shape}, expected {want.shape}", name)
    if isinstance(tolerance, dict) and "match" in tolerance:
        # Integer outputs (labels): int8 kernels round differently across CPUs, so a share of samples may differ.
        same = np.all(got == want, axis=tuple(range(1, got.ndim)))
        if same.mean() < float(tolerance["match"]):
            raise SelfTestFailed(f"{int(same.sum())} of {same.size} samples match, "
                                 f"the bundle requires {float(tolerance['match']):.0%}", name)
    elif isinstance(tolerance, dict) and ("atol" in tolerance or "rtol" in tolerance):
        atol, rtol = float(tolerance.get("atol", 0.0)), float(tolerance.get("rtol", 0.0))
        error = np.abs(got.astype(np.float64) - want.astype(np.float64))
        error[np.isnan(error)] = np.inf  # NaN never matches
        bad = error > atol + rtol * np.abs(want.astype(np.float64))
        if bad.any():
            first = int(np.argwhere(bad)[0][0])
            raise SelfTestFailed(f"{int(bad.sum())} of {bad.size} values differ beyond atol={atol:g} rtol={rtol:g} "
                                 f"(max |error| {error.max():.3g}, first at sample {first})", name)
    else:
        raise SelfTestFailed(f"the manifest gives no usable tolerance ({tolerance!r})", name)
