"""Hardware profiles: what a device can run and what a build for it must meet.

A profile is a TOML file. The shipped ones live in `edgeops/firmware_profiles/`; a user may pass the
path of their own. Parsing is strict: an unknown key, a wrong type or an out-of-range value is
rejected with the field's name and the reason, because a typo in a budget would otherwise pass
silently and ship a model that does not fit the device.
"""

from __future__ import annotations

import difflib
import math
import tomllib
from dataclasses import MISSING, asdict, dataclass, fields
from importlib import resources
from pathlib import Path
from typing import Any

from edgeops.protocol.errors import EdgeopsError

ARCHES = ("aarch64", "armv7l", "x86_64")
RUNTIMES = ("onnxruntime", "litert", "tflite-runtime")
PRECISIONS = ("int8", "fp16", "fp32")
QUANT_FORMATS = ("qdq", "qoperator")
INT8_TYPES = ("int8", "uint8")
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")


@dataclass(frozen=True)
class Runtime:
    name: str
    version: str
    threads: int


@dataclass(frozen=True)
class Budget:
    max_bundle_bytes: int
    max_runtime_memory_mb: int
    max_latency_ms: float


@dataclass(frozen=True)
class Quantization:
    format: str = "qdq"
    activation_type: str = "uint8"
    weight_type: str = "int8"
    per_channel: bool = True
    reduce_range: bool = False
    calibration: tuple[str, ...] = ("minmax", "entropy", "percentile")


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    arch: str
    cpu: str
    cores: int
    ram_mb: int
    precision: str
    runtime: Runtime
    budget: Budget
    quantization: Quantization = Quantization()
    accelerator: str = ""
    datasheet: str = ""
    source: str = ""

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["quantization"]["calibration"] = list(self.quantization.calibration)
        return data


def _fail(where: str, field: str, reason: str) -> EdgeopsError:
    return EdgeopsError(f"profile {where}: field {field!r} {reason}")  # repr: a key may hold a newline


def _check_keys(where: str, prefix: str, table: dict, cls: type) -> None:
    known = [f.name for f in fields(cls) if f.name != "source"]
    for key in table:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f" (known: {', '.join(known)})"
            raise _fail(where, prefix + key, "is not a profile field" + hint)
    for field in fields(cls):
        if field.default is MISSING and field.name not in table:
            raise _fail(where, prefix + field.name, "is missing")


def _typed(where: str, field: str, value: Any, kind: type) -> Any:
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        try:
            value = float(value)
        except OverflowError:  # TOML integers are unbounded in tomllib
            raise _fail(where, field, f"is too large ({len(str(abs(value)))} digits)") from None
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise _fail(where, field, f"must be {kind.__name__}, got {type(value).__name__} {value!r}")
    return value


def _choice(where: str, field: str, value: Any, allowed: tuple[str, ...]) -> str:
    value = _typed(where, field, value, str)
    if value not in allowed:
        raise _fail(where, field, f"is {value!r}; expected one of {', '.join(allowed)}")
    return value


def _positive(where: str, field: str, value: Any, kind: type) -> Any:
    value = _typed(where, field, value, kind)
    if isinstance(value, float) and not math.isfinite(value):  # nan would compare false with every measurement and disable the budget
        raise _fail(where, field, f"must be a finite number, got {value}")
    if value <= 0:
        raise _fail(where, field, f"must be positive, got {value}")
    return value


def _table(where: str, data: dict, key: str, cls: type) -> dict:
    table = data.get(key, {})
    if not isinstance(table, dict):
        raise _fail(where, key, "must be a table")
    _check_keys(where, key + ".", table, cls)
    return table


