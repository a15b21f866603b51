"""Drift detection on real data (scikit-learn's bundled digits and breast-cancer sets, no downloads):
the device's monitor against references built by the compiler's own code, the statistics against
scipy, and the fleet's merge, report, flags and export on a real SQLite file."""

from __future__ import annotations

import base64
import io
import json
import sqlite3
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import sqlite_utils
from scipy import stats
from sklearn.datasets import load_breast_cancer, load_digits
from sklearn.linear_model import LogisticRegression

from edgeops.agent.drift import DriftMonitor, sample_record
from edgeops.compiler import reference as compiler_reference
from edgeops.compiler.data import Dataset
from edgeops.compiler.reference import reference_summaries
from edgeops.fleet import drift as fleet_drift
from edgeops.protocol import drift
from edgeops.protocol.errors import EdgeopsError

TELEMETRY = ("CREATE TABLE telemetry (device TEXT, seq INTEGER, kind TEXT, t REAL, model TEXT, version TEXT, "
             "body TEXT, received_at REAL, PRIMARY KEY (device, seq))")


def _reference(inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray], classifier: int | None = None,
               whole: frozenset[str] = frozenset()) -> dict:
    """A reference.json as the compiler builds it."""
    data = Dataset(inputs, None, None, whole, "test")
    return reference_summaries(data, list(outputs), list(outputs.values()), classifier)


def _split(n: int, seed: int, *sizes: int) -> list[np.ndarray]:
    order = np.random.default_rng(seed).permutation(n)
    cuts = np.cumsum(sizes)
    return [np.sort(part) for part in np.split(order, cuts)]


@pytest.fixture(scope="module")
def digits():
    """Digits with a logistic-regression classifier trained on its own part, so reference and stream
    data are both unseen by the model (like the calibration data a bundle's reference is built on)."""
    x, y = load_digits(return_X_y=True)
    x = x.astype(np.float32)
    train, rest = _split(len(x), 0, 500)
    model = LogisticRegression(max_iter=3000).fit(x[train], y[train])

    def outputs(rows: np.ndarray) -> dict[str, np.ndarray]:
        return {"probabilities": model.predict_proba(rows).astype(np.float32)}

    return SimpleNamespace(x=x, rest=rest, outputs=outputs)


def _digits_split(digits, seed: int):
    """(reference dict, reference rows, held-out rows) for one random split of the non-training digits."""
    ref, hold = np.split(np.random.default_rng(seed).permutation(digits.rest), [650])
    reference = _reference({"x": digits.x[ref]}, digits.outputs(digits.x[ref]), classifier=0)
    return reference, ref, hold


def _windows(monitor: DriftMonitor, rows: np.ndarray, batch: int, outputs=None) -> list[dict]:
    """Feed `rows` in batches of `batch` (crossing window ends) and return the completed windows."""
    records = []
    for start in range(0, len(rows), batch):
        chunk = rows[start:start + batch]
        records += monitor.observe({"x": chunk}, {} if outputs is None else outputs(chunk))
    return records


# ---- the device's counts are the compiler's counts


def test_features_live_in_protocol_and_compiler_uses_them():
    assert compiler_reference.features is drift.features
    samples = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    assert drift.features(samples, "elements").shape == (2, 12)
    np.testing.assert_allclose(drift.features(samples, "channel_mean")[0], [1.5, 5.5, 9.5])
    np.testing.assert_allclose(drift.features(samples, "moments")[0], [5.5, np.arange(12).std()])


def test_monitor_bins_reference_data_into_the_reference_counts(digits):
    """Every reduction: the reference data, streamed through the monitor in odd batches, gives back the
    reference's own counts, bin for bin (binning on the device == binning in the compiler)."""
    rows = digits.rest[:650]
    x = digits.x[rows]
    inputs = {"x": x, "img": np.stack([x, x**2], 1).reshape(-1, 2, 8, 8), "flat": np.concatenate([x, -x], 1)}
    outputs = {**digits.outputs(x), "logits": np.log(digits.outputs(x)["probabilities"] + 1e-6)}
    reference = _reference(inputs, outputs, classifier=0)
    assert [e["reduction"] for e in reference["inputs"]] == ["elements", "channel_mean", "moments"]
    assert [e["reduction"] for e in reference["outputs"]] == ["classifier", "elements"]
    monitor = DriftMonitor(reference, window=len(x))
    records = []
    for start in range(0, len(x), 37):
        part = slice(start, start + 37)
        records += monitor.observe({k: v[part] for k, v in inputs.items()}, {k: v[part] for k, v in outputs.items()})
    [record] = records
    assert record["counts"] == drift.reference_counts(reference)
    assert record["samples"] == len(x) and not record["alarm"]
    json.dumps(record, allow_nan=False)


