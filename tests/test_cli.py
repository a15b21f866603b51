"""The command line as a whole: help with examples, version, the console script, `build --json`, imports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import click
import pytest

import edgeops
from edgeops.cli import cli


def command_paths(group: click.Group, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    paths = []
    for name, command in sorted(group.commands.items()):
        paths.append((*prefix, name))
        if isinstance(command, click.Group):
            paths.extend(command_paths(command, (*prefix, name)))
    return paths


COMMANDS = command_paths(cli)


def run_python(code: str, cwd: Path | str = "/tmp") -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


# --- help and version ----------------------------------------------------------------------------------


def test_top_level_help(cli_ok):
    output = cli_ok("--help").output
    assert "Example" in output
    for name in ("build", "inspect", "profiles"):
        assert name in output


def test_commands_are_registered():
    assert {("build",), ("inspect",), ("profiles",), ("profiles", "list"), ("profiles", "show")} <= set(COMMANDS)


@pytest.mark.parametrize("path", COMMANDS, ids=" ".join)
def test_every_command_help_has_an_example(cli_ok, path):
    output = cli_ok(*path, "--help").output
    assert "Example" in output
    assert f"edgeops {' '.join(path)}" in output  # the example shows this very command


def test_short_help_option(cli_ok):
    assert "Example" in cli_ok("build", "-h").output


def test_version_in_process(cli_ok):
    assert cli_ok("--version").output.strip() == f"edgeops, version {edgeops.__version__}"


def test_python_dash_m_version():
    proc = subprocess.run([sys.executable, "-m", "edgeops", "--version"], cwd="/tmp", capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"edgeops, version {edgeops.__version__}"


def test_console_script_is_installed():
    script = Path(sysconfig.get_path("scripts")) / "edgeops"
    assert script.is_file()
    assert os.access(script, os.X_OK)
    proc = subprocess.run([str(script), "--version"], cwd="/tmp", capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert edgeops.__version__ in proc.stdout


def test_unknown_command_fails_cleanly():
    from click.testing import CliRunner

    result = CliRunner().invoke(cli, ["biuld"])
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    assert "Error:" in result.output


def test_console_script_error_is_one_line_on_stderr(tmp_path):
    script = Path(sysconfig.get_path("scripts")) / "edgeops"
    proc = subprocess.run([str(script), "inspect", str(tmp_path / "absent.edgeops")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), proc.stderr
    assert "absent.edgeops" in lines[0] and "does not exist" in lines[0]


# --- build --json --------------------------------------------------------------------------------------

FIGURES = ("size_bytes", "quality", "drop", "latency_ms")


@pytest.fixture(scope="module")
def report(digits_cli_build):
    result = digits_cli_build.result
    assert result.exit_code == 0, (result.output, result.exception)
    assert digits_cli_build.report is not None, f"stdout is not one JSON object: {result.stdout!r}"
    return digits_cli_build.report


def test_build_json_stdout_is_one_object(digits_cli_build, report):
    stdout = digits_cli_build.result.stdout
    assert isinstance(report, dict)
    decoder = json.JSONDecoder()
    _, end = decoder.raw_decode(stdout.lstrip())
    assert stdout.lstrip()[end:].strip() == ""


def test_build_json_report_keys(report):
    for key in ("bundle", "profile", "size_bytes", "fp32_size_bytes", "quality", "latency_ms", "candidates", "passes"):
        assert key in report, key
    assert report["profile"] == "x86-vnni"
    assert set(report["quality"]) >= {"metric", "fp32", "compiled", "drop"}
    assert set(report["latency_ms"]) >= {"fp32", "compiled"}
    assert report["quality"]["metric"] == "accuracy"  # the eval data has labels


def test_build_json_bundle_is_written(digits_cli_build, report):
    bundle = Path(report["bundle"])
    assert bundle.parent == digits_cli_build.outdir
    assert bundle.name == "model-1.0.0-x86-vnni.edgeops"
    assert Path(report["chart"]) == bundle.with_suffix(".html")
    assert "<svg" in Path(report["chart"]).read_text()
    assert sorted(p.name for p in digits_cli_build.outdir.iterdir()) == sorted([bundle.name, Path(report["chart"]).name])  # no leftovers


def test_build_json_figures_are_consistent(report):
    q = report["quality"]
    assert 0.9 < q["fp32"] <= 1.0  # the digits MLP is a real classifier
    assert q["drop"] == pytest.approx(q["fp32"] - q["compiled"], abs=1e-5)
    assert q["drop"] <= q["max_drop"] == 0.01
    assert 0 < report["size_bytes"] < report["fp32_size_bytes"]  # int8 for an int8 profile shrinks it
    assert report["latency_ms"]["fp32"] > 0 and report["latency_ms"]["compiled"] > 0


def test_build_json_candidates(report):
    candidates = report["candidates"]
    assert len(candidates) >= 2
    for candidate in candidates:
        assert set(FIGURES) | {"label", "passes", "ok"} <= set(candidate), candidate
        assert isinstance(candidate["passes"], list)
    chosen = [c for c in candidates if c["label"] == report["chosen"]]
    assert len(chosen) == 1 and chosen[0]["ok"]
    assert chosen[0]["size_bytes"] == report["size_bytes"]
    assert chosen[0]["quality"] == report["quality"]["compiled"]
    assert chosen[0]["latency_ms"] > 0  # the report re-measures latency side by side with fp32
    for candidate in candidates:
        if candidate["ok"]:
            assert candidate["drop"] <= report["quality"]["max_drop"] + 1e-9
        elif candidate["error"] is None:
            assert candidate["misses"], candidate


def test_build_json_passes(report):
    names = [p["name"] for p in report["passes"]]
    assert names[0] == "optimize"
    assert any(name.startswith("quantize") for name in names)  # x86-vnni is an int8 profile


# --- package layout and import boundaries --------------------------------------------------------------


def test_package_imports_from_elsewhere():
    # The baseline for the next test: the interpreter can import edgeops from /tmp.
    proc = run_python("import edgeops.compiler, edgeops.protocol, edgeops.cli; print(edgeops.__file__)")
    assert proc.returncode == 0, proc.stderr
    assert Path(proc.stdout.strip()).parent == Path(edgeops.__file__).parent


@pytest.mark.parametrize("name", ["compiler", "agent", "fleet", "cli", "protocol", "examples"])
def test_no_bare_top_level_module(name):
    proc = run_python(f"import {name}")
    assert proc.returncode != 0, f"`import {name}` works outside the repository: the package leaks top-level modules"
    assert "ModuleNotFoundError" in proc.stderr


def test_agent_does_not_import_the_compiler():
    code = """
