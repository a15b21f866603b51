"""The model apps talk to: validated inference on the active model, swapped without dropping a request.

Invariants:
- `infer` validates the feed against the manifest (names, dtypes, shapes; symbolic dimensions take
  any size) before the runtime sees it, so a bad request is an InvalidInput with the reason, never
  a runtime crash;
- the served model is one reference, replaced in a single assignment by `swap`: a request takes the
  reference once and finishes on that model, so a swap under live traffic drops nothing, and the
  old model is freed when its last request returns;
- every call, served, refused by the runtime or refused as invalid input, is handed to `observe`
  (the outbox recorder) after the answer is computed, without waiting on disk: what the device
  records never slows what it serves. Refused inputs count as errors: after an update, a model
  whose inputs the apps cannot meet is failing them, and the fleet's health gates must see that;
- floating-point inputs holding NaN or ±Infinity are refused unless `Limits.allow_nonfinite`;
- every bound on what one request may ask of the agent is a field of `Limits`, set from device.json
  (docs/agent.md, "Limits"); the HTTP API (agent/http_api.py) enforces the size bounds before it
  allocates anything a request declares.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from edgeops.agent import runtime
from edgeops.agent.slots import ActiveModel
from edgeops.protocol.bundle import read_bundle
from edgeops.protocol.errors import EdgeopsError

log = logging.getLogger(__name__)


class InvalidInput(EdgeopsError):
    """The request does not fit the model's inputs (HTTP 400)."""


class TooLarge(EdgeopsError):
    """The request is over one of the agent's Limits (HTTP 413)."""


class NoModel(EdgeopsError):
    """No model is installed yet (HTTP 503)."""


@dataclass(frozen=True)
class Limits:
    """What one inference request may ask of the agent: device.json "agent" settings of the same names."""

    max_batch: int = 1024  # samples (the first dimension of each input) per request
    max_input_bytes: int = 8 * 1024 * 1024  # a request's arrays, decoded, all inputs together
    max_concurrent: int = 4  # requests read and run at once; more wait briefly, then get 429
    allow_nonfinite: bool = False  # accept NaN and ±Infinity in floating-point inputs

    def __post_init__(self) -> None:
        for name, low, high in (("max_batch", 1, 2**31), ("max_input_bytes", 1024, 2**40), ("max_concurrent", 1, 1024)):
            if not low <= getattr(self, name) <= high:
                raise EdgeopsError(f"agent.{name} must be {low} to {high}, not {getattr(self, name)}; fix device.json")


@dataclass(frozen=True)
class Served:
    """A loaded model with what is needed to check requests and describe results."""

    manifest: dict[str, Any]
    model: runtime.Model
    slot: str
    inputs: dict[str, tuple[np.dtype, tuple[int | None, ...]]]  # name -> (dtype, shape; None = any size)
    reference: dict[str, Any] | None = None  # the bundle's drift baseline (reference.json)

    @property
    def name(self) -> str:
        return self.manifest["name"]

    @property
    def version(self) -> str:
        return self.manifest["version"]

    def classifier_output(self) -> str | None:
        index = self.manifest.get("classifier_output")
        outputs = self.manifest.get("outputs") or []
        return outputs[index]["name"] if isinstance(index, int) and 0 <= index < len(outputs) else None


class Observation(NamedTuple):
    """One inference call as the recorder sees it (a tuple: it is made on every call)."""

    served: Served
    feed: Mapping[str, np.ndarray]
    outputs: Mapping[str, np.ndarray] | None
    latency_ms: float
    error: str | None
    t: float


