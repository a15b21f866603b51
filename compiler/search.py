"""Accuracy-aware search: try candidate pass pipelines, measure each on the task metric, keep the best that fits.

Every candidate is measured, never assumed: on real models static QDQ over all op types has
collapsed a classifier to chance and a detector to finding nothing, dynamic quantization of CNNs
ran 4-9x slower than fp32, and which one wins depends on the model. For int8 profiles the rounds are:

1. static QDQ with calibration: all ops, then weight ops only (MinMax); while the better one misses
   the tolerance: 7-bit weights, then groups kept in float (the head, the front end, both, and both
   plus the 2/4/8 layers whose quantization error grows most), then the other calibration methods;
2. dynamic: per-channel on MatMul/Gemm only (recurrent and transformer models), then per-channel and
   per-tensor on every op type dynamic quantization supports;
3. weight-only int8 (per-channel weights, float math), and 4-bit block-wise MatMul weights where the
   profile's onnxruntime has MatMulNBits;
4. fp16 (float32 inputs and outputs kept), and fp32 when nothing else fits;
5. structured pruning (whole channels) in front of the winner, then magnitude pruning, mildest first
   and on while they fit, each kept only when it shrinks the download by PRUNE_MIN_SAVING.

A model that already holds quantized ops is measured as it is: quantizing it again is not possible.

Selection: within the tolerance and the profile's budgets, prefer candidates not clearly slower
than fp32, then the smallest download (in 2 % steps), then the one tried first. A candidate whose
task metric drops past the tolerance is never chosen, whatever its size. Latency only vetoes, with a
margin (CLEARLY_SLOWER) and a longer second measurement near it, so noise does not pick the bundle.

Time: past `time_limit_s` only the float fallbacks are still measured; the report says so.
"""

from __future__ import annotations

import logging
import time
import zlib
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import onnx

from edgeops.compiler import compat, measure, metrics
from edgeops.compiler.data import Dataset
from edgeops.compiler.model import WEIGHT_OPS, count_ops, inputs_of, outputs_of
from edgeops.compiler.passes import Pass, PassContext, PassError, describe
from edgeops.compiler.passes.float16 import Float16
from edgeops.compiler.passes.inc_tune import IncTune
from edgeops.compiler.passes.prune_channels import ChannelPrune
from edgeops.compiler.passes.prune_magnitude import MagnitudePrune
from edgeops.compiler.passes.quantize_common import QUANTIZED_OPS
from edgeops.compiler.passes.quantize_dynamic import DynamicQuantize
from edgeops.compiler.passes.quantize_int4 import MIN_RUNTIME as INT4_MIN_RUNTIME
from edgeops.compiler.passes.quantize_int4 import Int4MatMul
from edgeops.compiler.passes.quantize_static import StaticQuantize
from edgeops.compiler.passes.quantize_weights import WeightOnlyQuantize
from edgeops.compiler.sensitivity import head_and_front, sensitive_nodes
from edgeops.protocol.profiles import version_tuple

log = logging.getLogger(__name__)
# Mildest first, stopping at the first that misses: without fine-tuning, pruning more only loses more.
SPARSITIES = (0.3, 0.5, 0.7)
CHANNEL_RATIOS = (0.25, 0.5)
# Latency only vetoes a candidate when it is clearly slower than fp32 (ConvInteger runs 4-9x slower):
# finer differences are noise on a busy 2-core machine. A ratio within NEAR of the threshold is
# measured again for longer and the two are averaged, so noise rarely flips the decision.
CLEARLY_SLOWER = 1.5
NEAR = 1.25
LATENCY_FLOOR_MS = 0.05
# Downloads within 2 % of the fp32 size count as equal; then the earlier candidate wins, since
# candidates are tried in order of preference (static before dynamic, fewer float layers first).
SIZE_BUCKET = 0.02
CANDIDATE_TIMING_S = 0.6
EXCLUDE_COUNTS = (2, 4, 8)
DYNAMIC_OPS = ("Conv", "MatMul", "Gemm", "Gather", "LSTM", "Attention")
SEQUENCE_OPS = ("MatMul", "Gemm", "LSTM", "GRU", "Attention")
PRUNE_MIN_SAVING = 0.10
DEFAULT_TIME_LIMIT_S = 20 * 60
FEW_DETECTIONS = 20


