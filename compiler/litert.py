"""The LiteRT/TFLite target: the optimized ONNX model converted by onnx2tf + TensorFlow (in a child
process, compiler/tflite_worker.py), each variant measured in LiteRT on the same data as fp32 ONNX,
checked against the runtime version the profile names, and the best one that fits chosen.

Variants: fp32, fp16, dynamic-range int8 (per-channel weights, and per-tensor, whose op versions old
runtimes know) and full-integer int8 calibrated on the build's calibration data; which are tried
depends on the profile's precision, the fp32 one being the fallback as for ONNX.

Invariants:
- Data enter LiteRT in TensorFlow's layout: 4-D NCHW inputs become NHWC. Quality compares LiteRT's
  outputs with the fp32 ONNX model's on the same samples, and the manifest records both layouts.
- Outputs keep their ONNX names (written into the flatbuffer's signature), so apps and the drift
  reference see the same names on either runtime; outputs TFLite cannot compute are dropped with a
  note, or the build fails naming the op and the node.
- A candidate is refused when it needs a newer runtime than the profile's: by the converter's
  `min_runtime_version` for tflite-runtime, and by loading it in that runtime where one is at hand
  (EDGEOPS_TFLITE_RUNTIME_PYTHON); the bundle's own model is loaded and run in LiteRT here.
- Self-test outputs are computed through edgeops.protocol.litert.LiteRTModel, as the agent runs it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import onnx

from edgeops.compiler import measure, metrics
from edgeops.compiler.data import Dataset
from edgeops.compiler.model import inputs_of, outputs_of
from edgeops.compiler.passes import PassContext
from edgeops.compiler.search import Result
from edgeops.protocol.errors import EdgeopsError
from edgeops.protocol.litert import LiteRTModel, one_line

RUNTIMES = ("litert", "tflite-runtime")
CONVERTER_PYTHON = "EDGEOPS_TFLITE_PYTHON"  # a Python with the `tflite` extra (TensorFlow, onnx2tf)
LEGACY_PYTHON = "EDGEOPS_TFLITE_RUNTIME_PYTHON"  # a Python with tflite-runtime, to load-test candidates
CONVERT_TIMEOUT_S = 1800
TIMING_S = 0.6


@dataclass(frozen=True)
class ConvertTFLite:
    """The conversion as the report and the manifest record it (a pass's `describe`)."""

    variant: str
    name: str = field(default="tflite", init=False)


def variants(precision: str, has_calib: bool) -> list[str]:
    """What to try, in order of preference, for a profile's precision."""
    if precision == "fp32":
        return ["fp32"]
    if precision == "fp16":
        return ["fp16", "fp32"]
    return [*(["int8"] if has_calib else []), "dynamic", "dynamic-per-tensor", "fp16", "fp32"]


def to_tf_layout(data: Dataset) -> Dataset:
    """The dataset as LiteRT takes it: 4-D inputs NCHW -> NHWC."""
    arrays = {k: np.ascontiguousarray(v.transpose(0, 2, 3, 1)) if v.ndim == 4 else v for k, v in data.arrays.items()}
    return replace(data, arrays=arrays)


# ------------------------------------------------------------------------------------- conversion

@dataclass
class Converted:
    models: dict[str, bytes]
    outputs: list[str]  # the ONNX outputs kept
    dropped: list[dict[str, str]]


def convert(base: onnx.ModelProto, calib: Dataset, wanted: list[str], workdir: Path) -> Converted:
    """Run the conversion worker; EdgeopsError with its reason (naming the op and node where it can)."""
    workdir.mkdir(parents=True, exist_ok=True)
    model_path, calib_path = workdir / "base.onnx", workdir / "calib.npz"
    model_path.write_bytes(base.SerializeToString())
    np.savez(calib_path, **calib.arrays)
    request = workdir / "request.json"
    request.write_text(json.dumps({"model": str(model_path), "calib": str(calib_path), "outdir": str(workdir),
                                   "variants": wanted}))
    python = os.environ.get(CONVERTER_PYTHON) or sys.executable
    worker = Path(__file__).with_name("tflite_worker.py")
    try:
        proc = subprocess.run([python, str(worker), str(request)], capture_output=True, text=True, timeout=CONVERT_TIMEOUT_S,
                              env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""})
    except subprocess.TimeoutExpired:
        raise EdgeopsError(f"the TFLite conversion took over {CONVERT_TIMEOUT_S}s and was stopped") from None
    except OSError as exc:
        raise EdgeopsError(f"cannot run {python} for the TFLite conversion ({exc.strerror}); fix {CONVERTER_PYTHON}") from None
    result_path = workdir / "result.json"
    if not result_path.exists():  # it died before it could say why, e.g. on importing numpy
        lacking = re.search(r"No module named '([^']+)'", proc.stderr)
        if lacking:
            raise _missing_extra(python, lacking.group(1))
        tail = proc.stderr.strip().splitlines()[-1:] or [f"exit status {proc.returncode}"]
        raise EdgeopsError(f"the TFLite conversion failed: {tail[0]}")
    result = json.loads(result_path.read_text())
    if result.get("missing"):
        raise _missing_extra(python, result["missing"])
    if result["error"]:
        raise EdgeopsError(result["error"])
    models = {variant: Path(path).read_bytes() for variant, path in result["files"].items()}
    return Converted(models, result["outputs"], result["dropped"])


