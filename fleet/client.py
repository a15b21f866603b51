"""Client of the fleet's HTTP API (edgeops.fleet.api) for `edgeops push/status --fleet URL`; urllib only.

Invariant: every failure — no token, unreachable server, an error answer, an answer that is not
JSON — is one EdgeopsError naming the fleet URL and, when the server gave one, its reason.
"""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from edgeops.protocol.errors import EdgeopsError

TOKEN_ENV = "EDGEOPS_TOKEN"
STATUS_TIMEOUT_S = 30
PUSH_TIMEOUT_S = 600  # per socket operation: the server reads, verifies and signs every bundle before it answers


def is_url(fleet: str) -> bool:
    """Whether `--fleet` names an API (http:// or https://) rather than a fleet directory."""
    return fleet.startswith(("http://", "https://"))


def push(url: str, token: str | None, bundles: list[Path], selector: dict[str, str], plan: dict[str, Any] | None = None) -> int:
    """Upload bundles of one model version as a release (POST /v1/releases) rolled out under `plan`
    (`Plan.to_dict()`; default: the server's safe defaults); return the release id."""
    items = []
    for path in map(Path, bundles):
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise EdgeopsError(f"cannot read bundle {path}: {exc.strerror}") from None
        items.append({"name": path.name, "data": base64.b64encode(data).decode("ascii")})
    answer = _call(url, token, "POST", "/v1/releases", {"bundles": items, "select": selector, **({"plan": _as_settings(plan)} if plan else {})},
                   PUSH_TIMEOUT_S)
    return answer["release"]


def status(url: str, token: str | None) -> dict[str, Any]:
    """Devices and releases (GET /v1/status), as `edgeops.fleet.registry.status` returns them."""
    return _call(url, token, "GET", "/v1/status", None, STATUS_TIMEOUT_S)


def _as_settings(plan: dict[str, Any]) -> dict[str, Any]:
    """`Plan.to_dict()` as the settings `make_plan` takes (what POST /v1/releases accepts as `plan`)."""
    return {"stages": plan["stages"], "bake": plan["bake_s"], "min_calls": plan["min_calls"],
            "abort": f"failed>{plan['abort']['failed_pct']:g}%,min={plan['abort']['min_devices']}",
            "on_failure": plan["on_failure"], "gates": plan["gates"], "deadlines": plan["deadlines_s"]}


def rollout(url: str, token: str | None, rollout_id: int) -> dict[str, Any]:
    """One rollout with its decisions (GET /v1/rollouts/ID), as `edgeops.fleet.rollout.summary` returns it."""
    return _call(url, token, "GET", f"/v1/rollouts/{rollout_id}", None, STATUS_TIMEOUT_S)


def act(url: str, token: str | None, rollout_id: int, action: str, reason: str = "") -> dict[str, Any]:
    """Pause, resume, abort or roll back a rollout (POST /v1/rollouts/ID/ACTION); the rollout after it."""
    return _call(url, token, "POST", f"/v1/rollouts/{rollout_id}/{action}", {"reason": reason} if reason else {},
                 STATUS_TIMEOUT_S)


def drift(url: str, token: str | None, model: str | None) -> dict[str, Any]:
    """The drift report with every device (GET /v1/drift?devices=all), as `edgeops.fleet.drift.report` returns it."""
    query = urlencode({"devices": "all", **({"model": model} if model else {})})
    return _call(url, token, "GET", f"/v1/drift?{query}", None, STATUS_TIMEOUT_S)


def devices(url: str, token: str | None, page: int | None = None, **filters: str) -> Iterator[dict[str, Any]]:
    """Every device matching `filters` (online, state, q: as GET /v1/devices takes them), by id,
    fetched a page of `page` devices at a time (default: the server's) by following `next`."""
    after: str | None = ""
    while after is not None:
        query = {**filters, **({"limit": str(page)} if page else {}), **({"after": after} if after else {})}
        answer = _call(url, token, "GET", f"/v1/devices?{urlencode(query)}", None, STATUS_TIMEOUT_S)
        yield from answer["devices"]
        after = answer["next"]


def _call(url: str, token: str | None, method: str, path: str, body: Any, timeout: float) -> Any:
    """Reads need no token; changes do."""
    if not token and method != "GET":
        raise EdgeopsError(f"changing the fleet through its API needs its token: pass --token or set {TOKEN_ENV} "
                           "(it is api_token in the fleet's fleet.json)")
    headers = {"Accept": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    request = urllib.request.Request(url.rstrip("/") + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            raw = response.read()
    except urllib.error.HTTPError as exc:
        raise EdgeopsError(f"fleet API at {url} refused {method} {path}: {_reason(exc)} (HTTP {exc.code})") from None
    except urllib.error.URLError as exc:
        raise EdgeopsError(f"cannot reach the fleet API at {url}: {exc.reason}") from None
    except OSError as exc:  # timeout or reset after connecting
        raise EdgeopsError(f"fleet API at {url} failed during {method} {path}: {exc}") from None
    except ValueError as exc:  # http.client.InvalidURL
        raise EdgeopsError(f"bad fleet URL {url}: {exc}") from None
    try:
        return json.loads(raw)
    except ValueError:
        raise EdgeopsError(f"{url} did not answer JSON; is it an edgeops fleet API?") from None


def _reason(exc: urllib.error.HTTPError) -> str:
    try:
        return str(json.loads(exc.read())["error"])
    except (ValueError, KeyError, TypeError, OSError):
        return str(exc.reason)
