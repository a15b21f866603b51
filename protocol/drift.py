"""Drift statistics the device and the fleet agree on: features, bins, the window test. numpy and math only.

The agent (`edgeops.agent.drift`) tests each window with this code and the fleet (`edgeops.fleet.drift`)
tests merged windows with the same code, so equal counts always get equal answers. No scipy: importing
`scipy.stats` costs about 60 MB on a 512 MB device, so the chi-square tail is computed here.

The model (docs/drift.md):
- `features(samples, reduction)` turns each sample of an input or output into a few numbers, with the
  reductions the bundle's reference.json was built with (compiler/reference.py); classifier outputs
  become the predicted class and the top-class confidence.
- Each feature is counted in the bins of its reference edges: bin i holds edges[i-1] <= v < edges[i]
  (np.searchsorted side="right", as the reference was built); non-finite values are dropped, as the
  reference dropped them. Counts of a concatenated stream are the sums of its parts' counts, so
  windows and devices merge exactly.
- A feature drifts in a window when its two-sample G-test (reference counts against window counts,
  Williams-corrected) is significant at `alpha` after Holm's correction across all features of the
  model, AND its population stability index is at least `psi_floor`. A window alarms when any
  feature drifts.

Invariants:
- Holm controls the family-wise error across features under any dependence between them, so on
  stationary data a window alarms with probability at most `alpha` (as far as the chi-square
  approximation holds); the PSI floor only removes alarms: at fleet scale every tiny shift is
  significant, and only shifts of a size that matters should alarm.
- The test is two-sample: the reference is a sample too, so a small reference costs power, not
  false alarms.
- Adjacent bins are pooled from the reference counts and the window's size alone, never from the
  window's counts, until each pooled bin expects at least MIN_EXPECTED counts in both rows (where
  the chi-square approximation holds); PSI is measured on the same pooled bins.
- Nothing returns NaN: a feature with no window counts or a single pooled bin gets p = 1, PSI = 0.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import lzma
import math
import zipfile
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from edgeops.protocol.bundle import npz_bytes
from edgeops.protocol.errors import EdgeopsError
from edgeops.protocol.wire import MAX_TELEMETRY_PAYLOAD

REFERENCE_VERSIONS = (1,)  # reference.json versions this code reads
ALPHA = 0.01
PSI_FLOOR = 0.1
MIN_EXPECTED = 5.0
PSI_SMOOTHING = 0.5  # added to every pooled bin's count before taking proportions
MAX_SAMPLE_CHARS = MAX_TELEMETRY_PAYLOAD // 2  # base64 of one captured sample
MAX_SAMPLE_INFLATED = 16 * 1024 * 1024  # decoded arrays of one captured sample
_EPS = 1e-16
_TINY = 1e-300
_MAX_ITERATIONS = 100_000


def features(samples: np.ndarray, reduction: str) -> np.ndarray:
    """Per-sample features, shape (samples, features); the agent applies the same reductions."""
    flat = samples.reshape(len(samples), -1).astype(np.float64)
    if reduction == "elements":
        return flat
    if reduction == "channel_mean":
        return samples.reshape(len(samples), samples.shape[1], -1).astype(np.float64).mean(-1)
    return np.stack([flat.mean(1), flat.std(1)], axis=1)


def feature_key(side: str, name: str, feature: int | str) -> str:
    """The stable name of one feature in records and reports, e.g. `input/x/3`, `output/probs/class`."""
    return f"{side}/{name}/{feature}"


def reference_counts(reference: Mapping[str, Any]) -> dict[str, list[int]]:
    """The reference's counts per feature key, in a fixed order (inputs, then outputs, as in the file)."""
    counts: dict[str, list[int]] = {}
    for side, entries in (("input", reference["inputs"]), ("output", reference["outputs"])):
        for entry in entries:
            if entry["reduction"] == "classifier":
                counts[feature_key(side, entry["name"], "class")] = list(entry["classes"])
                counts[feature_key(side, entry["name"], "confidence")] = list(entry["confidence"]["counts"])
            else:
                for index, summary in enumerate(entry["features"]):
                    counts[feature_key(side, entry["name"], index)] = list(summary["counts"])
    return counts


