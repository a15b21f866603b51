"""Your own task metric: `--metric PATH.py:FUNCTION`.

The function is called as `FUNCTION(fp32, candidate, data)`: the fp32 model's and the candidate's
outputs on the eval data (dicts from output name to an array whose first axis is the sample), and
`data`, every array of the eval .npz that is not a model input (`labels` and whatever the task needs,
first axis aligned). It returns one float, higher is better; the fp32 model's own score,
`FUNCTION(fp32, fp32, data)`, is what the drop is measured from.

It runs inside the build's sandboxed process (compiler/sandbox.py), imported as `python FILE` would
(its folder first on sys.path). The arrays it gets are read-only: an in-place edit would change what
every later candidate is compared with. Invariant: a metric that cannot be loaded, raises or exits,
returns something other than one finite number, or runs longer than EDGEOPS_METRIC_TIMEOUT seconds
(default 600) per call or import ends the build with one line naming the function. The deadline is a
SIGALRM: a long call into native code (numpy, onnxruntime) is interrupted only when it returns.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import signal
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from edgeops.compiler.metrics import MetricError
from edgeops.protocol.errors import EdgeopsError

DEFAULT_TIMEOUT_S = 600
MAX_SCORE = 1e100  # so that drops stay finite and the report stays valid JSON


def is_user_metric(spec: str) -> bool:
    path, sep, function = spec.rpartition(":")
    return bool(sep) and path.endswith(".py") and bool(function)


class _TimedOut(BaseException):
    """A BaseException, so that a metric's own `except Exception` does not swallow the deadline."""


@contextlib.contextmanager
def _deadline(seconds: float) -> Iterator[None]:
    """Interrupt the call after `seconds` (SIGALRM: only in the main thread, where builds run)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum: int, frame: Any) -> None:
        raise _TimedOut

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds, 1.0)  # and again each second, should one be swallowed
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
        raise EdgeopsError(f"EDGEOPS_METRIC_TIMEOUT must be more than 0 and under 10,000,000 seconds, got {value:g}")
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
    def load(cls, spec: str) -> UserMetric:
        """Import PATH.py and find FUNCTION in it, or raise EdgeopsError saying what is wrong."""
        path_text, _, function_name = spec.rpartition(":")
        path = Path(path_text).expanduser()
        if not path.exists():
            raise EdgeopsError(f"--metric {spec}: {path} does not exist")
        if not path.is_file():
            raise EdgeopsError(f"--metric {spec}: {path} is not a file")
        timeout = _timeout()
        module_name = f"edgeops_user_metric_{path.stem}"
        module_spec = importlib.util.spec_from_file_location(module_name, path)
        if module_spec is None or module_spec.loader is None:
            raise EdgeopsError(f"--metric {spec}: {path} cannot be imported as Python")
        module = importlib.util.module_from_spec(module_spec)
        # As `python FILE` would: modules beside it import, and dataclasses find their module.
        sys.path.insert(0, str(path.parent.resolve()))
        sys.modules[module_name] = module
        try:
            with _deadline(timeout):
                module_spec.loader.exec_module(module)
        except _TimedOut:
            raise MetricError(f"--metric {spec}: importing {path} took longer than {timeout:g} s") from None
        except BaseException as exc:  # the user's file may raise anything on import, exit included
            sys.modules.pop(module_name, None)
            raise MetricError(f"--metric {spec}: importing {path} failed: {type(exc).__name__}: {_line(exc)}") from None
        function = getattr(module, function_name, None)
        if not callable(function):
            raise EdgeopsError(f"--metric {spec}: {path} has no function {function_name!r}")
        return cls(spec, function, timeout, name=f"{path.name}:{function_name}")

    def score(self, reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray], data: dict[str, np.ndarray]) -> float:
        try:
            with _deadline(self.timeout_s):
                value = self.function(dict(reference), dict(candidate), dict(data))
                number = _number(value)
        except _TimedOut:
            raise MetricError(f"metric {self.spec} ran longer than {self.timeout_s:g} s "
                              "(set EDGEOPS_METRIC_TIMEOUT for a slower one)") from None
        except BaseException as exc:  # whatever the user's code raises or exits with ends the build in one line
            raise MetricError(f"metric {self.spec} raised {type(exc).__name__}: {_line(exc)}") from None
        if number is None:
            raise MetricError(f"metric {self.spec} returned {_short(value)}; it must return one finite number "
                              f"(at most {MAX_SCORE:g} either way), higher is better")
        return number


def _number(value: Any) -> float | None:
    """The metric's value as a float, or None when it is not one finite number of a sane size."""
    if isinstance(value, (bool, np.bool_)) or np.ndim(value) != 0:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return number if math.isfinite(number) and abs(number) <= MAX_SCORE else None


def _line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else "(no message)"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
