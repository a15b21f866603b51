"""Optimization passes: one per module, each a small frozen dataclass behind the `Pass` interface.

A pass takes a model and returns a new one; it never mutates its input, so the search can branch
from the same starting point. A pass that cannot do its job on a model raises `PassError`, which
drops that candidate instead of stopping the build.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import onnx

from edgeops.compiler.data import Dataset
from edgeops.protocol.profiles import Profile


class PassError(Exception):
    """This pass does not apply to this model; the reason goes into the report."""


@dataclass(frozen=True)
class PassContext:
    profile: Profile
    calib: Dataset | None
    workdir: Path
    # Only for passes that measure quality themselves while they run (inc_tune.py); the search
    # measures every other pass's result afterwards.
    evaluation: Dataset | None = None


class Pass(Protocol):
    name: str

    def apply(self, model: onnx.ModelProto, ctx: PassContext) -> onnx.ModelProto: ...


def describe(p: Pass) -> dict[str, Any]:
    """The pass's name and settings, as the report and the manifest record them."""
    settings = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(p).items()}
    return {"pass": p.name, **settings}