def test_whole_inputs_are_one_sample_per_run(digits):
    """A model that takes its input whole runs one sample at a time; its outputs have no sample axis."""
    rows = digits.rest[:300]
    x = digits.x[rows]
    probabilities = digits.outputs(x)["probabilities"][:, None]  # (n, 1, 10): per run (1, 10), stacked
    reference = _reference({"x": x}, {"probabilities": probabilities}, classifier=0, whole=frozenset({"x"}))
    monitor = DriftMonitor(reference, whole_inputs=frozenset({"x"}), window=len(x), capture=5, seed=1)
    records = []
    for i in range(len(x)):
        records += monitor.observe({"x": x[i]}, {"probabilities": probabilities[i]})
    assert [r["counts"] for r in records] == [drift.reference_counts(reference)]
    assert all(s["x"].shape == (64,) for s in monitor.captured())
    taken = monitor.take_captured()
    assert len(taken) == 5 and monitor.captured() == []
    monitor.observe({"x": x[0]}, {"probabilities": probabilities[0]})
    [fresh] = monitor.captured()  # the reservoir restarted: it holds only what came after the take
    assert np.array_equal(fresh["x"], x[0])


def test_bin_index_is_searchsorted_right():
    rng = np.random.default_rng(3)
    edge_lists = [np.unique(rng.integers(0, 5, 6)).astype(float), np.array([]), np.array([0.5])]
    values = rng.integers(-1, 7, (50, 3)).astype(float)
    values[0, 0], values[1, 2] = np.nan, np.inf
    index = drift.bin_index(drift.padded(edge_lists, np.inf), values)
    for f, edges in enumerate(edge_lists):
        finite = np.isfinite(values[:, f])
        np.testing.assert_array_equal(index[finite, f], np.searchsorted(edges, values[finite, f], side="right"))
        assert (index[~finite, f] == -1).all()


# ---- stationary data stays quiet; a small shift is caught


def test_stationary_digits_raise_no_alarm(digits):
    reference, _, hold = _digits_split(digits, 1)
    records = _windows(DriftMonitor(reference, window=200), digits.x[hold], 64, digits.outputs)
    assert len(records) == 3
    assert not any(r["alarm"] for r in records), [r["drifted"] for r in records]


def test_false_alarm_rate_over_many_windows(digits):
    """200 windows per setting, from 20 random reference/stream splits, 10 windows each drawn without
    replacement from the held-out part (so each is marginally a fresh sample the reference never saw).
    At the product's defaults (windows of 500, alpha 1 %, PSI floor 0.1) at most 1 % of windows alarm;
    the corrected test alone (no floor, windows of 200) stays within 2 % (it should be near alpha:
    Binomial(200, 0.01) exceeds 4 with probability 5 %; 600 such windows measured 0.5 %)."""
    rng = np.random.default_rng(7)
    alarms = {(500, 0.1): 0, (200, 0.0): 0}
    for split in range(20):
        reference, _, hold = _digits_split(digits, 100 + split)
        for window, floor in alarms:
            monitor = DriftMonitor(reference, window=window, psi_floor=floor)
            for _ in range(10):
                rows = digits.x[rng.choice(hold, window, replace=False)]
                [record] = monitor.observe({"x": rows}, digits.outputs(rows))
                alarms[window, floor] += record["alarm"]
    assert alarms[500, 0.1] <= 2, alarms
    assert alarms[200, 0.0] <= 4, alarms


def test_brightened_pixels_are_caught_within_a_few_windows(digits):
    reference, ref, hold = _digits_split(digits, 2)
    spread = digits.x[ref].std(0)
    pixels = np.argsort(spread)[-2:]  # two of 64 pixels, brightened by a third of their spread
    rng = np.random.default_rng(5)
    monitor = DriftMonitor(reference, window=200)
    for window in range(1, 4):  # noqa: B007 (the last value is the delay)
        x = digits.x[rng.choice(hold, 200, replace=False)].copy()
        x[:, pixels] = np.minimum(16, x[:, pixels] + np.round(spread[pixels] / 3))
        [record] = monitor.observe({"x": x}, digits.outputs(x))
        if record["alarm"]:
            break
    assert record["alarm"], f"not caught in {window} windows"
    assert set(record["drifted"]) <= {f"input/x/{p}" for p in pixels} | {"output/probabilities/confidence"}