def _missing_extra(python: str, module: str) -> EdgeopsError:
    return EdgeopsError(f"{python} has no {module}, and LiteRT profiles convert with TensorFlow and onnx2tf: "
                        f"pip install 'edgeops[tflite]', or set {CONVERTER_PYTHON} to a Python that has them")


def rename_outputs(data: bytes, names: list[str]) -> bytes:
    """The flatbuffer with its signature outputs (output_0, output_1, ...) and their tensors named
    after the ONNX outputs, in order."""
    from ai_edge_litert import schema_py_generated as schema
    import flatbuffers

    model = schema.ModelT.InitFromPackedBuf(bytearray(data), 0)
    for signature in model.signatureDefs or []:
        ordered = sorted(signature.outputs, key=lambda t: int(re.sub(r"\D", "", t.name.decode()) or 0))
        if len(ordered) != len(names):
            raise EdgeopsError(f"the converted model has {len(ordered)} outputs, the ONNX model {len(names)}")
        for tensor_map, name in zip(ordered, names):
            tensor_map.name = name.encode()
            model.subgraphs[signature.subgraphIndex].tensors[tensor_map.tensorIndex].name = name.encode()
    builder = flatbuffers.Builder(len(data) + 1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


# ----------------------------------------------------------------------------- runtime compatibility

def ops(data: bytes) -> list[tuple[str, int]]:
    """The builtin (or custom) ops and versions a .tflite uses."""
    from ai_edge_litert import schema_py_generated as schema

    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    model = schema.Model.GetRootAs(data, 0)
    codes = []
    for i in range(model.OperatorCodesLength()):
        code = model.OperatorCodes(i)
        builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
        label = f"CUSTOM:{code.CustomCode().decode()}" if builtin == schema.BuiltinOperator.CUSTOM else names[builtin]
        codes.append((label, code.Version()))
    return sorted(set(codes))


def min_runtime_version(data: bytes) -> str | None:
    """The TensorFlow Lite version the converter says the model needs (its own op-version table)."""
    from ai_edge_litert import schema_py_generated as schema

    model = schema.Model.GetRootAs(data, 0)
    for i in range(model.MetadataLength()):
        if model.Metadata(i).Name() == b"min_runtime_version":
            raw = bytes(model.Buffers(model.Metadata(i).Buffer()).DataAsNumpy())
            return raw.split(b"\0")[0].decode() or None
    return None


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", text)[:3])


def runtime_misses(data: bytes, runtime: str, version: str) -> list[str]:
    """Why the profile's runtime could not load the model (empty when it can, as far as we know)."""
    needs = min_runtime_version(data)
    if runtime == "tflite-runtime" and needs and _version(needs) > _version(version):
        newest = max(ops(data), key=lambda op: op[1])
        return [f"needs TFLite >= {needs} (ops up to {newest[0]} v{newest[1]}); the profile's tflite-runtime "
                f"{version} cannot load it"]
    python = os.environ.get(LEGACY_PYTHON)
    if runtime == "tflite-runtime" and python:
        return _legacy_load(python, data, version)
    return []


_LOAD = ("import sys, numpy as np, tflite_runtime.interpreter as t; "
         "i = t.Interpreter(model_content=open(sys.argv[1], 'rb').read()); i.allocate_tensors(); i.invoke()")


def _legacy_load(python: str, data: bytes, version: str) -> list[str]:
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".tflite") as fh:
        fh.write(data)
        fh.flush()
        proc = subprocess.run([python, "-c", _LOAD, fh.name], capture_output=True, text=True, timeout=120)
    if proc.returncode == 0:
        return []
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    reason = next((line for line in lines if "Didn't find op" in line), lines[-1] if lines else f"exit {proc.returncode}")
    return [f"tflite-runtime {version} cannot load it: {reason.strip()}"]