@dataclass
class Result:
    """One candidate, measured."""

    label: str
    passes: tuple[Pass, ...]
    model: onnx.ModelProto | None = None
    size_bytes: int = 0
    download_bytes: int = 0
    quality: float = 0.0
    drop: float = 0.0
    latency_ms: float = 0.0
    latency_ratio: float = 1.0  # to fp32, measured side by side
    error: str | None = None
    misses: list[str] = field(default_factory=list)

    @property
    def clearly_slower(self) -> bool:
        fp32_ms = self.latency_ms / self.latency_ratio if self.latency_ratio else self.latency_ms
        return self.latency_ratio > CLEARLY_SLOWER and self.latency_ms - fp32_ms > LATENCY_FLOOR_MS

    @property
    def ok(self) -> bool:
        return self.error is None and not self.misses

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "passes": [describe(p) for p in self.passes],
            "precision": precision_of(self),
            "size_bytes": self.size_bytes,
            "download_bytes": self.download_bytes,
            "quality": round(self.quality, 6),
            "drop": round(self.drop, 6),
            "latency_ms": round(self.latency_ms, 4),
            "latency_ratio": round(self.latency_ratio, 3),
            "ok": self.ok,
            "error": self.error,
            "misses": self.misses,
        }


@dataclass
class Search:
    """The state one search works with: the optimized fp32 model, data, metric and limits."""

    base: onnx.ModelProto
    ctx: PassContext
    evaluation: Dataset
    max_drop: float
    forced_metric: str | metrics.Metric | None = None  # what metrics.parse made of --metric
    progress: Callable[[str], None] = lambda message: None
    time_limit_s: float = DEFAULT_TIME_LIMIT_S
    fp32_outputs: metrics.Outputs = field(default_factory=dict)
    fp32_quality: float = 1.0
    results: list[Result] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    skipped: int = 0  # candidates left out when the time limit ran out

    def __post_init__(self) -> None:
        self.started = time.monotonic()
        self.fp32_session = measure.session(self.base.SerializeToString(), self.ctx.profile.runtime.threads)
        self.names = [spec.name for spec in outputs_of(self.base)]
        self.fp32_outputs = dict(zip(self.names, measure.run_dataset(self.fp32_session, self.evaluation)))
        info = metrics.ModelInfo.of(self.base, [spec.shape for spec in inputs_of(self.base)], self.evaluation.labels)
        self.metric, self.warnings = metrics.choose(self.fp32_outputs, info, self.forced_metric)
        self.warnings.extend(_metric_warnings(self.metric, self.fp32_outputs))
        self.fp32_quality = self._score(self.fp32_outputs)
        self.feed = measure.first_sample(self.evaluation)

    def _score(self, outputs: metrics.Outputs) -> float:
        samples = len(next(iter(outputs.values())))
        data = {k: v[:samples] for k, v in self.evaluation.extras.items()}
        return metrics.score(self.metric, self.fp32_outputs, outputs, data)

    @property
    def elapsed_s(self) -> float:
        return time.monotonic() - self.started

    def out_of_time(self) -> bool:
        return self.elapsed_s > self.time_limit_s

    def evaluate(self, label: str, passes: tuple[Pass, ...], fallback: bool = False) -> Result | None:
        """Apply the passes to the base model and measure the result against the budgets.

        None when the time limit has run out (float fallbacks are measured all the same)."""
        if self.out_of_time() and not fallback:
            self.skipped += 1
            return None
        self.progress(f"candidate {len(self.results) + 1}: {label}")
        result = Result(label, passes)
        self.results.append(result)
        try:
            model = self.base
            for p in passes:
                model = p.apply(model, self.ctx)
            model = compat.fit_to_runtime(model, self.ctx.profile)
            data = model.SerializeToString(deterministic=True)
            sess = measure.session(data, self.ctx.profile.runtime.threads)
            outputs = dict(zip(self.names, measure.run_dataset(sess, self.evaluation)))
            result.quality = self._score(outputs)
            measure.session(data, quiet=True, plain=True).run(None, self.feed)
            result.latency_ms, result.latency_ratio = self._latency(sess)
        except metrics.MetricError:
            raise  # the user's metric failed: that ends the build, not the candidate
        except PassError as exc:
            result.error = str(exc)
            return result
        except Exception as exc:  # a candidate onnxruntime cannot load or run is dropped, not fatal
            result.error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            return result
        result.model = model
        result.size_bytes = len(data)
        result.download_bytes = len(zlib.compress(data, 9))
        result.drop = self.fp32_quality - result.quality
        budget = self.ctx.profile.budget
        if result.drop > self.max_drop + 1e-12:
            result.misses.append(f"drop {result.drop:.4f} > {self.max_drop}")
        if result.download_bytes > budget.max_bundle_bytes:
            result.misses.append(f"{result.download_bytes} B > budget {budget.max_bundle_bytes} B")
        if result.latency_ms > budget.max_latency_ms:
            result.misses.append(f"{result.latency_ms:.2f} ms > budget {budget.max_latency_ms} ms")
        return result

    def _latency(self, sess: Any) -> tuple[float, float]:
        """Batch-1 latency and its ratio to fp32, measured in alternation; again for longer near a threshold."""
        fp32_ms, ms = measure.paired_latency_ms([self.fp32_session, sess], self.feed, CANDIDATE_TIMING_S)
        ratio = ms / fp32_ms if fp32_ms else 1.0
        budget = self.ctx.profile.budget.max_latency_ms
        if CLEARLY_SLOWER / NEAR < ratio < CLEARLY_SLOWER * NEAR or budget / NEAR < ms < budget * NEAR:
            fp32_again, again = measure.paired_latency_ms([self.fp32_session, sess], self.feed, 3 * CANDIDATE_TIMING_S)
            ms, ratio = (ms + again) / 2, (ratio + (again / fp32_again if fp32_again else 1.0)) / 2
        return ms, ratio

    def best(self) -> Result | None:
        fitting = [r for r in self.results if r.ok]
        if not fitting:
            return None
        bucket = max(1, int(self.base.ByteSize() * SIZE_BUCKET))
        order = {id(r): i for i, r in enumerate(self.results)}
        return min(fitting, key=lambda r: (r.clearly_slower, r.download_bytes // bucket, order[id(r)]))

    def closest(self) -> Result | None:
        """The candidate nearest to fitting, for the error message when none fits."""
        measured = [r for r in self.results if r.error is None]
        return min(measured, key=lambda r: (len(r.misses), r.drop, r.download_bytes), default=None)


def _metric_warnings(metric: metrics.Metric, fp32: metrics.Outputs) -> list[str]:
    if metric.name == "detection" and (found := metric.count(fp32)) < FEW_DETECTIONS:
        return [f"the fp32 model finds only {found} objects in the eval data, too few to judge detection "
                "quality by; give eval data with more objects in it"]
    return []


def precision_of(result: Result) -> str:
    """What the candidate ships as: int8 (or int4 weights), fp16, or fp32."""
    variant = getattr(result.passes[0], "variant", None) if result.passes else None  # LiteRT conversions
    if variant is not None:
        return "int8" if variant.startswith(("int8", "dynamic")) else variant
    kinds = {type(p) for p in result.passes}
    if kinds & {StaticQuantize, DynamicQuantize, WeightOnlyQuantize, IncTune} or result.label.startswith("as shipped"):
        return "int8"
    if Int4MatMul in kinds:
        return "int4"
    return "fp16" if Float16 in kinds else "fp32"


def _static_rounds(search: Search, weight_ops: tuple[str, ...]) -> None:
    q = search.ctx.profile.quantization
    # All ops first: fewer float<->int8 transitions run faster where it keeps accuracy (CNNs);
    # weight ops only is the fallback for graphs whose element-wise math does not survive int8.
    for label, p in (
        ("int8 static minmax, all ops", StaticQuantize("minmax", q.per_channel, (), (), q.reduce_range)),
        ("int8 static minmax, weight ops", StaticQuantize("minmax", q.per_channel, weight_ops, (), q.reduce_range)),
    ):
        search.evaluate(label, (p,))
    static = [r for r in search.results if r.error is None and isinstance(r.passes[-1], StaticQuantize)]
    if not static:
        return
    best = min(static, key=lambda r: r.drop)
    for variants in (_reduced_range, _float_layers, _other_calibration):
        # these rounds win back accuracy: they cannot help a candidate that misses only on size or time
        if best.drop <= search.max_drop or search.out_of_time():
            return
        for label, p in variants(search, best):
            result = search.evaluate(label, (p,))
            if result is None:
                return
            if result.error is None and result.drop < best.drop:
                best = result
            if result.ok:
                break


def _reduced_range(search: Search, best: Result) -> list[tuple[str, StaticQuantize]]:
    p: StaticQuantize = best.passes[-1]
    return [] if p.reduce_range else [(f"{best.label}, 7-bit weights", replace(p, reduce_range=True))]


def _float_layers(search: Search, best: Result) -> list[tuple[str, StaticQuantize]]:
    """Keep in float: the head, the front end, both, then both plus the layers whose error grows most."""
    head, front = head_and_front(search.base)
    groups = [("head", head), ("front end", front), ("head and front end", head + front)]
    search.progress("measuring per-layer sensitivity")
    try:
        ranked = sensitive_nodes(search.base, best.model, search.ctx.calib or search.evaluation)
    except Exception as exc:  # exposing inner tensors can break a graph onnxruntime otherwise runs
        log.info("sensitivity analysis failed (%s); only the head and front end are kept in float", exc)
        ranked = []
    kept = set(head + front)
    ranked = [name for name in ranked if name not in kept]
    groups += [(f"head, front end and {n} layers", head + front + ranked[:n]) for n in EXCLUDE_COUNTS if n <= len(ranked)]
    p: StaticQuantize = best.passes[-1]
    seen: set[tuple[str, ...]] = set()
    variants = []
    for what, names in groups:
        names = tuple(dict.fromkeys(names))
        if names and names not in seen:
            seen.add(names)
            variants.append((f"{best.label}, {what} float", replace(p, exclude=names)))
    return variants


def _other_calibration(search: Search, best: Result) -> list[tuple[str, StaticQuantize]]:
    p: StaticQuantize = best.passes[-1]
    methods = [m for m in search.ctx.profile.quantization.calibration if m != p.method]
    return [(best.label.replace(p.method, m), replace(p, method=m)) for m in methods]


def _dynamic_round(search: Search, ops: dict[str, int]) -> None:
    # Dynamic quantization suits MatMul graphs (transformers, recurrent heads, MLPs); ConvInteger is
    # often slow, which the latency veto catches, but on some models it is the only accurate int8 option.
    if any(op in ops for op in SEQUENCE_OPS):
        search.evaluate("int8 dynamic, per-channel, MatMul/Gemm only", (DynamicQuantize(True, ("MatMul", "Gemm")),))
    if any(op in ops for op in DYNAMIC_OPS):
        search.evaluate("int8 dynamic, per-channel", (DynamicQuantize(True, DYNAMIC_OPS),))
        search.evaluate("int8 dynamic, per-tensor", (DynamicQuantize(False, DYNAMIC_OPS),))


def _weight_only_round(search: Search, ops: dict[str, int]) -> None:
    if any(op in ops for op in WEIGHT_OPS):
        search.evaluate("int8 weights only, per-channel", (WeightOnlyQuantize(),))
    if "MatMul" in ops and version_tuple(search.ctx.profile.runtime.version)[:2] >= INT4_MIN_RUNTIME:
        search.evaluate("int4 MatMul weights, block 32", (Int4MatMul(),))


def _prune_round(search: Search) -> None:
    """Pruning in front of the winner, kept only where it shrinks what ships and fits the tolerance."""
    winner = search.best()
    if winner is None:
        return

    def tried(label: str, p: Pass, parent: Result) -> Result | None:
        result = search.evaluate(f"{label} + {parent.label}", (p, *parent.passes))
        if result is not None and result.error is None and result.download_bytes > parent.download_bytes * (1 - PRUNE_MIN_SAVING):
            saved = 1 - result.download_bytes / parent.download_bytes
            result.misses.append(f"pruning saves {saved:.1%} of the download, under {PRUNE_MIN_SAVING:.0%}")
        return result

    parent = winner
    for ratio in CHANNEL_RATIOS:
        result = tried(f"remove {ratio:.0%} channels", ChannelPrune(ratio), parent)
        if result is None or not result.ok:
            break
        winner = result
    for sparsity in SPARSITIES:
        result = tried(f"prune {sparsity:.0%}", MagnitudePrune(sparsity), winner)
        if result is None or not result.ok:
            break


def prequantized_ops(model: onnx.ModelProto) -> list[str]:
    return sorted(set(count_ops(model)) & QUANTIZED_OPS)


def run_search(search: Search) -> Search:
    """Try the candidates the profile's precision allows; results land in `search.results`."""
    profile = search.ctx.profile
    ops = count_ops(search.base)
    weight_ops = tuple(op for op in WEIGHT_OPS if op in ops)
    if quantized := prequantized_ops(search.base):
        search.notes.append(f"the model is already quantized ({', '.join(quantized)}): it is measured as shipped, "
                            "since quantizing it again is not possible; give the fp32 model for edgeops to quantize")
        search.evaluate("as shipped (already quantized)", (), fallback=True)
        return search
    if profile.precision == "int8":
        if search.ctx.calib is not None:
            _static_rounds(search, weight_ops)
        _dynamic_round(search, ops)
        _weight_only_round(search, ops)
    if profile.precision in ("int8", "fp16"):
        search.evaluate("fp16", (Float16(),), fallback=True)
    if search.best() is None or profile.precision == "fp32":
        search.evaluate("fp32, optimized" + (" (fallback)" if profile.precision != "fp32" else ""), (), fallback=True)
    _prune_round(search)
    if search.skipped:
        search.notes.append(f"the search stopped at its time limit of {search.time_limit_s:.0f} s (--search-time) "
                            f"with {search.skipped} candidate(s) not tried; the best so far was kept")
    return search


def run_inc(search: Search) -> Search:
    """`--engine inc`: Intel Neural Compressor's accuracy-aware tuning instead of the built-in rounds.

    INC tunes against the same eval data and tolerance (passes/inc_tune.py), scoring with the metrics
    its worker mirrors (accuracy, top-1; a flattened cosine as a proxy for any other task); its model is
    then one candidate here, measured again with edgeops' task metric, budgets and runtime check,
    because INC hands back its last trial when it runs out of trials, whether or not that one met the
    goal. If it does not fit, the fp32 model is kept, as run_search does, and the report says why.
    """
    from edgeops.compiler.passes.inc_tune import check_available, read_trials
    from edgeops.protocol.errors import EdgeopsError

    profile = search.ctx.profile
    if profile.precision != "int8":
        raise EdgeopsError(f"--engine inc tunes int8 quantization, but profile {profile.name} asks for "
                           f"{profile.precision}; use --engine edgeops for it")
    try:
        check_available()  # a missing INC is the user's set-up to fix, not a candidate that failed
    except PassError as exc:
        raise EdgeopsError(f"--engine inc: {exc}") from None
    search.ctx = replace(search.ctx, evaluation=search.evaluation)
    search.progress("tuning with Intel Neural Compressor")
    mirrored = search.metric.name if search.metric.name in ("accuracy", "top1") else "cosine"
    output = search.names.index(search.metric.output) if search.metric.output in search.names else 0
    result = search.evaluate("INC accuracy-aware tuning", (IncTune(mirrored, output, search.max_drop),), fallback=True)
    trials = read_trials(search.ctx) or {}

    def summary(cfg: dict[str, Any]) -> str:
        kind = "dynamic" if cfg.get("kind") == "DynamicQuantConfig" else f"static {str(cfg.get('quant_format', '')).lower()}"
        weights = "per-channel" if cfg.get("per_channel") else "per-tensor"
        return f"int8 {kind}, {weights}" + ("" if cfg.get("quant_last_matmul", True) else ", last MatMul float")

    for trial in trials.get("trials", []):
        log.info("INC trial %s: %s: %s %.4f", trial["trial"], summary(trial["config"]), mirrored, trial["quality"])
    accepted = trials.get("accepted")
    if result is not None and result.error is None and accepted:
        result.label = f"INC trial {accepted['trial']}/{len(trials['trials'])}: {summary(accepted['config'])}"
    if search.best() is None:
        search.evaluate("fp32, optimized (fallback)", (), fallback=True)
    return search