def reference_digest(reference: Mapping[str, Any]) -> str:
    """Names the baseline that counts are binned on: windows merge only when their digests are equal."""
    return hashlib.sha256(json.dumps(reference, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def padded(rows: Sequence[Sequence[float]], fill: float) -> np.ndarray:
    """Rows of different lengths as one (F, width) array, the short rows filled with `fill`: +inf for
    edges (no finite value reaches the extra bins), 0 for counts (an empty bin changes nothing)."""
    width = max((len(r) for r in rows), default=0)
    out = np.full((len(rows), width), fill, dtype=np.float64)
    for target, values in zip(out, rows):
        target[: len(values)] = values
    return out


def bin_index(edges: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Bin of every value on its feature's edges, shape (n, F): the number of edges <= the value, which
    is np.searchsorted(edges[f], value, side="right"); -1 for non-finite values. `edges` is (F, E)
    from `padded(..., inf)`, `values` is (n, F). One vectorized pass over the batch, no per-feature loop."""
    index = (values[:, :, None] >= edges[None]).sum(-1)
    return np.where(np.isfinite(values), index, -1)


def pooled_bins(reference: np.ndarray, window_totals: np.ndarray) -> np.ndarray:
    """Pool index of every bin, shape (F, K): per feature, adjacent bins are joined left to right until
    the pool holds at least MIN_EXPECTED reference counts and expects MIN_EXPECTED window counts
    (window total * the pool's reference share); a short tail joins the last pool. Depends on the
    reference and the window's size only, never on the window's counts."""
    totals = np.asarray(window_totals, dtype=np.float64)
    with np.errstate(divide="ignore"):
        need = np.where(totals > 0, MIN_EXPECTED * np.maximum(1.0, reference.sum(1) / totals), np.inf)
    pools = np.zeros(reference.shape, dtype=np.int64)
    pool = np.zeros(len(reference), dtype=np.int64)
    held = np.zeros(len(reference))
    for column in range(reference.shape[1]):
        pools[:, column] = pool
        held += reference[:, column]
        full = held >= need
        pool += full
        held[full] = 0.0
    pools[(pools == pool[:, None]) & (pool[:, None] > 0)] -= 1  # the unfilled tail joins the last pool
    return pools


def pooled_counts(counts: np.ndarray, pools: np.ndarray) -> np.ndarray:
    """Counts summed per pool, shape (F, K): pool j of feature f in column j, unused columns zero."""
    width = counts.shape[1]
    flat = (pools + np.arange(len(counts))[:, None] * width).ravel()
    return np.bincount(flat, weights=counts.ravel(), minlength=counts.size).reshape(counts.shape)


def g_test(reference: np.ndarray, window: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per feature f: the G statistic (Williams-corrected) and degrees of freedom of the 2 x K table
    [reference[f]; window[f]] (both arguments are (F, K) counts; results are (F,)). Bins empty in
    both rows carry no information and are dropped; a table with an empty row or fewer than two bins
    left gets (0, 0). Williams' correction divides G by
    q = 1 + (N sum 1/rows - 1)(N sum 1/columns - 1) / (6 N dof); it brings the plain G's measured
    1.2 % false rejections at a nominal 1 % (windows of real data) back to 1.0-1.1 %."""
    columns = reference + window
    used = columns > 0
    rows = np.stack([reference.sum(1), window.sum(1)])
    total = rows.sum(0)
    dof = np.where(rows.all(0), used.sum(1) - 1, 0).clip(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        g = np.zeros(len(reference))
        for observed, row in zip((reference, window), rows):
            expected = row[:, None] * columns / total[:, None]
            g += 2.0 * np.where(observed > 0, observed * np.log(observed / expected), 0.0).sum(1)
        inverse_columns = np.where(used, 1.0 / columns, 0.0).sum(1)
        q = 1.0 + (total * (1.0 / rows).sum(0) - 1.0) * (total * inverse_columns - 1.0) / (6.0 * total * dof)
        g = np.where(dof > 0, np.maximum(g, 0.0) / q, 0.0)
    return g, dof


def chi2_sf(x: float, dof: float) -> float:
    """P(X >= x) for X ~ chi-square(dof): the regularized upper incomplete gamma Q(dof/2, x/2)."""
    if dof <= 0:
        raise ValueError(f"chi-square needs dof > 0, got {dof}")
    if x <= 0:
        return 1.0
    a, y = dof / 2.0, x / 2.0
    if y < a + 1.0:
        return 1.0 - _lower_series(a, y)
    return _upper_fraction(a, y)


def _prefactor(a: float, y: float) -> float:
    return math.exp(-y + a * math.log(y) - math.lgamma(a))


def _lower_series(a: float, y: float) -> float:
    """P(a, y) by its series (Numerical Recipes gser), which converges fast for y < a + 1."""
    term = total = 1.0 / a
    denominator = a
    for _ in range(_MAX_ITERATIONS):
        denominator += 1.0
        term *= y / denominator
        total += term
        if abs(term) < abs(total) * _EPS:
            break
    return total * _prefactor(a, y)


def _upper_fraction(a: float, y: float) -> float:
    """Q(a, y) by its continued fraction (Numerical Recipes gcf, modified Lentz), for y >= a + 1."""
    b = y + 1.0 - a
    c = 1.0 / _TINY
    d = 1.0 / b
    h = d
    for i in range(1, _MAX_ITERATIONS):
        an = -i * (i - a)
        b += 2.0
        d = an * d + b
        d = _TINY if abs(d) < _TINY else d
        c = b + an / c
        c = _TINY if abs(c) < _TINY else c
        d = 1.0 / d
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < _EPS:
            break
    return _prefactor(a, y) * h


def holm(pvalues: Sequence[float]) -> np.ndarray:
    """Holm's step-down adjusted p-values, in the input's order: reject where adjusted <= alpha."""
    p = np.asarray(pvalues, dtype=np.float64)
    order = np.argsort(p, kind="stable")
    steps = (len(p) - np.arange(len(p))) * p[order]
    adjusted = np.empty_like(p)
    adjusted[order] = np.minimum(1.0, np.maximum.accumulate(steps))
    return adjusted


def psi(reference: np.ndarray, window: np.ndarray) -> np.ndarray:
    """Per feature: the population stability index sum((w - r) * ln(w / r)) over the bins either row
    uses (rows of (F, K) counts), proportions smoothed by PSI_SMOOTHING counts per bin so an empty bin
    gives a large but finite term; 0 when either row is empty."""
    used = (reference + window) > 0
    smoothing = PSI_SMOOTHING * used.sum(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(used, reference + PSI_SMOOTHING, 1.0) / (reference.sum(1) + smoothing)[:, None]
        w = np.where(used, window + PSI_SMOOTHING, 1.0) / (window.sum(1) + smoothing)[:, None]
        terms = np.where(used, (w - r) * np.log(w / r), 0.0).sum(1)
    return np.where((reference.sum(1) > 0) & (window.sum(1) > 0), terms, 0.0)


def window_test(reference: Mapping[str, Sequence[int]], window: Mapping[str, Sequence[int]],
                alpha: float = ALPHA, psi_floor: float = PSI_FLOOR) -> dict[str, Any]:
    """Test every feature of `reference` (key -> reference counts) against `window` (key -> counts on
    the same bins): {"p", "p_adj", "psi": {key: float}, "drifted": [key], "alarm": bool}."""
    keys = list(reference)
    for key in keys:
        if len(window.get(key, ())) != len(reference[key]):
            raise EdgeopsError(f"drift feature {key} has {len(window.get(key, ()))} window bins "
                               f"but {len(reference[key])} reference bins")
    ref, win = padded([reference[k] for k in keys], 0.0), padded([window[k] for k in keys], 0.0)
    pools = pooled_bins(ref, win.sum(1))
    ref, win = pooled_counts(ref, pools), pooled_counts(win, pools)
    g, dof = g_test(ref, win)
    p = [chi2_sf(float(x), int(d)) if d else 1.0 for x, d in zip(g, dof)]
    stability = psi(ref, win).tolist()
    adjusted = holm(p).tolist()
    drifted = [k for k, a, s in zip(keys, adjusted, stability) if a <= alpha and s >= psi_floor]
    return {"p": dict(zip(keys, p)), "p_adj": dict(zip(keys, adjusted)), "psi": dict(zip(keys, stability)),
            "drifted": drifted, "alarm": bool(drifted)}


def encode_sample(sample: Mapping[str, np.ndarray]) -> str:
    """One captured sample (input name -> array) as base64 of a deterministic .npz, so equal samples
    encode equally. Refuses samples too large to send as one telemetry record."""
    text = base64.b64encode(npz_bytes(dict(sample))).decode("ascii")
    if len(text) > MAX_SAMPLE_CHARS:
        raise EdgeopsError(f"a captured sample encodes to {len(text)} bytes, more than the {MAX_SAMPLE_CHARS} "
                           "a telemetry record may carry: turn sample capture off for this model")
    return text


def decode_sample(body: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The arrays of a sample record body ({"npz": base64}); EdgeopsError for anything else, including
    pickled objects and archives that would inflate past MAX_SAMPLE_INFLATED."""
    try:
        data = base64.b64decode(body["npz"], validate=True)
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            if sum(info.file_size for info in archive.infolist()) > MAX_SAMPLE_INFLATED:
                raise ValueError(f"inflates past {MAX_SAMPLE_INFLATED} bytes")
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            return {name: npz[name] for name in npz.files}
    except (KeyError, TypeError, ValueError, binascii.Error, zipfile.BadZipFile, OSError, EOFError,
            zlib.error, lzma.LZMAError, NotImplementedError, RuntimeError) as exc:  # corrupt or odd zip members
        raise EdgeopsError(f"sample record is not a base64 .npz of plain arrays ({exc})") from None
