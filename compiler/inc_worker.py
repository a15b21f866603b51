"""Intel Neural Compressor's accuracy-aware tuning of one ONNX model, run as a separate process.

    PYTHON inc_worker.py request.json

This script runs under the Python of a venv that has `onnx-neural-compressor` (EDGEOPS_INC_PYTHON),
not under edgeops' own: that package pins numpy<2, which cannot share a venv with edgeops' numpy 2
stack. So it imports only the standard library at the top, and numpy, onnx, onnxruntime and
onnx_neural_compressor inside `main`, never edgeops. `compiler/passes/inc_tune.py` writes the request
and the data, runs it, and re-measures the result with edgeops' own metric and budgets.

The request (JSON) names:
    model            the optimized fp32 model (.onnx)
    inputs           the model's input names, in order
    calib, eval      .npz files of ready-made feeds: key f"f{i}_{j}" is feed i of input j; `eval` may
                     hold `labels`; `calib` may be null (then only dynamic quantization is tuned)
    calib_feeds, eval_feeds   how many feeds each file holds
    stacked          whether eval outputs of consecutive feeds concatenate (batches) or stack (samples)
    metric           {"name": "accuracy" | "top1" | "cosine", "output": index of the class scores}
    max_drop         the largest absolute quality drop accepted (edgeops' --max-accuracy-drop)
    quant_format     "qdq" or "qoperator"; activation_type, weight_type: "uint8" / "int8"
    per_channel      false restricts weights to per-tensor; true lets INC try per-channel and per-tensor
    reduce_range     7-bit weights (for CPUs without VNNI)
    max_trials, threads, output (the tuned model's path), report (this worker's JSON's path)

It writes `output` and the report: {"ok", "reason", "baseline", "tolerable_loss", "trials": [...],
"accepted"}. On any failure it writes the reason there and exits non-zero (2: bad request or
import failure, 3: no configuration met the tolerance, 4: another error).

What it handles (onnx-neural-compressor 1.0, its only release):
- `tolerable_loss` is relative (result >= baseline * (1 - tolerable_loss)): max_drop is converted.
- autotune calls `exit(0)` when no configuration meets the goal, when its baseline evaluation fails
  and when a config has no op type to quantize: SystemExit is caught and turned into a reason.
- on reaching max_trials it returns the last trial's model even when that missed: the report says
  whether the returned model met the goal, and edgeops measures it again anyway.
- eval_fn receives a model path (external data next to it), not a ModelProto.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
import time
import traceback

MISSING_HINT = "pip install onnx-neural-compressor prettytable scipy"
QUANTIZED_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "ConvInteger",
                 "QLinearConv", "QLinearMatMul", "QGemm", "QAttention", "DynamicQuantizeMatMul", "MatMulIntegerToFloat"}
EXIT_BAD_REQUEST, EXIT_NO_FIT, EXIT_ERROR = 2, 3, 4


class Failed(Exception):
    def __init__(self, reason: str, code: int):
        super().__init__(reason)
        self.reason, self.code = reason, code


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def _feeds(np, path: str | None, count: int, inputs: list[str]) -> tuple[list[dict], object]:
    if path is None:
        return [], None
    with np.load(path, allow_pickle=False) as data:
        feeds = [{name: data[f"f{i}_{j}"] for j, name in enumerate(inputs)} for i in range(count)]
        labels = data["labels"] if "labels" in data.files else None
    return feeds, labels


def _top1(np, scores):
    scores = np.asarray(scores)
    return scores.reshape(len(scores), -1, scores.shape[-1]).argmax(-1)[:, 0]


def _cosine(np, a, b) -> float:
    a = a.reshape(len(a), -1).astype(np.float64)
    b = b.reshape(len(b), -1).astype(np.float64)
    if a.shape[1] < 8:
        a, b = a.reshape(1, -1), b.reshape(1, -1)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    both_zero = norms == 0
    cos = np.where(both_zero, 1.0, (a * b).sum(1) / np.where(both_zero, 1, norms))
    return float(np.mean(cos))


def score(np, metric: dict, reference: list, outputs: list, labels) -> float:
    """Accuracy and top-1 as edgeops.compiler.metrics score them; a flattened cosine as the proxy for any other
    task metric (edgeops re-measures the result with the real one)."""
    index = metric.get("output", 0)
    if metric["name"] == "accuracy":
        return float(np.mean(_top1(np, outputs[index]) == labels[: len(outputs[index])]))
    if metric["name"] == "top1":
        return float(np.mean(_top1(np, outputs[index]) == _top1(np, reference[index])))
    floats = [i for i, r in enumerate(reference) if np.issubdtype(r.dtype, np.floating)]
    return float(np.mean([_cosine(np, reference[i], outputs[i]) for i in floats])) if floats else 1.0


def _describe_config(cfg) -> dict:
    """The settings of one INC trial that matter to a reader of the report."""
    out = {"kind": type(cfg).__name__}
    for key in ("quant_format", "per_channel", "reduce_range", "quant_last_matmul", "op_types_to_quantize",
                "activation_type", "weight_type", "calibrate_method"):
        value = getattr(cfg, key, None)
        if value is None:
            continue
        value = getattr(value, "name", value)
        out[key] = sorted(value) if isinstance(value, (list, set, tuple)) and key == "op_types_to_quantize" else value
    return json.loads(json.dumps(out, default=str))


def tune(req: dict, state: dict) -> None:
    try:
        import numpy as np
        import onnx
        import onnxruntime as ort
    except ImportError as exc:
        raise Failed(f"{exc.name or exc} is not installed for {sys.executable}: {MISSING_HINT}", EXIT_BAD_REQUEST) from None
    try:
        # INC imports prettytable and scipy without declaring them; its logger prints at import time
        with contextlib.redirect_stdout(io.StringIO()):
            from onnx_neural_compressor import constants, data_reader
            from onnx_neural_compressor.quantization import config, tuning
        from onnxruntime.quantization import QuantFormat, QuantType
    except ImportError as exc:
        name = exc.name or str(exc)
        raise Failed(f"{name} is not installed for {sys.executable}: {MISSING_HINT}", EXIT_BAD_REQUEST) from None

    inputs = req["inputs"]
    calib_feeds, _ = _feeds(np, req.get("calib"), req.get("calib_feeds", 0), inputs)
    eval_feeds, labels = _feeds(np, req["eval"], req["eval_feeds"], inputs)
    metric = req["metric"]
    if metric["name"] == "accuracy" and labels is None:
        raise Failed("the accuracy metric needs `labels` in the eval data", EXIT_BAD_REQUEST)
    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, int(req.get("threads", 1)))
    options.inter_op_num_threads = 1
    options.log_severity_level = 3

    def run(path: str) -> list:
        sess = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        chunks = [sess.run(None, feed) for feed in eval_feeds]
        join = np.concatenate if req.get("stacked", True) else np.stack
        return [join([chunk[i] for chunk in chunks]) for i in range(len(chunks[0]))]

    reference = run(req["model"])
    baseline = score(np, metric, reference, reference, labels)
    max_drop = float(req["max_drop"])
    # INC accepts result >= baseline * (1 - tolerable_loss): relative. edgeops' max_drop is absolute.
    tolerable_loss = max_drop / baseline if baseline > 0 else 1.0
    state.update(baseline=baseline, tolerable_loss=tolerable_loss, metric=metric)
    trials: list[dict] = state["trials"]
    configs: list = []

    original_quantize = tuning._quantize

    def recording_quantize(*args, **kwargs):  # to name each trial's configuration in the report
        configs.append(_describe_config(kwargs.get("quant_config")))
        return original_quantize(*args, **kwargs)

    tuning._quantize = recording_quantize

    def eval_fn(path: str) -> float:
        started = time.perf_counter()
        try:
            value = score(np, metric, reference, run(path), labels)
        except Exception as exc:
            state["eval_error"] = _first_line(exc)
            raise
        if not configs:  # the first call evaluates the fp32 baseline, before any trial
            return value
        # INC's dynamic config skips Gemm, and a config whose op types the graph lacks changes nothing:
        # such a "quantized" model scores like fp32 and INC would accept it. It must not win.
        graph = onnx.load(path, load_external_data=False).graph
        quantized = any(node.op_type in QUANTIZED_OPS for node in graph.node)
        meets = quantized and value >= baseline - max_drop - 1e-12
        trials.append({"trial": len(trials) + 1, "config": configs[-1], "quality": round(value, 6),
                       "drop": round(baseline - value, 6), "quantized": quantized, "meets": meets,
                       "eval_s": round(time.perf_counter() - started, 3)})
        return value if quantized else float("-inf")

    class Reader(data_reader.CalibrationDataReader):
        """Calibration feeds as edgeops batches them; autotune rewinds before every trial."""

        def __init__(self) -> None:
            self.i = 0

        def get_next(self):
            if self.i >= len(calib_feeds):
                return None
            self.i += 1
            return calib_feeds[self.i - 1]

        def rewind(self) -> None:
            self.i = 0

    fmt = QuantFormat.QDQ if req.get("quant_format", "qdq") == "qdq" else QuantFormat.QOperator
    types = {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}
    activation = types[req.get("activation_type", "uint8")]
    weight = types[req.get("weight_type", "int8")]
    per_channel = [True, False] if req.get("per_channel", True) else False
    reduce_range = bool(req.get("reduce_range", False))
    config_set = []
    if calib_feeds:
        # StaticQuantConfig.get_config_set_for_tuning's op-type ladder, with per_channel from the profile
        # (that helper hard-codes per_channel=[True, False] and has no way to restrict it).
        table = constants.STATIC_QDQ_OP_LIST_MAP if fmt == QuantFormat.QDQ else constants.STATIC_QOPERATOR_OP_LIST_MAP
        ops = table["CPUExecutionProvider"]
        ladder = [set(), {"Add", "Mul"}, {"Add", "Mul", "Gather", "GatherElements", "GatherND"},
                  {"Add", "Mul", "Gather", "GatherElements", "GatherND", "Attention"}]
        seen = []
        for dropped in ladder:
            chosen = sorted(set(ops) - dropped)
            if chosen and chosen not in seen:
                seen.append(chosen)
        config_set += [
            config.StaticQuantConfig(
                quant_format=fmt, activation_type=activation, weight_type=weight, op_types_to_quantize=chosen,
                per_channel=per_channel, reduce_range=reduce_range, quant_last_matmul=[True, False],
                calibration_sampling_size=len(calib_feeds), execution_provider="CPUExecutionProvider",
            )
            for chosen in seen
        ]
    # Dynamic quantization of a Conv with a bias calls StaticQuantizer._dynamic_quantize_bias, which INC 1.0
    # never defines (AttributeError, ending the whole tuning); ConvInteger is slow in onnxruntime anyway.
    dynamic_ops = [op for op in constants.DYNAMIC_OP_LIST_MAP["CPUExecutionProvider"] if op not in ("Conv", "FusedConv")]
    config_set.append(config.DynamicQuantConfig(weight_type=weight, per_channel=bool(req.get("per_channel", True)),
                                                reduce_range=reduce_range, op_types_to_quantize=dynamic_ops,
                                                execution_provider="CPUExecutionProvider"))
    tune_config = tuning.TuningConfig(config_set=config_set, tolerable_loss=tolerable_loss,
                                      max_trials=int(req.get("max_trials", 16)))
    started = time.perf_counter()
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            best = tuning.autotune(req["model"], tune_config=tune_config, eval_fn=eval_fn,
                                   calibration_data_reader=Reader() if calib_feeds else None)
    except SystemExit:  # autotune's exit(0): no result
        state["tune_s"] = round(time.perf_counter() - started, 3)
        _no_result(state, trials, metric, baseline, max_drop, log.getvalue())
    except Exception as exc:  # INC itself failed in a trial: say which, and how the trials before it did
        state["tune_s"] = round(time.perf_counter() - started, 3)
        state["traceback"] = traceback.format_exc()[-4000:]
        failed = f"INC failed in trial {len(configs)} ({_short(configs[-1]) if configs else 'before any trial'}): {_first_line(exc)}"
        done = [t for t in trials if t["quantized"]]
        if done:
            best_trial = max(done, key=lambda t: t["quality"])
            failed += (f"; the {len(trials)} trial(s) before it missed the tolerance (best {metric['name']} "
                       f"{best_trial['quality']:.6f} vs fp32 {baseline:.6f})")
        raise Failed(failed, EXIT_ERROR) from None
    state["tune_s"] = round(time.perf_counter() - started, 3)
    if best is None:
        raise Failed("INC returned no model", EXIT_ERROR)
    onnx.save(best, req["output"])
    accepted = trials[-1] if trials else None
    state["accepted"] = accepted
    state["output_bytes"] = len(best.SerializeToString())
    if accepted is not None and not accepted["meets"]:
        # max_trials reached: INC hands back the last trial even though it missed; edgeops re-measures it
        state["warning"] = f"INC reached max_trials={req.get('max_trials')} and returned its last trial, which misses the tolerance"


def _short(cfg: dict) -> str:
    kind = "dynamic" if cfg.get("kind") == "DynamicQuantConfig" else f"static {str(cfg.get('quant_format', '')).lower()}"
    return f"{kind}, {'per-channel' if cfg.get('per_channel') else 'per-tensor'}"


def _no_result(state: dict, trials: list, metric: dict, baseline: float, max_drop: float, log: str) -> None:
    """Why autotune called exit(0); always raises Failed."""
    if "eval_error" in state and not trials:
        raise Failed(f"INC could not evaluate the model: {state['eval_error']}", EXIT_ERROR)
    done = [t for t in trials if t["quantized"]]
    if done:
        best = max(done, key=lambda t: t["quality"])
        raise Failed(
            f"INC found no configuration within the tolerance in {len(trials)} trial(s): the best reached "
            f"{metric['name']} {best['quality']:.6f} vs fp32 {baseline:.6f} (drop {best['drop']:.6f} > {max_drop})",
            EXIT_NO_FIT)
    if trials:
        raise Failed(f"INC's {len(trials)} configuration(s) quantized nothing in this graph", EXIT_NO_FIT)
    raise Failed(f"INC stopped without trying any configuration: {_last_line(log)}", EXIT_NO_FIT)


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:300] if lines else "no output"


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__.splitlines()[2].strip(), file=sys.stderr)
        return EXIT_BAD_REQUEST
    state: dict = {"ok": False, "reason": None, "trials": [], "python": sys.executable}
    code = 0
    report_path = None
    try:
        with open(argv[1]) as f:
            req = json.load(f)
        report_path = req["report"]
        tune(req, state)
        state["ok"] = True
    except Failed as exc:
        state["reason"], code = exc.reason, exc.code
    except SystemExit as exc:  # an exit() of INC's outside autotune
        state["reason"], code = f"INC exited ({exc.code})", EXIT_ERROR
    except Exception as exc:
        state["reason"], code = _first_line(exc), EXIT_ERROR
        state["traceback"] = traceback.format_exc()[-4000:]
    if report_path is None:
        print(f"inc_worker: {state['reason']}", file=sys.stderr)
        return code or EXIT_BAD_REQUEST
    with open(report_path, "w") as f:
        json.dump(state, f, indent=2, default=str)
    if code:
        print(f"inc_worker: {state['reason']}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv))
