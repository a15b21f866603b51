"""Hardware profiles: the shipped ones parse, the CLI shows them, bad ones are refused naming the field."""

from __future__ import annotations

import json
import re
import tomllib
from importlib import resources
from pathlib import Path

import pytest

from edgeops.protocol.errors import EdgeopsError
from edgeops.protocol.profiles import (
    ARCHES,
    PRECISIONS,
    RUNTIMES,
    Profile,
    list_profiles,
    load_profile,
    parse_profile,
    shipped_profile_names,
)

SHIPPED_DIR = Path(str(resources.files("edgeops") / "firmware_profiles"))
BASE = "x86-vnni"


def base_text() -> str:
    return (SHIPPED_DIR / f"{BASE}.toml").read_text(encoding="utf-8")


def edited(old: str, new: str, count: int = 1) -> str:
    """The base profile's text with `old` replaced; fails loudly if the base no longer has `old`."""
    text = base_text()
    assert old in text, f"{BASE}.toml no longer contains {old!r}"
    return text.replace(old, new, count)


def without_table(table: str) -> str:
    text = base_text()
    cut = re.sub(rf"(?ms)^\[{table}\]\n.*?(?=^\[|\Z)", "", text)
    assert cut != text
    return cut


def write(tmp_path: Path, text: str, name: str = "board.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# --- shipped profiles ----------------------------------------------------------------------------------


def test_at_least_six_profiles_ship():
    names = shipped_profile_names()
    assert len(names) >= 6, names
    assert BASE in names


@pytest.mark.parametrize("name", shipped_profile_names())
def test_shipped_profile_parses_and_is_named_after_its_file(name):
    profile = load_profile(name)
    assert isinstance(profile, Profile)
    assert profile.name == name
    assert profile.arch in ARCHES
    assert profile.precision in PRECISIONS
    assert profile.runtime.name in RUNTIMES
    assert profile.description and profile.cpu
    assert profile.budget.max_bundle_bytes > 0 and profile.budget.max_latency_ms > 0
    # Budgets must fit the board: a runtime-memory budget larger than its RAM can never be met.
    assert profile.budget.max_runtime_memory_mb <= profile.ram_mb


def test_list_profiles_matches_shipped_names():
    assert [p.name for p in list_profiles()] == shipped_profile_names()


def test_profile_round_trips_through_to_dict():
    profile = load_profile(BASE)
    data = profile.to_dict()
    data.pop("source")
    assert parse_profile(data, where="roundtrip") == Profile(**{**profile.__dict__, "source": "roundtrip"})


# --- CLI -----------------------------------------------------------------------------------------------


def test_cli_profiles_list_shows_every_profile(cli_ok):
    output = cli_ok("profiles", "list").output
    listed = [line.split()[0] for line in output.splitlines() if line.strip()]
    assert listed == shipped_profile_names()


def test_cli_profiles_list_json(cli_ok):
    data = json.loads(cli_ok("profiles", "list", "--json").output)
    assert [p["name"] for p in data] == shipped_profile_names()


def test_cli_profiles_show_json(cli_ok):
    data = json.loads(cli_ok("profiles", "show", BASE, "--json").output)
    assert data == json.loads(json.dumps(load_profile(BASE).to_dict()))
    assert data["name"] == BASE
    assert data["runtime"]["name"] == "onnxruntime"
    assert set(data["budget"]) == {"max_bundle_bytes", "max_runtime_memory_mb", "max_latency_ms"}


def test_cli_profiles_show_text(cli_ok):
    output = cli_ok("profiles", "show", "rpi4").output
    assert "name: rpi4" in output
    assert "max_bundle_bytes:" in output


def test_profile_from_toml_path(tmp_path, cli_ok):
    path = write(tmp_path, edited(f'name = "{BASE}"', 'name = "my-board"'), "my-board.toml")
    profile = load_profile(path)
    assert profile.name == "my-board"
    assert profile.source == str(path)
    data = json.loads(cli_ok("profiles", "show", path, "--json").output)
    assert data["name"] == "my-board"
    assert data["budget"] == json.loads(json.dumps(load_profile(BASE).to_dict()))["budget"]


def test_profile_from_existing_path_without_toml_suffix(tmp_path):
    path = write(tmp_path, base_text(), "board.cfg")
    assert load_profile(str(path)).name == BASE


def test_quantization_table_is_optional_with_defaults(tmp_path):
    profile = load_profile(write(tmp_path, without_table("quantization")))
    assert profile.quantization.format == "qdq"
    assert profile.quantization.per_channel is True
    assert profile.quantization.calibration == ("minmax", "entropy", "percentile")


def test_a_folder_named_like_a_profile_does_not_shadow_it(tmp_path, monkeypatch):
    # `edgeops build m.onnx -p rpi4 -o rpi4` and then building again from the same folder must work.
    (tmp_path / "rpi4").mkdir()
    monkeypatch.chdir(tmp_path)
    assert load_profile("rpi4").name == "rpi4"


# --- bad profiles --------------------------------------------------------------------------------------

BAD_PROFILES = {
    "typo-top-level": (edited("cores = ", "core = "), ["'core'", "did you mean 'cores'"]),
    "typo-budget": (
        edited("max_bundle_bytes = ", "max_bundle_byte = "),
        ["'budget.max_bundle_byte'", "did you mean 'max_bundle_bytes'"],
    ),
    "unknown-key-no-close-match": (edited("cores = ", "favourite_colour = 1\ncores = "), ["'favourite_colour'", "not a profile field"]),
    "wrong-type-int": (edited("cores = 4", 'cores = "four"'), ["'cores'", "must be int", "str"]),
    "bool-is-not-int": (edited("cores = 4", "cores = true"), ["'cores'", "must be int", "bool"]),
    "wrong-type-bool": (edited("per_channel = true", 'per_channel = "yes"'), ["'quantization.per_channel'", "must be bool"]),
    "table-is-scalar": (without_table("runtime").replace('arch = "', 'runtime = 3\narch = "'), ["'runtime'", "must be a table"]),
    "negative-budget": (edited("max_latency_ms = 50.0", "max_latency_ms = -5.0"), ["'budget.max_latency_ms'", "positive"]),
    "zero-bundle-budget": (edited("max_bundle_bytes = 200_000_000", "max_bundle_bytes = 0"), ["'budget.max_bundle_bytes'", "positive"]),
    "nan-latency-budget": (edited("max_latency_ms = 50.0", "max_latency_ms = nan"), ["'budget.max_latency_ms'", "finite"]),
    "inf-latency-budget": (edited("max_latency_ms = 50.0", "max_latency_ms = inf"), ["'budget.max_latency_ms'", "finite"]),
    "zero-threads": (edited("threads = 4", "threads = 0"), ["'runtime.threads'", "positive"]),
    "bad-arch": (edited('arch = "x86_64"', 'arch = "sparc64"'), ["'arch'", "'sparc64'", "x86_64"]),
    "bad-runtime": (edited('name = "onnxruntime"', 'name = "tensorrt"'), ["'runtime.name'", "'tensorrt'"]),
    "bad-precision": (edited('precision = "int8"', 'precision = "int4"'), ["'precision'", "'int4'"]),
    "bad-calibration": (edited('calibration = ["minmax"', 'calibration = ["kl"'), ["'quantization.calibration'", "'kl'"]),
    "empty-calibration": (
        re.sub(r"(?m)^calibration = .*$", "calibration = []", base_text()),
        ["'quantization.calibration'", "non-empty"],
    ),
    "bad-runtime-version": (edited('version = "1.20.1"', 'version = "latest"'), ["'runtime.version'", "'latest'"]),
    "bad-name": (edited(f'name = "{BASE}"', 'name = "../../etc"'), ["'name'"]),
    "missing-runtime-table": (without_table("runtime"), ["'runtime'", "missing"]),
    "missing-budget-field": (
        re.sub(r"(?m)^max_runtime_memory_mb = .*\n", "", base_text()),
        ["'budget.max_runtime_memory_mb'", "missing"],
    ),
    "missing-top-level-field": (re.sub(r"(?m)^ram_mb = .*\n", "", base_text()), ["'ram_mb'", "missing"]),
}


@pytest.mark.parametrize("case", sorted(BAD_PROFILES))
def test_bad_profile_is_refused_naming_field_and_reason(tmp_path, case):
    text, fragments = BAD_PROFILES[case]
    tomllib.loads(text)  # the case is about content, not syntax
    path = write(tmp_path, text)
    with pytest.raises(EdgeopsError) as info:
        load_profile(path)
    message = str(info.value)
    assert "\n" not in message
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message


@pytest.mark.parametrize("case", ["typo-budget", "wrong-type-int", "negative-budget", "bad-arch", "missing-runtime-table"])
def test_cli_bad_profile_is_one_line_error(tmp_path, cli_error, case):
    text, fragments = BAD_PROFILES[case]
    line = cli_error("profiles", "show", write(tmp_path, text))
    for fragment in fragments:
        assert fragment in line


def test_invalid_toml_is_refused(tmp_path, cli_error):
    path = write(tmp_path, edited('cores = 4', 'cores = = 4'))
    with pytest.raises(EdgeopsError, match="not valid TOML"):
        load_profile(path)
    line = cli_error("profiles", "show", path)
    assert "not valid TOML" in line and str(path) in line


def test_non_utf8_profile_is_refused(tmp_path):
    path = tmp_path / "board.toml"
    path.write_bytes(b'name = "\xff\xfe"\n')
    with pytest.raises(EdgeopsError, match="cannot read profile"):
        load_profile(path)


def test_missing_toml_path_is_refused(tmp_path, cli_error):
    line = cli_error("profiles", "show", tmp_path / "nope.toml")
    assert "does not exist" in line


def test_unknown_profile_name_suggests_the_closest(cli_error):
    with pytest.raises(EdgeopsError, match="did you mean 'rpi4'"):
        load_profile("rpi44")
    line = cli_error("profiles", "show", "rpi44")
    assert "unknown profile 'rpi44'" in line
    assert "did you mean 'rpi4'" in line


def test_unknown_profile_name_without_close_match_points_to_the_list(cli_error):
    line = cli_error("profiles", "show", "zzzzzzzz")
    assert "unknown profile 'zzzzzzzz'" in line
    assert "did you mean" not in line
    assert "edgeops profiles list" in line