def parse_profile(data: dict, where: str = "<memory>") -> Profile:
    """Validate a profile's TOML table and return it; raise EdgeopsError naming the bad field."""
    _check_keys(where, "", data, Profile)
    rt = _table(where, data, "runtime", Runtime)
    budget = _table(where, data, "budget", Budget)
    quant = _table(where, data, "quantization", Quantization)
    name = _typed(where, "name", data["name"], str)
    if not name or not all(c.isalnum() or c in "-_." for c in name):
        raise _fail(where, "name", "must be letters, digits, '-', '_' or '.'")
    calibration = quant.get("calibration", list(Quantization.calibration))
    if not isinstance(calibration, list) or not calibration:
        raise _fail(where, "quantization.calibration", "must be a non-empty list")
    for method in calibration:
        _choice(where, "quantization.calibration", method, CALIBRATION_METHODS)
    return Profile(
        name=name,
        description=_typed(where, "description", data["description"], str),
        arch=_choice(where, "arch", data["arch"], ARCHES),
        cpu=_typed(where, "cpu", data["cpu"], str),
        cores=_positive(where, "cores", data["cores"], int),
        ram_mb=_positive(where, "ram_mb", data["ram_mb"], int),
        precision=_choice(where, "precision", data["precision"], PRECISIONS),
        accelerator=_typed(where, "accelerator", data.get("accelerator", ""), str),
        datasheet=_typed(where, "datasheet", data.get("datasheet", ""), str),
        runtime=Runtime(
            name=_choice(where, "runtime.name", rt["name"], RUNTIMES),
            version=_version(where, "runtime.version", rt["version"]),
            threads=_positive(where, "runtime.threads", rt["threads"], int),
        ),
        budget=Budget(
            max_bundle_bytes=_positive(where, "budget.max_bundle_bytes", budget["max_bundle_bytes"], int),
            max_runtime_memory_mb=_positive(
                where, "budget.max_runtime_memory_mb", budget["max_runtime_memory_mb"], int
            ),
            max_latency_ms=_positive(where, "budget.max_latency_ms", budget["max_latency_ms"], float),
        ),
        quantization=Quantization(
            format=_choice(where, "quantization.format", quant.get("format", "qdq"), QUANT_FORMATS),
            activation_type=_choice(
                where, "quantization.activation_type", quant.get("activation_type", "uint8"), INT8_TYPES
            ),
            weight_type=_choice(where, "quantization.weight_type", quant.get("weight_type", "int8"), INT8_TYPES),
            per_channel=_typed(where, "quantization.per_channel", quant.get("per_channel", True), bool),
            reduce_range=_typed(where, "quantization.reduce_range", quant.get("reduce_range", False), bool),
            calibration=tuple(calibration),
        ),
        source=where,
    )


def _version(where: str, field: str, value: Any) -> str:
    value = _typed(where, field, value, str)
    parts = value.split(".")
    if not (2 <= len(parts) <= 3) or not all(p.isdigit() for p in parts):
        raise _fail(where, field, f"must look like 1.18 or 1.18.0, got {value!r}")
    return value


def version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.split(".")[:3])


def _shipped_dir() -> Path:
    return Path(str(resources.files("edgeops") / "firmware_profiles"))


def shipped_profile_names() -> list[str]:
    return sorted(p.stem for p in _shipped_dir().glob("*.toml"))


def load_profile(name_or_path: str | Path) -> Profile:
    """Load a shipped profile by name, or a user's profile from a .toml path."""
    candidate = Path(name_or_path)
    names = shipped_profile_names()
    if candidate.suffix == ".toml":
        path = candidate
    elif str(name_or_path) in names:
        # A shipped name wins over a same-named file or folder in the working directory (e.g. `-o rpi4`).
        path = _shipped_dir() / f"{name_or_path}.toml"
    else:
        path = candidate
        if not candidate.is_file():
            close = difflib.get_close_matches(str(name_or_path), names, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise EdgeopsError(
                f"unknown profile '{name_or_path}': {hint}see `edgeops profiles list`, or pass a .toml path"
            )
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise EdgeopsError(f"profile file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise EdgeopsError(f"cannot read profile {path}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise EdgeopsError(f"profile {path} is not valid TOML: {exc}") from None
    return parse_profile(data, where=str(path))


def list_profiles() -> list[Profile]:
    return [load_profile(name) for name in shipped_profile_names()]