def test_scaled_breast_cancer_features_are_caught_and_named():
    x = load_breast_cancer(return_X_y=True)[0].astype(np.float32)
    ref, hold = _split(len(x), 4, 284)
    monitor = DriftMonitor(_reference({"x": x[ref]}, {}), window=100)
    rng = np.random.default_rng(6)
    shifted = [3, 20]  # mean area and worst radius, of 30 features, 25 % larger
    delays = []
    for _ in range(5):
        for window in range(1, 6):  # noqa: B007 (the last value is the delay)
            rows = x[rng.choice(hold, 100, replace=False)].copy()
            rows[:, shifted] *= 1.25
            [record] = monitor.observe({"x": rows}, {})
            assert set(record["drifted"]) <= {f"input/x/{f}" for f in shifted}
            if record["alarm"]:
                break
        delays.append(window)
    assert max(delays) <= 3, delays


# ---- the statistics


def test_chi2_sf_matches_scipy():
    for dof in [0.5, 1, 2, 3, 4.5, 9, 10, 17, 63, 100, 999]:
        for x in [*np.logspace(-4, 3.7, 70), dof, dof + 1, dof + 1e-9]:
            expected = stats.chi2.sf(x, dof)
            got = drift.chi2_sf(float(x), dof)
            assert got == pytest.approx(expected, rel=1e-9, abs=1e-300), (x, dof)
    assert drift.chi2_sf(0.0, 3) == 1.0
    with pytest.raises(ValueError):
        drift.chi2_sf(1.0, 0)


def test_g_test_matches_scipy_without_williams_correction():
    reference, window = np.array([[30.0, 50, 0, 20]]), np.array([[10.0, 35, 0, 25]])
    [g], [dof] = drift.g_test(reference, window)
    table = np.concatenate([reference, window])[:, [0, 1, 3]]
    statistic, _, scipy_dof, expected = stats.chi2_contingency(table, correction=False, lambda_="log-likelihood")
    total = table.sum()
    q = 1 + (total * (1 / table.sum(1)).sum() - 1) * (total * (1 / table.sum(0)).sum() - 1) / (6 * total * 2)
    assert dof == scipy_dof == 2 and g == pytest.approx(statistic / q, rel=1e-12)


def test_holm_by_hand():
    # sorted: 0.005*4 = 0.02, 0.01*3 = 0.03, 0.03*2 = 0.06, 0.04*1 = 0.04 -> monotone: 0.02 0.03 0.06 0.06
    np.testing.assert_allclose(drift.holm([0.01, 0.04, 0.03, 0.005]), [0.03, 0.06, 0.06, 0.02])
    np.testing.assert_allclose(drift.holm([0.5, 0.9]), [1.0, 1.0])
    assert drift.holm([]).size == 0


def test_psi_properties():
    def psi(reference, window):
        [value] = drift.psi(np.array([reference], float), np.array([window], float))
        return value

    a, b = [100, 100, 100, 100], [160, 120, 80, 40]
    assert psi(a, a) == 0.0 and psi(a, [300] * 4) == pytest.approx(0.0, abs=1e-12)
    assert psi(a, b) > 0 and psi(a, b) == pytest.approx(psi(b, a), rel=0.05)
    assert psi(a, [130, 110, 90, 70]) < psi(a, b)
    assert 0 < psi(a, [0, 0, 0, 400]) < np.inf and 0 < psi([100, 100, 0], [100, 100, 50]) < np.inf
    assert psi(a, [0, 0, 0, 0]) == 0.0 and psi([0, 0], [1, 1]) == 0.0


def test_window_test_edge_cases():
    reference = {"a": [0, 900, 100], "constant": [0, 1000], "c": [250, 250, 250, 250]}
    empty = drift.window_test(reference, {"a": [0, 0, 0], "constant": [0, 0], "c": [0, 0, 0, 0]})
    assert empty["p"] == {"a": 1.0, "constant": 1.0, "c": 1.0} and not empty["alarm"]
    shifted = drift.window_test(reference, {"a": [0, 90, 10], "constant": [0, 100], "c": [10, 20, 30, 40]})
    assert shifted["drifted"] == ["c"] and shifted["p"]["constant"] == 1.0
    pools = drift.pooled_bins(np.array([[0.0, 900, 100], [100, 100, 3], [5, 5, 5]]), np.array([100, 100, 0]))
    assert pools.tolist() == [[0, 0, 1], [0, 1, 1], [0, 0, 0]]  # empty bin pooled, short tail joins, no window
    with pytest.raises(EdgeopsError, match="3 window bins but 4 reference bins"):
        drift.window_test(reference, {"a": [0, 0, 0], "constant": [0, 0], "c": [1, 2, 3]})


