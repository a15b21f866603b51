"""Accuracy-aware search: try candidate pass pipelines, measure each, keep the best that fits.

Every candidate is measured on the task metric, never assumed: on real models static QDQ over all
op types has collapsed accuracy to chance, dynamic quantization of CNNs ran 4-9x slower than fp32,
and which one wins depends on the model. The search runs in rounds, each building on the best so far:

1. base configurations the profile allows (static on all ops / on weight ops only, dynamic);
2. if the best static one misses the tolerance: keep its most sensitive layers in float;
3. other calibration methods for the best static configuration;
4. structured pruning (whole channels) in front of the winner, then magnitude pruning, each at the
   highest ratio that still fits the tolerance.

Selection: within the tolerance and the profile's budgets, prefer candidates not clearly slower
than fp32, then the smallest download (in 2 % steps), then the one tried first. Latency only vetoes:
finer timing differences are noise here, and must not decide the bundle's bytes.
"""

from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import numpy as np
import onnx

from edgeops.compiler import compat, measure, quality
from edgeops.compiler.data import Dataset
from edgeops.compiler.model import WEIGHT_OPS, count_ops, outputs_of
from edgeops.compiler.passes import Pass, PassContext, PassError, describe
from edgeops.compiler.passes.float16 import Float16
from edgeops.compiler.passes.inc_tune import IncTune
from edgeops.compiler.passes.prune_channels import ChannelPrune
from edgeops.compiler.passes.prune_magnitude import MagnitudePrune
from edgeops.compiler.passes.quantize_dynamic import DynamicQuantize
from edgeops.compiler.passes.quantize_static import StaticQuantize
from edgeops.compiler.sensitivity import sensitive_nodes

log = logging.getLogger(__name__)
SPARSITIES = (0.7, 0.5, 0.3)
CHANNEL_RATIOS = (0.5, 0.25)
# Latency only vetoes a candidate when it is clearly slower than fp32 (ConvInteger runs 4-9x slower):
# finer differences are noise on a busy 2-core machine, and letting noise pick the winner would
# make the bundle's bytes depend on the machine's load rather than on the inputs.
CLEARLY_SLOWER = 1.5
LATENCY_FLOOR_MS = 0.05
# Downloads within 2 % of the fp32 size count as equal; then the earlier candidate wins, since
# candidates are tried in order of preference (static before dynamic, fewer float layers first).
SIZE_BUCKET = 0.02
CANDIDATE_TIMING_S = 0.6
EXCLUDE_COUNTS = (1, 2, 4)
DYNAMIC_OPS = ("Conv", "MatMul", "Gemm", "Gather", "LSTM", "Attention")


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
    forced_metric: str | None = None
    progress: Callable[[str], None] = lambda message: None
    metric: quality.Metric = quality.Metric("cosine", 0)
    fp32_outputs: list[np.ndarray] = field(default_factory=list)
    fp32_quality: float = 1.0
    results: list[Result] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.fp32_session = measure.session(self.base.SerializeToString(), self.ctx.profile.runtime.threads)
        self.fp32_outputs = measure.run_dataset(self.fp32_session, self.evaluation)
        labelled = self.evaluation.labels is not None
        self.metric = quality.choose_metric(self.base, outputs_of(self.base), self.fp32_outputs, labelled, self.forced_metric)
        self.fp32_quality = self._score(self.fp32_outputs)
        self.feed = measure.first_sample(self.evaluation)

    def _score(self, outputs: list[np.ndarray]) -> float:
        return quality.score(self.metric, self.fp32_outputs, outputs, self.evaluation.labels)

    def evaluate(self, label: str, passes: tuple[Pass, ...]) -> Result:
        """Apply the passes to the base model and measure the result against the budgets."""
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
            outputs = measure.run_dataset(sess, self.evaluation)
            measure.session(data, quiet=True, plain=True).run(None, self.feed)
            fp32_ms, result.latency_ms = measure.paired_latency_ms([self.fp32_session, sess], self.feed, CANDIDATE_TIMING_S)
            result.latency_ratio = result.latency_ms / fp32_ms if fp32_ms else 1.0
        except PassError as exc:
            result.error = str(exc)
            return result
        except Exception as exc:  # a candidate onnxruntime cannot load or run is dropped, not fatal
            result.error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            return result
        result.model = model
        result.size_bytes = len(data)
        result.download_bytes = len(zlib.compress(data, 9))
        result.quality = self._score(outputs)
        result.drop = self.fp32_quality - result.quality
        budget = self.ctx.profile.budget
        if result.drop > self.max_drop + 1e-12:
            result.misses.append(f"drop {result.drop:.4f} > {self.max_drop}")
        if result.download_bytes > budget.max_bundle_bytes:
            result.misses.append(f"{result.download_bytes} B > budget {budget.max_bundle_bytes} B")
        if result.latency_ms > budget.max_latency_ms:
            result.misses.append(f"{result.latency_ms:.2f} ms > budget {budget.max_latency_ms} ms")
        return result

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
        if best.ok:
            return
        for label, p in variants(search, best):
            result = search.evaluate(label, (p,))
            if result.error is None and result.drop < best.drop:
                best = result
            if result.ok:
                break