class Serving:
    def __init__(self, observe: Callable[[Observation], None] | None = None, threads: int = 1,
                 limits: Limits = Limits()):
        self.limits = limits
        self._served: Served | None = None
        self._observe = observe
        self._threads = threads

    @property
    def served(self) -> Served | None:
        return self._served

    def swap(self, active: ActiveModel | None) -> None:
        """Serve `active` (already verified and self-tested by the slot store) from now on."""
        if active is None:
            self._served = None
            return
        bundle = read_bundle(active.path)  # one read for the model and the drift reference
        model = runtime.load(bundle.model_bytes, active.manifest, self._threads)
        inputs = {spec["name"]: (np.dtype(spec["dtype"]), tuple(d if isinstance(d, int) else None for d in spec["shape"]))
                  for spec in active.manifest["inputs"]}
        self._served = Served(active.manifest, model, active.slot, inputs, bundle.reference())
        log.info("serving %s %s from slot %s", active.manifest["name"], active.manifest["version"], active.slot)

    def refused(self, served: Served, exc: InvalidInput) -> None:
        """Record a request refused as invalid input (counted: a model whose inputs apps cannot meet is failing them)."""
        if self._observe is not None:
            self._observe(Observation(served, {}, None, 0.0, f"invalid input: {exc}", time.time()))

    def infer(self, feed: Mapping[str, Any]) -> tuple[Served, dict[str, np.ndarray]]:
        """Run the served model on `feed` (input name -> array); returns the model used and its outputs."""
        served = self._served  # taken once: a swap during this call does not affect it
        if served is None:
            raise NoModel("no model is installed yet; push a release to this device")
        try:
            arrays = validate(feed, served.inputs, self.limits.allow_nonfinite)
        except InvalidInput as exc:
            self.refused(served, exc)
            raise
        start = time.perf_counter()
        error = outputs = None
        try:
            outputs = served.model.run(arrays)
            return served, outputs
        except EdgeopsError as exc:
            error = str(exc)
            raise
        finally:
            if self._observe is not None:
                self._observe(Observation(served, arrays, outputs, (time.perf_counter() - start) * 1000.0,
                                          error, time.time()))


def validate(feed: Mapping[str, Any], inputs: dict[str, tuple[np.dtype, tuple[int | None, ...]]],
             allow_nonfinite: bool = False) -> dict[str, np.ndarray]:
    """The feed as arrays of the model's dtypes; InvalidInput naming the input and the reason.

    `inputs` maps each input name to its dtype and shape (None: a dimension of any size)."""
    if feed.keys() != inputs.keys():
        missing, unknown = sorted(inputs.keys() - feed.keys()), sorted(feed.keys() - inputs.keys())
        raise InvalidInput("; ".join(filter(None, [
            f"missing input(s) {', '.join(missing)}" if missing else "",
            f"unknown input(s) {', '.join(map(str, unknown))}" if unknown else ""])) + f" (the model takes {', '.join(inputs)})")
    arrays = {}
    for name, (dtype, shape) in inputs.items():
        value = feed[name]
        if type(value) is not np.ndarray or value.dtype != dtype:
            value = _as_array(name, value, dtype)
        check_shape(name, value.shape, shape)
        if not allow_nonfinite and value.dtype.kind in "fc" and not np.isfinite(value).all():
            raise InvalidInput(f"input {name} holds NaN or Infinity; send finite numbers (or set agent.allow_nonfinite)")
        arrays[name] = value
    return arrays


def check_shape(name: str, got: tuple[int, ...], shape: tuple[int | None, ...]) -> None:
    """InvalidInput unless `got` fits the model's `shape` (None: any size) and is not empty."""
    if len(got) != len(shape) or any(d is not None and d != n for d, n in zip(shape, got)):
        raise InvalidInput(f"input {name} has shape {list(got)}, the model takes {['N' if d is None else d for d in shape]}")
    if 0 in got:
        raise InvalidInput(f"input {name} is empty")


def _as_array(name: str, value: Any, dtype: np.dtype) -> np.ndarray:
    if isinstance(value, np.ndarray):
        if not np.can_cast(value.dtype, dtype, casting="same_kind"):
            raise InvalidInput(f"input {name} is {value.dtype}, the model takes {dtype}")
        return value.astype(dtype)
    try:
        return np.asarray(value, dtype=dtype)
    except (ValueError, TypeError, OverflowError) as exc:
        raise InvalidInput(f"input {name} is not an array of {dtype} ({exc})") from None