# -------------------------------------------------------------------------------------------- search

def interpreter(data: bytes, threads: int = 1) -> LiteRTModel:
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        raise EdgeopsError("LiteRT profiles need ai-edge-litert to measure the model: pip install 'edgeops[litert]'") from None
    tfl = Interpreter(model_content=data, num_threads=threads)
    tfl.allocate_tensors()
    return LiteRTModel(tfl)


def run_dataset(model: LiteRTModel, data: Dataset, names: list[str], limit: int | None = None) -> list[np.ndarray]:
    """Outputs per ONNX output name over the samples, in ONNX layout (NHWC outputs back to NCHW)."""
    runs = [model.run(feed) for feed in data.batches(limit=limit)]
    return [np.concatenate([run[name] for run in runs]) for name in names]


def _timed_ms(model: LiteRTModel, feed: dict[str, np.ndarray], budget_s: float) -> float:
    for _ in range(3):
        model.run(feed)
    times, deadline = [], time.perf_counter() + budget_s
    while len(times) < 25 or time.perf_counter() < deadline:
        start = time.perf_counter()
        model.run(feed)
        times.append(time.perf_counter() - start)
        if len(times) >= 2000:
            break
    return float(np.median(times) * 1000)


@dataclass
class LiteRTSearch:
    """What a LiteRT build measured; the report reads it as it reads compiler.search.Search."""

    base: onnx.ModelProto
    ctx: PassContext
    evaluation: Dataset  # ONNX layout
    max_drop: float
    forced_metric: str | metrics.Metric | None = None  # what metrics.parse made of --metric
    progress: Callable[[str], None] = lambda message: None
    results: list[Result] = field(default_factory=list)
    models: dict[int, bytes] = field(default_factory=dict)  # id(result) -> .tflite bytes
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    skipped: int = 0  # a fixed set of variants: --search-time does not cut it short

    @property
    def elapsed_s(self) -> float:
        return time.monotonic() - self.started

    def run(self) -> "LiteRTSearch":
        profile = self.ctx.profile
        fp32_session = measure.session(self.base.SerializeToString(), profile.runtime.threads)
        fp32_outputs = measure.run_dataset(fp32_session, self.evaluation)
        wanted = variants(profile.precision, self.ctx.calib is not None)
        self.progress(f"converting to TFLite ({', '.join(wanted)})")
        converted = convert(self.base, self.ctx.calib or self.evaluation, wanted, self.ctx.workdir / "tflite")
        kept = [i for i, spec in enumerate(outputs_of(self.base)) if spec.name in converted.outputs]
        for gone in converted.dropped:
            self.notes.append(f"output {gone['output']} is not in the TFLite model: TFLite has no {gone['op']} "
                              f"(node {gone['node']}); the other outputs are")
        self.outputs = [outputs_of(self.base)[i] for i in kept]
        self.fp32_outputs = {self.outputs[j].name: fp32_outputs[i] for j, i in enumerate(kept)}
        info = metrics.ModelInfo.of(self.base, [spec.shape for spec in inputs_of(self.base)], self.evaluation.labels)
        self.metric, self.warnings = metrics.choose(self.fp32_outputs, info, self.forced_metric)
        self.fp32_quality = self._score(self.fp32_outputs)
        self.tf_evaluation = to_tf_layout(self.evaluation)
        self.feed = measure.first_sample(self.tf_evaluation)
        names = [spec.name for spec in self.outputs]
        self.fp32_ms = None
        for variant in ["fp32", *(v for v in wanted if v != "fp32")]:  # fp32 first: the latency baseline
            self._evaluate(variant, converted.models[variant], names)
        return self

    def _evaluate(self, variant: str, raw: bytes, names: list[str]) -> None:
        profile = self.ctx.profile
        self.progress(f"measuring the {variant} TFLite model in LiteRT")
        result = Result(f"tflite {variant}", (ConvertTFLite(variant),))
        self.results.append(result)
        try:
            data = rename_outputs(raw, names)
            model = interpreter(data, profile.runtime.threads)
            outputs = {name: _onnx_layout(out, self.fp32_outputs[name])
                       for name, out in zip(names, run_dataset(model, self.tf_evaluation, names))}
            result.quality = self._score(outputs)
            result.latency_ms = _timed_ms(model, self.feed, TIMING_S)
        except metrics.MetricError:
            raise  # the user's metric failed: that ends the build, not the variant
        except EdgeopsError as exc:
            result.error = str(exc)
            return
        except Exception as exc:  # a variant LiteRT cannot load or run is dropped, not fatal
            result.error = f"{type(exc).__name__}: {one_line(exc)}"
            return
        if variant == "fp32":
            self.fp32_ms = result.latency_ms
        result.latency_ratio = result.latency_ms / self.fp32_ms if self.fp32_ms else 1.0
        self.models[id(result)] = data
        result.size_bytes = len(data)
        result.download_bytes = len(zlib.compress(data, 9))
        result.drop = self.fp32_quality - result.quality
        if result.drop > self.max_drop + 1e-12:
            result.misses.append(f"drop {result.drop:.4f} > {self.max_drop}")
        if result.download_bytes > profile.budget.max_bundle_bytes:
            result.misses.append(f"{result.download_bytes} B > budget {profile.budget.max_bundle_bytes} B")
        if result.latency_ms > profile.budget.max_latency_ms:
            result.misses.append(f"{result.latency_ms:.2f} ms > budget {profile.budget.max_latency_ms} ms")
        result.misses.extend(runtime_misses(data, profile.runtime.name, profile.runtime.version))

    def _score(self, outputs: metrics.Outputs) -> float:
        samples = len(next(iter(outputs.values())))
        return metrics.score(self.metric, self.fp32_outputs, outputs,
                             {k: v[:samples] for k, v in self.evaluation.extras.items()})

    def best(self) -> Result | None:
        """The first fitting variant in the profile's order of preference (`variants`), unless it is
        clearly slower than fp32: full integer before dynamic range, because int8 accelerators (Edge
        TPU, NPUs) run only the former, and fewer bytes otherwise matter less than that."""
        rank = {variant: i for i, variant in enumerate(variants(self.ctx.profile.precision, self.ctx.calib is not None))}
        fitting = [r for r in self.results if r.ok]
        return min(fitting, key=lambda r: (r.clearly_slower, rank[r.passes[0].variant]), default=None)

    def closest(self) -> Result | None:
        measured = [r for r in self.results if r.error is None]
        return min(measured, key=lambda r: (len(r.misses), r.drop, r.download_bytes), default=None)


