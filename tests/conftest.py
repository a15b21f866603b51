"""Shared pytest fixtures.

Each block below belongs to one group of test modules; add new fixtures in a block of their own.
"""

from __future__ import annotations

import sys
from pathlib import Path

# --import-mode=importlib leaves tests/ off sys.path; the helper modules here (zoo, fleetkit,
# realparts) are imported by name.
sys.path.insert(0, str(Path(__file__).parent))

# ======================================================================================================
# BEGIN digits-MLP fixtures and CLI helpers
# (used by test_profiles.py, test_bundle.py, test_bad_input.py, test_cli.py)
#
# Training the digits MLP takes a few seconds and each build 5-20 s, so the model is trained once per
# session and built exactly twice: once through the library (`digits_bundle`) and once through the
# CLI with `--json` (`digits_cli_build`). Both builds use the same inputs, which lets test_bundle.py
# check that two real builds give byte-identical bundles without a third build. Tests must treat
# these files as read-only: copy before tampering.
# ======================================================================================================

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

DIGITS_PROFILE = "x86-vnni"


@pytest.fixture(scope="session")
def digits_model(tmp_path_factory):
    """The trained digits MLP as files: `.onnx`, `.calib` (npz), `.eval` (npz with labels)."""
    from edgeops.examples import train_digits_mlp

    return train_digits_mlp(tmp_path_factory.mktemp("digits-model"))


@pytest.fixture(scope="session")
def digits_bundle(digits_model, tmp_path_factory):
    """The digits MLP built for x86-vnni through `edgeops.compiler.build.build`: `.path`, `.report`."""
    from edgeops.compiler.build import BuildRequest, build

    outdir = tmp_path_factory.mktemp("digits-bundle")
    report = build(
        BuildRequest(
            model=digits_model.onnx,
            profile=DIGITS_PROFILE,
            calib=digits_model.calib,
            eval=digits_model.eval,
            outdir=outdir,
        )
    )
    path = Path(report["bundle"])
    assert path.is_file(), report
    return SimpleNamespace(path=path, report=report, outdir=outdir)


@pytest.fixture(scope="session")
def digits_cli_build(digits_model, tmp_path_factory):
    """`edgeops build ... --json` on the digits MLP, same inputs as `digits_bundle`.

    `.result` is click's Result, `.report` the parsed stdout (None if it did not parse), `.outdir`.
    """
    from edgeops.cli import cli

    outdir = tmp_path_factory.mktemp("digits-cli-build")
    args = [
        "build", str(digits_model.onnx), "--profile", DIGITS_PROFILE,
        "--calib", str(digits_model.calib), "--eval", str(digits_model.eval),
        "-o", str(outdir), "--json",
    ]  # fmt: skip
    result = CliRunner().invoke(cli, args)
    try:
        report = json.loads(result.stdout)
    except ValueError:
        report = None
    return SimpleNamespace(result=result, report=report, outdir=outdir)


@pytest.fixture
def cli_ok():
    """Run `edgeops ARGS...` in-process; assert exit status 0; return click's Result."""
    from edgeops.cli import cli

    def run(*args: str):
        result = CliRunner().invoke(cli, [str(a) for a in args])
        assert result.exit_code == 0, (result.output, result.exception)
        return result

    return run


@pytest.fixture
def cli_error():
    """Run `edgeops ARGS...` expecting a clean failure; return the error line.

    A clean failure: non-zero exit through SystemExit (no uncaught exception), no traceback, and
    exactly one line of output, starting with "Error:".
    """
    from edgeops.cli import cli

    def run(*args: str) -> str:
        result = CliRunner().invoke(cli, [str(a) for a in args])
        assert result.exit_code != 0, result.output
        assert isinstance(result.exception, SystemExit), repr(result.exception)
        assert "Traceback" not in result.output, result.output
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert len(lines) == 1, result.output
        assert lines[0].startswith("Error: "), result.output
        return lines[0]

    return run


# ======================================================================================================
# END digits-MLP fixtures and CLI helpers
# ======================================================================================================


# ======================================================================================================
# BEGIN real-model requirement helper
# (used by test_compiler.py)
#
# Tests on real models need real parts: trained zoo models (torch, scikit-learn) and models shipped in
# third-party packages (magika, silero-vad, rapidocr). Locally a missing part skips the test; under
# CI=true it fails it, so a CI image that lost a package cannot turn the suite green by skipping.
# ======================================================================================================


def require_real(make, *args, **kwargs):
    """Call `make(*args, **kwargs)`; a missing real part skips locally and fails under CI=true."""
    import zoo_thirdparty
    from realparts import missing

    try:
        return make(*args, **kwargs)
    except (zoo_thirdparty.ModelUnavailable, ImportError) as exc:
        missing(f"real model unavailable: {type(exc).__name__}: {exc}")


@pytest.fixture(scope="session")
def require():
    """`require(make, *args)`: `make`'s result, or a skip (locally) / failure (CI=true) if it is unavailable."""
    return require_real


# ======================================================================================================
# END real-model requirement helper
# ======================================================================================================


# ======================================================================================================
# BEGIN agent A/B slot releases
# (used by test_slots.py)
#
# Installs need real, distinct releases. Rather than a third build (~20 s), both derive from the
# library build `digits_bundle` above: `.v1` is a byte copy of it, `.v2` the same members re-versioned
# 1.1.0 through build_bundle. Tests must treat them as read-only: copy before tampering.
# ======================================================================================================


@pytest.fixture(scope="session")
def slot_releases(digits_bundle, tmp_path_factory):
    """Two releases of the digits MLP as bundle files: `.v1` (1.0.0, the real build) and `.v2` (1.1.0)."""
    from edgeops.protocol.bundle import build_bundle, bundle_filename, read_bundle

    outdir = tmp_path_factory.mktemp("slot-releases")
    built = read_bundle(digits_bundle.path)
    assert built.manifest["version"] == "1.0.0", "slot_releases assumes the build is version 1.0.0"
    paths = []
    for version, data in (("1.0.0", digits_bundle.path.read_bytes()),
                          ("1.1.0", build_bundle(dict(built.manifest, version="1.1.0"), built.members))):
        path = outdir / bundle_filename(built.manifest["name"], version, built.manifest["profile"])
        path.write_bytes(data)
        paths.append(path)
    return SimpleNamespace(v1=paths[0], v2=paths[1])


# ======================================================================================================
# END agent A/B slot releases
# ======================================================================================================


# ======================================================================================================
# BEGIN a Python with nothing installed
# (used by the tests of errors about a missing extra: test_bad_input.py, test_inc.py, test_litert_build.py)
# ======================================================================================================


@pytest.fixture(scope="session")
def bare_python(tmp_path_factory) -> str:
    """The python of a venv without pip or any package: what a missing extra looks like."""
    import subprocess

    venv = tmp_path_factory.mktemp("bare-venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    return str(venv / "bin" / "python")


# ======================================================================================================
# END a Python with nothing installed
# ======================================================================================================