# ---- capture


def test_reservoir_keeps_a_uniform_bounded_sample(digits):
    reference, _, hold = _digits_split(digits, 3)
    x = digits.x[hold][:600]
    kept_positions = []
    for seed in range(40):
        monitor = DriftMonitor(reference, window=10_000, capture=10, seed=seed)
        _windows(monitor, x, 33)
        captured = monitor.captured()
        assert len(captured) == 10
        rows = [int(np.flatnonzero((x == s["x"]).all(1))[0]) for s in captured]
        kept_positions += rows
    # Uniform over 600 positions: mean 299.5, sd of the mean of 400 draws ~ 8.7
    assert abs(np.mean(kept_positions) - 299.5) < 35
    assert np.histogram(kept_positions, bins=3, range=(0, 600))[0].min() > 100


def test_sample_record_round_trips_and_refuses_pickles(digits):
    sample = {"x": digits.x[0], "state": np.zeros((2, 3), np.int64)}
    body = sample_record(sample)
    assert body["kind"] == "sample" and json.loads(json.dumps(body)) == body
    decoded = drift.decode_sample(body)
    assert decoded.keys() == sample.keys() and all(np.array_equal(decoded[k], sample[k]) for k in sample)
    assert sample_record(sample) == body  # deterministic: equal samples, equal records
    pickled = io.BytesIO()
    np.savez(pickled, x=np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(EdgeopsError, match="plain arrays"):
        drift.decode_sample({"npz": base64.b64encode(pickled.getvalue()).decode()})
    with pytest.raises(EdgeopsError):
        drift.decode_sample({"npz": "not base64!"})
    with pytest.raises(EdgeopsError, match="telemetry record"):
        sample_record({"x": np.random.default_rng(0).random(100_000)})


def test_monitor_refuses_bad_references():
    with pytest.raises(EdgeopsError, match="version 99"):
        DriftMonitor({"version": 99, "inputs": [], "outputs": []})
    with pytest.raises(EdgeopsError, match="malformed"):
        DriftMonitor({"version": 1, "inputs": [{"name": "x"}], "outputs": []})
    with pytest.raises(EdgeopsError, match="window >= 1"):
        DriftMonitor({"version": 1, "inputs": [], "outputs": []}, window=0)


def test_agent_drift_imports_no_scipy_compiler_or_fleet():
    code = ("import sys, edgeops.agent.drift; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'scipy' "
            "or m.startswith(('edgeops.compiler', 'edgeops.fleet'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"


# ---- the fleet


def _store(db: sqlite_utils.Database, device: str, seq: int, t: float, model: str, version: str, record: dict) -> None:
    """Store a record body as the agent's telemetry does: `kind` in its column, model/version in both."""
    body = {"model": model, "version": version, **{k: v for k, v in record.items() if k != "kind"}}
    db.execute("INSERT INTO telemetry VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
               [device, seq, record["kind"], t, model, version, json.dumps(body), t + 1])


@pytest.fixture()
def fleet(digits, tmp_path):
    """Three devices running digits 1.0 for 5 windows of 150; device c's pixels brighten from window 2."""
    reference, ref, hold = _digits_split(digits, 9)
    db = sqlite_utils.Database(sqlite3.connect(str(tmp_path / "fleet.db")))
    db.execute(TELEMETRY)
    spread = digits.x[ref].std(0)
    pixels = np.argsort(spread)[-2:]
    rng = np.random.default_rng(11)
    seq = {"a": 0, "b": 0, "c": 0}
    records, streams = [], {}
    for device in seq:
        monitor = DriftMonitor(reference, window=150, capture=4, seed=len(records))
        rows = np.concatenate([digits.x[rng.choice(hold, 150, replace=False)] for _ in range(5)])
        if device == "c":
            rows[150:, pixels] = np.minimum(16, rows[150:, pixels] + np.round(spread[pixels] / 2))
        streams[device] = rows
        for start in range(0, len(rows), 41):
            for record in monitor.observe({"x": rows[start:start + 41]}, digits.outputs(rows[start:start + 41])):
                seq[device] += 1
                _store(db, device, seq[device], 1000.0 + 10 * record["window"], "digits", "1.0", record)
                records.append(record)
        for sample in monitor.captured():
            seq[device] += 1
            _store(db, device, seq[device], 2000.0, "digits", "1.0", sample_record(sample))
    db.conn.commit()
    return SimpleNamespace(db=db, reference=reference, records=records, streams=streams, pixels=pixels)


def test_fleet_merge_is_exact_and_names_the_drifting_device(fleet):
    [version] = fleet_drift.report(fleet.db)["versions"]
    [baseline] = version["baselines"]
    summed = {k: np.sum([r["counts"][k] for r in fleet.records], 0).tolist() for k in fleet.records[0]["counts"]}
    assert baseline["counts"] == summed
    # ... and equal to binning all samples of all devices at once, as compiler/reference.py bins
    everything = np.concatenate(list(fleet.streams.values()))
    for index, summary in enumerate(fleet.reference["inputs"][0]["features"]):
        direct = np.bincount(np.searchsorted(summary["edges"], everything[:, index], side="right"),
                             minlength=len(summary["edges"]) + 1)
        assert baseline["counts"][f"input/x/{index}"] == direct.tolist()
    assert baseline["windows"] == 15 and baseline["samples"] == 15 * 150
    assert baseline["reference_counts"] == drift.reference_counts(fleet.reference)
    assert {d: s["status"] for d, s in version["devices"].items()} == {
        "a": "ok", "b": "ok", "c": "retraining recommended"}
    assert version["devices"]["c"]["recent"] == [True, True, True] and version["devices"]["a"]["alarmed"] == 0
    assert version["status"] == "retraining recommended" and version["captured"] == 12
    assert version["first_seen"] == 1000.0 and version["last_seen"] == 2000.0
    assert version["top_features"][0]["feature"] in {f"input/x/{p}" for p in fleet.pixels}
    assert fleet_drift.flagged(fleet.db) == [
        {"model": "digits", "version": "1.0", "devices": ["c"], "last_seen": 2000.0,
         "top_features": version["top_features"]}]
    json.dumps(fleet_drift.report(fleet.db, "digits"), allow_nan=False)


def test_fleet_export_writes_a_loadable_dataset(fleet, tmp_path):
    out = fleet_drift.export(fleet.db, "digits", None, tmp_path / "export")
    assert out["version"] == "1.0" and out["samples"] == 12 and out["inputs"] == {"x": [64]}
    with np.load(tmp_path / "export" / "samples.npz", allow_pickle=False) as npz:
        samples = npz["x"]
    assert samples.shape == (12, 64) and samples.dtype == np.float32
    everything = np.concatenate(list(fleet.streams.values()))
    assert all((everything == row).all(1).any() for row in samples)  # real inputs, not made up
    summaries = json.loads((tmp_path / "export" / "summaries.json").read_text())
    assert summaries["status"] == "retraining recommended" and summaries["baselines"][0]["windows"] == 15
    again = fleet_drift.export(fleet.db, "digits", "1.0", tmp_path / "export")  # replaces atomically
    assert again["samples"] == 12


def test_fleet_refuses_unknown_models_and_empty_exports_and_skips_bad_bodies(fleet, tmp_path):
    with pytest.raises(EdgeopsError, match="no drift telemetry from model 'nope'.*digits"):
        fleet_drift.export(fleet.db, "nope", None, tmp_path / "x")
    with pytest.raises(EdgeopsError, match="nope"):
        fleet_drift.report(fleet.db, "nope")
    with pytest.raises(EdgeopsError, match="enable sample capture"):
        fleet_drift.export(fleet.db, "digits", "2.0-never-ran", tmp_path / "x")
    record = dict(fleet.records[0])
    _store(fleet.db, "d", 1, 3000.0, "digits", "1.0", {**record, "counts": {"input/x/0": [-1]}})
    _store(fleet.db, "d", 2, 3001.0, "digits", "1.0", {**record, "reference_counts": {"input/x/0": [1]}})
    fleet.db.execute("INSERT INTO telemetry VALUES ('d', 3, 'drift', 3002, 'digits', '1.0', 'not json', 0)")
    _store(fleet.db, "d", 4, 3003.0, "digits", "1.0", {"kind": "sample", "npz": "!!"})
    _store(fleet.db, "d", 5, 3004.0, "digits", "1.0", {"kind": "metrics", "cpu": 1})
    [version] = fleet_drift.report(fleet.db)["versions"]
    assert version["skipped"] == 3 and version["baselines"][0]["windows"] == 15 and "d" not in version["devices"]
    assert fleet_drift.export(fleet.db, "digits", "1.0", tmp_path / "y")["unused"] == 1