def _onnx_layout(out: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """A LiteRT output back in the ONNX layout when it came out NHWC."""
    if out.shape != reference.shape and out.ndim == 4 and out.transpose(0, 3, 1, 2).shape == reference.shape:
        return out.transpose(0, 3, 1, 2)
    return out


def io_specs(data: bytes, search: LiteRTSearch) -> tuple[list[dict], list[dict]]:
    """The manifest's inputs and outputs: what apps feed the agent (float, TensorFlow layout) and get back."""
    from ai_edge_litert.interpreter import Interpreter

    tfl = Interpreter(model_content=data)
    signature = tfl.get_signature_runner() if tfl.get_signature_list() else None
    details = (signature.get_input_details(), signature.get_output_details()) if signature else (
        {d["name"]: d for d in tfl.get_input_details()}, {d["name"]: d for d in tfl.get_output_details()})
    onnx_inputs = {spec.name: spec for spec in search.base.graph.input}

    def spec(name: str, detail: dict, source_rank: int | None) -> dict:
        shape = [("N" if i == 0 else None) if d < 0 else int(d) for i, d in enumerate(detail["shape_signature"])]
        layout = "NHWC" if len(shape) == 4 and source_rank == 4 else None
        entry = {"name": name, "dtype": "float32" if np.dtype(detail["dtype"]).kind in "iu" and detail["quantization"][0]
                 else np.dtype(detail["dtype"]).name, "shape": shape}
        if layout:
            entry |= {"layout": layout, "source_layout": "NCHW"}
        return entry

    inputs = [spec(name, d, len(onnx_inputs[name].type.tensor_type.shape.dim) if name in onnx_inputs else None)
              for name, d in details[0].items()]
    order = [s.name for s in search.outputs]
    outputs = [spec(name, details[1][name], None) for name in order if name in details[1]]
    return inputs, outputs
