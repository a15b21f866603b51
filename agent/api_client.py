"""Talk to a running agent's local inference API, as `edgeops agent infer` does: it finds the API's
address in DEVICE_DIR/state/api.json, which the agent writes when it starts serving it."""

from __future__ import annotations

import io
import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

from edgeops.agent.http_api import NPY, NPZ
from edgeops.protocol.errors import EdgeopsError


def api_url(device_dir: str | Path) -> str:
    path = Path(device_dir) / "state" / "api.json"
    try:
        return json.loads(path.read_text())["url"]
    except (OSError, ValueError, KeyError, TypeError):
        raise EdgeopsError(f"no agent is serving {device_dir}; start one with `edgeops agent run {device_dir}`") from None


def infer(device_dir: str | Path, arrays: dict[str, np.ndarray] | np.ndarray, timeout: float = 30.0) -> dict[str, Any]:
    """{"model", "version", "outputs": {name: array}} from the agent serving `device_dir`; `arrays`
    by input name, or one array for a model with one input."""
    buffer = io.BytesIO()
    if isinstance(arrays, np.ndarray):
        np.save(buffer, arrays, allow_pickle=False)
    else:
        np.savez(buffer, **arrays)
    url = api_url(device_dir)
    kind = NPY if isinstance(arrays, np.ndarray) else NPZ
    request = urllib.request.Request(f"{url}/v1/infer", buffer.getvalue(), {"Content-Type": kind}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            with np.load(io.BytesIO(answer.read()), allow_pickle=False) as outputs:
                return {"model": answer.headers.get("X-Edgeops-Model"), "version": answer.headers.get("X-Edgeops-Version"),
                        "outputs": {name: outputs[name] for name in outputs.files}}
    except urllib.error.HTTPError as exc:
        try:
            reason = json.loads(exc.read()).get("error", exc.reason)
        except ValueError:
            reason = exc.reason
        raise EdgeopsError(f"the agent refused the request: {reason}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise EdgeopsError(f"cannot reach the agent's API at {url} ({exc}); is `edgeops agent run {device_dir}` running?") from None
