"""Drift benchmark: edgeops vs alibi-detect vs Evidently on the same real-data streams.

    python bench/drift_bench.py [--splits 20] [--windows 10] [--shifts 3] [--max-windows 6]
                                [--evidently-splits 6] [--tools edgeops,alibi-ks,alibi-chi2,evidently] [--json out.json]

Data: scikit-learn's bundled digits (64 pixel features, integer intensities 0-16; windows of 200)
and breast cancer (30 continuous features; windows of 100). For each of `--splits` random halvings
into reference and stream data, every tool is fitted on the same reference half and sees the same
windows, drawn without replacement from the stream half (each window is then, marginally, a fresh
sample the reference never saw):

- **stationary**: `--windows` windows per split; false-alarm rate = alarmed windows / windows;
- **shifted**: `--shifts` streams per split, each shifting ONE feature (random, among features with
  a reference spread above 1) by +0.5 standard deviation of the reference (digits: rounded to whole
  intensity levels, at least 1, clipped at 16, so values stay categorical for ChiSquareDrift); detection delay =
  windows until the first alarm, and until the fleet's persistence rule (2 of the last 3 windows
  alarmed) fires; a stream ends after `--max-windows` windows ("missed").

Tools, each at its per-window decision:
- **edgeops**: `DriftMonitor` at its defaults (G-test on reference bins, Holm across features at
  alpha 0.01, PSI floor 0.1), on a reference built by the compiler's `reference_summaries`; and the
  same without the PSI floor, to show what the floor costs and buys (its ms/window covers both);
- **alibi-ks**: `alibi_detect.cd.KSDrift`, feature-wise KS with Bonferroni, p_val 0.01 (edgeops' alpha);
- **alibi-chi2**: `alibi_detect.cd.ChiSquareDrift`, p_val 0.01, Bonferroni (digits only: it needs
  categorical features);
- **evidently**: `DriftedColumnsCount` at its defaults (per-column tests at 0.05, no correction), read
  two ways: any column drifted, and its dataset drift (>= 50 % of columns drifted). Evidently takes
  about a second per window, so it runs on the first `--evidently-splits` splits only.

State: the bytes a detector keeps per model (edgeops: its count arrays; the others: the reference data).
A tool that does not install or import is skipped with a note (alibi-detect pins numpy < 2: run this
from a separate venv, see bench/README.md).
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
from sklearn.datasets import load_breast_cancer, load_digits

from edgeops.agent.drift import DriftMonitor
from edgeops.compiler.data import Dataset
from edgeops.compiler.reference import reference_summaries
from edgeops.fleet.drift import PERSISTENT, RECENT
from edgeops.protocol.drift import reference_counts

SHIFT_SIGMA = 0.5
DATASETS = {  # name -> (loader, window size, integer features)
    "digits": (load_digits, 200, True),
    "breast-cancer": (load_breast_cancer, 100, False),
}


@dataclass
class Split:
    reference: np.ndarray
    stationary: list[np.ndarray]
    shifted: list[list[np.ndarray]]


def splits(name: str, count: int, windows: int, shifts: int, max_windows: int, seed: int) -> Iterator[Split]:
    loader, size, integer = DATASETS[name]
    x = loader().data.astype(np.float32)
    rng = np.random.default_rng(seed)
    for _ in range(count):
        order = rng.permutation(len(x))
        reference, pool = x[order[: len(x) // 2]], x[order[len(x) // 2:]]
        spread = reference.std(0)
        stationary = [pool[rng.choice(len(pool), size, replace=False)] for _ in range(windows)]
        shifted = []
        for feature in rng.choice(np.flatnonzero(spread > 1), shifts, replace=False):
            step = max(1.0, np.round(SHIFT_SIGMA * spread[feature])) if integer else SHIFT_SIGMA * spread[feature]
            stream = []
            for _ in range(max_windows):
                window = pool[rng.choice(len(pool), size, replace=False)].copy()
                window[:, feature] = np.minimum(16, window[:, feature] + step) if integer else window[:, feature] + step
                stream.append(window)
            shifted.append(stream)
        yield Split(reference, stationary, shifted)


# ---- detectors: fit on a reference, then flags per window (name -> alarmed)


class Edgeops:
    names = ("edgeops", "edgeops (no PSI floor)")

    def __init__(self, reference: np.ndarray):
        self.summaries = reference_summaries(Dataset({"x": reference}, None, None, frozenset(), "bench"), [], [], None)
        bins = sum(len(c) for c in reference_counts(self.summaries).values())
        self.state_bytes = 2 * 8 * bins  # int64 window counts + reference counts
        self.monitors: dict[str, DriftMonitor] = {}

    def flags(self, window: np.ndarray) -> dict[str, bool]:
        if not self.monitors:
            self.monitors = {name: DriftMonitor(self.summaries, window=len(window), psi_floor=floor)
                             for name, floor in zip(self.names, (0.1, 0.0))}
        return {name: monitor.observe({"x": window}, {})[0]["alarm"] for name, monitor in self.monitors.items()}


class AlibiKS:
    names = ("alibi KSDrift",)

    def __init__(self, reference: np.ndarray):
        from alibi_detect.cd import KSDrift

        self.detector = KSDrift(reference, p_val=0.01)
        self.state_bytes = reference.nbytes

    def flags(self, window: np.ndarray) -> dict[str, bool]:
        return {self.names[0]: bool(self.detector.predict(window)["data"]["is_drift"])}


class AlibiChi2(AlibiKS):
    names = ("alibi ChiSquareDrift",)

    def __init__(self, reference: np.ndarray):
        from alibi_detect.cd import ChiSquareDrift

        self.detector = ChiSquareDrift(reference.astype(np.int64), p_val=0.01)
        self.state_bytes = reference.astype(np.int64).nbytes

    def flags(self, window: np.ndarray) -> dict[str, bool]:
        return super().flags(window.astype(np.int64))


class Evidently:
    names = ("evidently (any column)", "evidently (dataset drift)")

    def __init__(self, reference: np.ndarray):
        import pandas as pd
        from evidently import Report
        from evidently.metrics import DriftedColumnsCount

        self._frame = lambda x: pd.DataFrame(x, columns=[f"f{i}" for i in range(x.shape[1])])
        self._report = lambda: Report([DriftedColumnsCount()])
        self.reference = self._frame(reference)
        self.state_bytes = int(self.reference.memory_usage(index=False).sum())

    def flags(self, window: np.ndarray) -> dict[str, bool]:
        value = self._report().run(self._frame(window), self.reference).dict()["metrics"][0]["value"]
        return {self.names[0]: value["count"] >= 1, self.names[1]: value["share"] >= 0.5}


TOOLS: dict[str, tuple[type, Callable[[str], bool]]] = {  # tool -> (detector, runs on dataset?)
    "edgeops": (Edgeops, lambda dataset: True),
    "alibi-ks": (AlibiKS, lambda dataset: True),
    "alibi-chi2": (AlibiChi2, lambda dataset: DATASETS[dataset][2]),
    "evidently": (Evidently, lambda dataset: True),
}


# ---- measurement


@dataclass
class Tally:
    windows: int = 0
    alarms: int = 0
    persistent_flags: int = 0
    delays: list[int | None] = field(default_factory=list)
    flag_delays: list[int | None] = field(default_factory=list)
    seconds: float = 0.0
    calls: int = 0
    state_bytes: int = 0


def _persistent(history: list[bool]) -> bool:
    return sum(history[-RECENT:]) >= PERSISTENT


def run_tool(detector_type: type, data: list[Split]) -> dict[str, Tally]:
    tallies = {name: Tally() for name in detector_type.names}
    for split in data:
        detector = detector_type(split.reference)
        for tally in tallies.values():
            tally.state_bytes = detector.state_bytes

        def flags(window: np.ndarray, detector=detector) -> dict[str, bool]:
            start = time.perf_counter()
            out = detector.flags(window)
            for tally in tallies.values():
                tally.seconds += time.perf_counter() - start
                tally.calls += 1
            return out

        histories: dict[str, list[bool]] = {name: [] for name in tallies}
        for window in split.stationary:
            for name, alarmed in flags(window).items():
                histories[name].append(alarmed)
                tallies[name].windows += 1
                tallies[name].alarms += alarmed
                tallies[name].persistent_flags += _persistent(histories[name])
        for stream in split.shifted:
            histories = {name: [] for name in tallies}
            first: dict[str, int | None] = dict.fromkeys(tallies)
            flagged: dict[str, int | None] = dict.fromkeys(tallies)
            for index, window in enumerate(stream, 1):
                for name, alarmed in flags(window).items():
                    histories[name].append(alarmed)
                    if alarmed and first[name] is None:
                        first[name] = index
                    if _persistent(histories[name]) and flagged[name] is None:
                        flagged[name] = index
                if all(v is not None for v in flagged.values()):
                    break
            for name in tallies:
                tallies[name].delays.append(first[name])
                tallies[name].flag_delays.append(flagged[name])
    return tallies


def _delay(values: list[int | None], cap: int) -> tuple[float, float, float]:
    """(mean delay counting misses as cap + 1, median, share caught)."""
    filled = np.array([cap + 1 if v is None else v for v in values], dtype=float)
    return float(filled.mean()), float(np.median(filled)), float(np.mean([v is not None for v in values]))


def summarize(tally: Tally, cap: int) -> dict[str, float]:
    mean, median, caught = _delay(tally.delays, cap)
    flag_mean, _, flag_caught = _delay(tally.flag_delays, cap)
    return {
        "stationary_windows": tally.windows,
        "false_alarm_rate": tally.alarms / tally.windows if tally.windows else float("nan"),
        "persistent_false_flags": tally.persistent_flags / tally.windows if tally.windows else float("nan"),
        "shift_streams": len(tally.delays),
        "delay_mean": mean, "delay_median": median, "caught": caught,
        "flag_delay_mean": flag_mean, "flag_caught": flag_caught,
        "ms_per_window": 1000 * tally.seconds / max(1, tally.calls),
        "state_bytes": tally.state_bytes,
    }


def print_table(dataset: str, rows: dict[str, dict[str, float]]) -> None:
    base = rows.get("edgeops")
    print(f"\n### {dataset}\n")
    print("| tool | false alarms (windows) | 2-of-3 false flags | delay mean (median) | caught | "
          "2-of-3 flag delay | ms/window | state bytes |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        ratio = "" if base is None or name == "edgeops" else f" ({r['delay_mean'] / base['delay_mean']:.1f}× edgeops)"
        print(f"| {name} | {r['false_alarm_rate']:.1%} of {r['stationary_windows']} | "
              f"{r['persistent_false_flags']:.1%} | {r['delay_mean']:.2f} ({r['delay_median']:.0f}){ratio} | "
              f"{r['caught']:.0%} of {r['shift_streams']} | {r['flag_delay_mean']:.2f} | {r['ms_per_window']:.1f} | "
              f"{r['state_bytes']:,} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--splits", type=int, default=20)
    parser.add_argument("--windows", type=int, default=10, help="stationary windows per split")
    parser.add_argument("--shifts", type=int, default=3, help="shifted streams per split")
    parser.add_argument("--max-windows", type=int, default=6, help="windows per shifted stream")
    parser.add_argument("--evidently-splits", type=int, default=6, help="splits Evidently runs on (slow)")
    parser.add_argument("--tools", default=",".join(TOOLS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the numbers here")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    results: dict[str, dict[str, dict[str, float]]] = {}
    for dataset in DATASETS:
        data = list(splits(dataset, args.splits, args.windows, args.shifts, args.max_windows, args.seed))
        rows: dict[str, dict[str, float]] = {}
        for tool in args.tools.split(","):
            detector_type, applies = TOOLS[tool]
            if not applies(dataset):
                print(f"note: {tool} skipped on {dataset} (needs categorical features)")
                continue
            try:
                tallies = run_tool(detector_type, data[: args.evidently_splits] if tool == "evidently" else data)
            except ImportError as exc:
                print(f"note: {tool} skipped: it does not import here ({exc})")
                continue
            rows.update({name: summarize(t, args.max_windows) for name, t in tallies.items()})
        print_table(dataset, rows)
        results[dataset] = rows
    print(f"\nshift: one feature +{SHIFT_SIGMA} sd; delay in windows after the shift starts, misses counted as "
          f"{args.max_windows + 1}; 2-of-3 = the fleet's persistence rule applied to each tool's alarms")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)


if __name__ == "__main__":
    main()
