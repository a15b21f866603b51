"""Note-onset F1 of a candidate basic-pitch-like transcriber against the fp32 model's own onsets.

What it measures: the onset head ([N, T, P] sigmoid activations, frames x pitches; basic-pitch:
[N, 172, 88] at 86 frames/s, piano keys) is peak-picked as basic-pitch's note creation does
(`scipy.signal.argrelmax` along time, i.e. strict local maxima, then >= 0.5, basic-pitch's default
onset threshold). Per sample and pitch, each candidate onset is matched to an unmatched fp32 onset of
the same pitch within +-2 frames (+-23 ms); true positives, false positives and misses are pooled over
the data set and the F1 is returned (1.0 when neither model finds an onset). Onsets are what notes
start from, so a candidate that loses or invents onsets loses or invents notes.

Which output: one whose name contains "onset"; else basic-pitch's ONNX name for it,
`StatefulPartitionedCall:2` (basic_pitch.inference.Model.predict maps :1 note, :2 onset, :0 contour);
else ONSET_OUTPUT if set; else the only output.

Use it with:

    edgeops build nmp.onnx --metric docs/metrics/note_onset_f1.py:onset_f1 ...

Only numpy is needed.
"""

from __future__ import annotations

import numpy as np

THRESHOLD = 0.5  # basic_pitch.inference.predict(onset_threshold=0.5)
TOLERANCE = 2  # frames either side (basic-pitch: 256 / 22050 s per frame)
ONSET_OUTPUT: str | None = None  # set to force an output name
BASIC_PITCH_ONSET = "StatefulPartitionedCall:2"


def _pick(outputs: dict[str, np.ndarray]) -> np.ndarray:
    names = list(outputs)
    if ONSET_OUTPUT is not None and ONSET_OUTPUT in outputs:
        name = ONSET_OUTPUT
    elif any("onset" in n.lower() for n in names):
        name = next(n for n in names if "onset" in n.lower())
    elif BASIC_PITCH_ONSET in outputs:
        name = BASIC_PITCH_ONSET
    elif len(names) == 1:
        name = names[0]
    else:
        raise KeyError(f"which output holds the onsets? {names}; set ONSET_OUTPUT")
    out = np.asarray(outputs[name])
    if out.ndim != 3:
        raise ValueError(f"expected onsets [N, T, P], got {name} {out.shape}")
    return out


def peaks(onsets: np.ndarray) -> np.ndarray:
    """Boolean [N, T, P]: strict local maxima along time (edges excluded, as argrelmax) >= THRESHOLD."""
    x = np.asarray(onsets, np.float64)
    out = np.zeros(x.shape, bool)
    mid = x[:, 1:-1]
    out[:, 1:-1] = (mid > x[:, :-2]) & (mid > x[:, 2:]) & (mid >= THRESHOLD)
    return out


def _match(ref_t: np.ndarray, cand_t: np.ndarray) -> int:
    """Matched pairs between two sorted frame lists of one pitch, each within TOLERANCE, greedy in time."""
    used = np.zeros(len(ref_t), bool)
    tp = 0
    for t in cand_t:
        near = np.where(~used & (np.abs(ref_t - t) <= TOLERANCE))[0]
        if len(near):
            used[near[np.argmin(np.abs(ref_t[near] - t))]] = True
            tp += 1
    return tp


def onset_f1(fp32: dict[str, np.ndarray], candidate: dict[str, np.ndarray], data: dict) -> float:
    """Pooled onset F1 of the candidate against fp32 (higher is better, 1.0 = same onsets)."""
    ref = peaks(_pick(fp32))
    cand = peaks(_pick(candidate))
    if ref.shape != cand.shape:
        raise ValueError(f"fp32 onsets {ref.shape} and candidate onsets {cand.shape} differ")
    n_ref, n_cand, tp = int(ref.sum()), int(cand.sum()), 0
    for i, p in zip(*np.nonzero(ref.any(axis=1) & cand.any(axis=1))):
        tp += _match(np.nonzero(ref[i, :, p])[0], np.nonzero(cand[i, :, p])[0])
    if n_ref + n_cand == 0:
        return 1.0
    return 2 * tp / (n_ref + n_cand)