import importlib, json, pkgutil, sys
import edgeops.agent
for info in pkgutil.walk_packages(edgeops.agent.__path__, "edgeops.agent."):
    importlib.import_module(info.name)
heavy = ("onnx", "edgeops.compiler", "edgeops.fleet", "tensorflow", "torch", "sklearn", "skl2onnx", "rich")
print(json.dumps(sorted(m for m in sys.modules if any(m == h or m.startswith(h + ".") for h in heavy))))
"""
    proc = run_python(code)
    assert proc.returncode == 0, proc.stderr
    loaded = json.loads(proc.stdout)
    assert loaded == [], f"importing edgeops.agent loaded {loaded}"


def test_agent_check_would_see_onnx():
    # The baseline for the test above: the same check does notice a heavy import.
    proc = run_python("import sys, edgeops.compiler.model; print('onnx' in sys.modules)")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "True"


# --- keys ------------------------------------------------------------------------------------------


def test_keys_export_and_rotate(tmp_path):
    from click.testing import CliRunner

    from edgeops.cli import cli as root_cli
    from edgeops.fleet import trust
    from edgeops.fleet.home import init_fleet

    home = init_fleet(tmp_path / "fleet")
    runner = CliRunner()
    old_root = trust.read_metadata(home.repo, "root.json")
    result = runner.invoke(root_cli, ["keys", "export", "root", "--fleet", str(home.path), "-o", str(tmp_path / "root.pem"), "--remove"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "root.pem").stat().st_mode & 0o777 == 0o600
    assert not (home.repo / "keys" / "root.pem").exists()
    # Without the offline root key the fleet cannot rotate; with it, a new root version appears.
    refused = runner.invoke(root_cli, ["keys", "rotate", "targets", "--fleet", str(home.path)])
    assert refused.exit_code != 0 and refused.output.startswith("Error:")
    result = runner.invoke(root_cli, ["keys", "rotate", "targets", "--fleet", str(home.path), "--root-key", str(tmp_path / "root.pem")])
    assert result.exit_code == 0, result.output
    assert trust.read_metadata(home.repo, "root.json") != old_root
