"""`edgeops drift report|export`, GET /v1/drift and `fleet serve --on-drift`, on a real fleet directory
holding drift windows that real DriftMonitors produced on scikit-learn's digits (test_drift.py's
`fleet` fixture: three devices, device c's pixels brighten from its second window)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from edgeops.cli import cli
from edgeops.fleet import drift, hooks, registry
from edgeops.fleet.api import ApiServer
from edgeops.fleet.home import init_fleet

sys.path.insert(0, str(Path(__file__).parent))
from fleetkit import wait_for  # noqa: E402
from test_drift import digits, fleet  # noqa: E402,F401  (fixtures)


@pytest.fixture
def home(fleet, tmp_path):
    """A fleet directory whose registry holds the fixture's drift and sample records."""
    home = init_fleet(tmp_path / "home")
    db = registry.open_db(home.db_path)
    with db.conn:
        db.conn.executemany("insert into telemetry values (?, ?, ?, ?, ?, ?, ?, ?)",
                            fleet.db.execute("select * from telemetry").fetchall())
    return home


def test_report_shows_the_flagged_version_and_device(home):
    runner = CliRunner()
    as_json = runner.invoke(cli, ["drift", "report", "--fleet", str(home.path), "--json"])
    assert as_json.exit_code == 0, as_json.output
    assert json.loads(as_json.output) == drift.report(registry.open_db(home.db_path))
    table = runner.invoke(cli, ["drift", "report", "--fleet", str(home.path)])
    assert table.exit_code == 0 and "retraining recommended" in table.output
    assert "devices that drift" in table.output and "│ c " in table.output


def test_report_of_an_unknown_model_is_one_clear_line(home):
    result = CliRunner().invoke(cli, ["drift", "report", "--fleet", str(home.path), "--model", "nope"])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == ["Error: no drift telemetry from model 'nope' (models with drift telemetry: digits)"]


def test_report_over_the_http_api(home):
    server = ApiServer(home, "127.0.0.1:0").start()
    try:
        token = home.config["api_token"]
        result = CliRunner().invoke(cli, ["drift", "report", "--fleet", server.url, "--token", token, "--model", "digits",
                                          "--json"])
        assert result.exit_code == 0, result.output
        assert json.loads(result.output)["versions"][0]["status"] == "retraining recommended"
        missing = CliRunner().invoke(cli, ["drift", "report", "--fleet", server.url, "--token", token, "--model", "nope"])
        assert missing.exit_code == 1 and "no drift telemetry from model 'nope'" in missing.output
    finally:
        server.stop()


def test_export_writes_samples_and_summaries(home, tmp_path):
    out = tmp_path / "retrain"
    result = CliRunner().invoke(cli, ["drift", "export", "--fleet", str(home.path), "--model", "digits", "-o", str(out),
                                      "--json"])
    assert result.exit_code == 0, result.output
    written = json.loads(result.output)
    with np.load(out / "samples.npz", allow_pickle=False) as samples:
        assert samples["x"].shape == (written["samples"], 64) and written["samples"] == 12  # 4 captured per device
    assert json.loads((out / "summaries.json").read_text())["status"] == "retraining recommended"


def test_on_drift_runs_once_per_flagged_version_across_restarts(home, tmp_path):
    marker = tmp_path / "ran"
    command = f'echo "$EDGEOPS_MODEL $EDGEOPS_VERSION $EDGEOPS_FLEET" >> {marker}'
    db = registry.open_db(home.db_path)
    assert hooks.run_new(db, command, home.path) == [("digits", "1.0")]
    wait_for(lambda: marker.exists() and marker.read_text().strip(), "the on-drift command to run")
    assert marker.read_text() == f"digits 1.0 {home.path}\n"
    assert hooks.run_new(db, command, home.path) == []  # already ran for this version
    assert hooks.run_new(registry.open_db(home.db_path), command, home.path) == []  # also after a restart