def _reduced_range(search: Search, best: Result) -> list[tuple[str, StaticQuantize]]:
    p: StaticQuantize = best.passes[-1]
    return [] if p.reduce_range else [(f"{best.label}, 7-bit weights", replace(p, reduce_range=True))]


def _float_layers(search: Search, best: Result) -> list[tuple[str, StaticQuantize]]:
    """Keep the 1, 2, then 4 most sensitive weight layers in float."""
    search.progress("measuring per-layer sensitivity")
    try:
        ranked = sensitive_nodes(search.base, best.model, search.ctx.calib or search.evaluation)
    except Exception as exc:  # exposing inner tensors can break a graph onnxruntime otherwise runs
        log.info("sensitivity analysis failed (%s); no layers kept in float", exc)
        return []
    p: StaticQuantize = best.passes[-1]
    return [(f"{best.label}, {n} layer(s) float", replace(p, exclude=tuple(ranked[:n]))) for n in EXCLUDE_COUNTS if n <= len(ranked)]


def _other_calibration(search: Search, best: Result) -> list[tuple[str, StaticQuantize]]:
    p: StaticQuantize = best.passes[-1]
    methods = [m for m in search.ctx.profile.quantization.calibration if m != p.method]
    return [(best.label.replace(p.method, m), replace(p, method=m)) for m in methods]


def _prune_round(search: Search) -> None:
    winner = search.best()
    if winner is None:
        return
    for ratio in CHANNEL_RATIOS:
        result = search.evaluate(f"remove {ratio:.0%} channels + {winner.label}", (ChannelPrune(ratio), *winner.passes))
        if result.ok:
            winner = result
            break
        if result.error:
            break
    for sparsity in SPARSITIES:
        result = search.evaluate(f"prune {sparsity:.0%} + {winner.label}", (MagnitudePrune(sparsity), *winner.passes))
        if result.ok:
            break


def run_search(search: Search) -> Search:
    """Try the candidates the profile's precision allows; results land in `search.results`."""
    profile = search.ctx.profile
    ops = count_ops(search.base)
    weight_ops = tuple(op for op in WEIGHT_OPS if op in ops)
    if profile.precision == "fp32":
        search.evaluate("fp32, optimized", ())
    elif profile.precision == "fp16":
        search.evaluate("fp16", (Float16(),))
    else:
        if search.ctx.calib is not None:
            _static_rounds(search, weight_ops)
        # Dynamic quantization suits MatMul graphs (transformers, MLPs); ConvInteger is often slow,
        # which the latency veto catches, but on some models it is the only accurate int8 option.
        if any(op in ops for op in DYNAMIC_OPS):
            search.evaluate("int8 dynamic, per-channel", (DynamicQuantize(True, DYNAMIC_OPS),))
            search.evaluate("int8 dynamic, per-tensor", (DynamicQuantize(False, DYNAMIC_OPS),))
    if search.best() is None and profile.precision != "fp32":
        search.evaluate("fp32, optimized (fallback)", ())
    _prune_round(search)
    return search


def reduces_precision(result: Result) -> bool:
    """Whether the candidate is int8 or fp16, rather than the fp32 fallback."""
    return any(isinstance(p, (StaticQuantize, DynamicQuantize, Float16, IncTune)) for p in result.passes)


def run_inc(search: Search) -> Search:
    """`--engine inc`: Intel Neural Compressor's accuracy-aware tuning instead of the built-in rounds.

    INC tunes against the same eval data, metric and tolerance (passes/inc_tune.py); its model is then
    one candidate here, measured again with edgeops' metric, budgets and runtime check, because INC
    hands back its last trial when it runs out of trials, whether or not that one met the goal. If it
    does not fit, the fp32 model is kept, as run_search does, and the report says why.
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
    result = search.evaluate("INC accuracy-aware tuning", (IncTune(search.metric.name, search.metric.output, search.max_drop),))
    trials = read_trials(search.ctx) or {}

    def summary(cfg: dict[str, Any]) -> str:
        kind = "dynamic" if cfg.get("kind") == "DynamicQuantConfig" else f"static {str(cfg.get('quant_format', '')).lower()}"
        weights = "per-channel" if cfg.get("per_channel") else "per-tensor"
        return f"int8 {kind}, {weights}" + ("" if cfg.get("quant_last_matmul", True) else ", last MatMul float")

    for trial in trials.get("trials", []):
        log.info("INC trial %s: %s: %s %.4f", trial["trial"], summary(trial["config"]), search.metric.name, trial["quality"])
    accepted = trials.get("accepted")
    if result.error is None and accepted:
        result.label = f"INC trial {accepted['trial']}/{len(trials['trials'])}: {summary(accepted['config'])}"
    if search.best() is None:
        search.evaluate("fp32, optimized (fallback)", ())
    return search
