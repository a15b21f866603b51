"""Your own task metric: `--metric PATH.py:FUNCTION`.

The function is called as `FUNCTION(fp32, candidate, data)`: the fp32 model's and the candidate's
outputs on the eval data (dicts from output name to an array whose first axis is the sample), and
`data`, every array of the eval .npz that is not a model input (`labels` and whatever the task needs,
first axis aligned). It returns one float, higher is better; the fp32 model's own score,
`FUNCTION(fp32, fp32, data)`, is what the drop is measured from.

It runs inside the build's sandboxed process (compiler/sandbox.py). Invariant: a metric that cannot
be loaded, raises, returns something other than a finite number, or runs longer than
EDGEOPS_METRIC_TIMEOUT seconds (default 600) per call ends the build with one line naming the function.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from edgeops.compiler.metrics import MetricError
from edgeops.protocol.errors import EdgeopsError

DEFAULT_TIMEOUT_S = 600


def is_user_metric(spec: str) -> bool:
    path, sep, function = spec.rpartition(":")
    return bool(sep) and path.endswith(".py") and bool(function)


class _TimedOut(Exception):
    pass


@contextlib.contextmanager
def _deadline(seconds: float) -> Iterator[None]:
    """Interrupt the call after `seconds` (SIGALRM: only in the main thread, where builds run)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum: int, frame: Any) -> None:
        raise _TimedOut

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _timeout() -> float:
    try:
        value = float(os.environ.get("EDGEOPS_METRIC_TIMEOUT", DEFAULT_TIMEOUT_S))
    except ValueError:
        raise EdgeopsError("EDGEOPS_METRIC_TIMEOUT must be a number of seconds") from None
    if not 0 < value < 1e7:
        raise EdgeopsError("EDGEOPS_METRIC_TIMEOUT must be a positive number of seconds")
    return value


@dataclass(frozen=True)
class UserMetric:
    spec: str  # as written: PATH.py:FUNCTION
    function: Callable[..., Any] = field(repr=False, compare=False)
    timeout_s: float = DEFAULT_TIMEOUT_S
    output: str | None = None
    name: str = ""
    reason: str = "your own metric (--metric)"

    @classmethod
    def load(cls, spec: str) -> "UserMetric":
        """Import PATH.py and find FUNCTION in it, or raise EdgeopsError saying what is wrong."""
        path_text, _, function_name = spec.rpartition(":")
        path = Path(path_text)
        if not path.is_file():
            raise EdgeopsError(f"--metric {spec}: {path} does not exist")
        module_spec = importlib.util.spec_from_file_location(f"edgeops_user_metric_{path.stem}", path)
        if module_spec is None or module_spec.loader is None:
            raise EdgeopsError(f"--metric {spec}: {path} cannot be imported as Python")
        module = importlib.util.module_from_spec(module_spec)
        try:
            module_spec.loader.exec_module(module)
        except Exception as exc:  # the user's file may raise anything on import
            raise EdgeopsError(f"--metric {spec}: importing {path} failed: {type(exc).__name__}: {_line(exc)}") from None
        function = getattr(module, function_name, None)
        if not callable(function):
            raise EdgeopsError(f"--metric {spec}: {path} has no function {function_name!r}")
        return cls(spec, function, _timeout(), name=f"{path.name}:{function_name}")

    def score(self, reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray], data: dict[str, np.ndarray]) -> float:
        try:
            with _deadline(self.timeout_s):
                value = self.function(dict(reference), dict(candidate), dict(data))
        except _TimedOut:
            raise MetricError(f"metric {self.spec} ran longer than {self.timeout_s:g} s "
                               "(set EDGEOPS_METRIC_TIMEOUT for a slower one)") from None
        except Exception as exc:  # whatever the user's code raises ends the build in one line
            raise MetricError(f"metric {self.spec} raised {type(exc).__name__}: {_line(exc)}") from None
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)) \
                or not math.isfinite(float(value)):
            raise MetricError(f"metric {self.spec} returned {_short(value)}; it must return one finite number, higher is better")
        return float(value)


def _line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else "(no message)"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
