"""Client of the fleet's HTTP API (edgeops.fleet.api) for `edgeops push/status --fleet URL`; urllib only.

Invariants: every failure — no token, unreachable server, an error answer, an answer that is not
JSON — is one EdgeopsError naming the fleet URL and, when the server gave one, its reason. Bundles
are streamed from their files as multipart/form-data, never read whole into memory. An HTTPS
server's certificate is checked against the CA file `--ca` / EDGEOPS_CA names (the fleet's
pki/ca.pem for `fleet serve`'s own certificate), else the system's trust store; the host name is
always checked. A certificate refused is one line saying which CA to pass.
"""

from __future__ import annotations

import json
import os
import secrets
import ssl
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from edgeops.protocol.errors import EdgeopsError

TOKEN_ENV = "EDGEOPS_TOKEN"
CA_ENV = "EDGEOPS_CA"
ca_file: str | None = None  # set by the CLI's --ca; else EDGEOPS_CA; else the system's trust store
STATUS_TIMEOUT_S = 30
PUSH_TIMEOUT_S = 600  # per socket operation: the server reads, verifies and signs every bundle before it answers


def is_url(fleet: str) -> bool:
    """Whether `--fleet` names an API (http:// or https://) rather than a fleet directory."""
    return fleet.startswith(("http://", "https://"))


def push(url: str, token: str | None, bundles: list[Path], selector: dict[str, str], plan: dict[str, Any] | None = None) -> int:
    """Upload bundles of one model version as a release (POST /v1/releases) rolled out under `plan`
    (`Plan.to_dict()`; default: the server's safe defaults); return the release id."""
    paths = list(map(Path, bundles))
    for path in paths:
        try:
            path.stat()
        except OSError as exc:
            raise EdgeopsError(f"cannot read bundle {path}: {exc.strerror}") from None
    fields = {"select": json.dumps(selector), **({"plan": json.dumps(_as_settings(plan))} if plan else {})}
    body, length, content_type = multipart(fields, paths)
    answer = _call(url, token, "POST", "/v1/releases", body, PUSH_TIMEOUT_S,
                   {"Content-Type": content_type, "Content-Length": str(length)})
    return answer["release"]


def multipart(fields: dict[str, str], bundles: list[Path]) -> tuple[Iterable[bytes], int, str]:
    """A multipart/form-data body of text `fields` and `bundle` file parts, as chunks read from the
    files while sent, its length, and its content type."""
    boundary = secrets.token_hex(16)
    heads = [f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
             for name, value in fields.items()]
    parts = [(f'--{boundary}\r\nContent-Disposition: form-data; name="bundle"; filename="{path.name}"\r\n'
              "Content-Type: application/octet-stream\r\n\r\n").encode() for path in bundles]
    tail = f"--{boundary}--\r\n".encode()
    length = sum(map(len, heads)) + sum(len(p) + path.stat().st_size + 2 for p, path in zip(parts, bundles)) + len(tail)

    def chunks() -> Iterator[bytes]:
        yield from heads
        for part, path in zip(parts, bundles):
            yield part
            with path.open("rb") as fh:
                while chunk := fh.read(1 << 20):
                    yield chunk
            yield b"\r\n"
        yield tail

    return chunks(), length, f"multipart/form-data; boundary={boundary}"


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


def audit(url: str, token: str | None, limit: int) -> list[dict[str, Any]]:
    """The latest `limit` audit entries, newest first (GET /v1/audit), as `edgeops.fleet.audit.entries` returns them."""
    return _call(url, token, "GET", f"/v1/audit?limit={limit}", None, STATUS_TIMEOUT_S)["entries"]


def devices(url: str, token: str | None, page: int | None = None, **filters: str) -> Iterator[dict[str, Any]]:
    """Every device matching `filters` (online, state, q: as GET /v1/devices takes them), by id,
    fetched a page of `page` devices at a time (default: the server's) by following `next`."""
    after: str | None = ""
    while after is not None:
        query = {**filters, **({"limit": str(page)} if page else {}), **({"after": after} if after else {})}
        answer = _call(url, token, "GET", f"/v1/devices?{urlencode(query)}", None, STATUS_TIMEOUT_S)
        yield from answer["devices"]
        after = answer["next"]


def _call(url: str, token: str | None, method: str, path: str, body: Any, timeout: float,
          headers: dict[str, str] | None = None) -> Any:
    """`body`: JSON, or chunks with their `headers`. Reads may need no token (the server says); changes do."""
    if not token and method != "GET":
        raise EdgeopsError(f"changing the fleet through its API needs a token: pass --token or set {TOKEN_ENV} "
                           "(`edgeops operator add NAME --role operator --fleet DIR` issues one)")
    headers = {"Accept": "application/json", **({"Authorization": f"Bearer {token}"} if token else {}), **(headers or {})}
    data = body
    if body is not None and "Content-Type" not in headers:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    request = urllib.request.Request(url.rstrip("/") + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=tls_context()) as response:
            raw = response.read()
    except urllib.error.HTTPError as exc:
        raise EdgeopsError(f"fleet API at {url} refused {method} {path}: {_reason(exc)} (HTTP {exc.code})") from None
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, ssl.SSLCertVerificationError):
            raise EdgeopsError(_untrusted(url, exc.reason)) from None
        raise EdgeopsError(f"cannot reach the fleet API at {url}: {exc.reason}") from None
    except ssl.SSLCertVerificationError as exc:
        raise EdgeopsError(_untrusted(url, exc)) from None
    except OSError as exc:  # timeout or reset after connecting
        hint = "; `fleet serve` speaks HTTPS unless --plain-http: try https://" if url.startswith("http://") else ""
        raise EdgeopsError(f"fleet API at {url} failed during {method} {path}: {exc}{hint}") from None
    except ValueError as exc:  # http.client.InvalidURL
        raise EdgeopsError(f"bad fleet URL {url}: {exc}") from None
    try:
        return json.loads(raw)
    except ValueError:
        raise EdgeopsError(f"{url} did not answer JSON; is it an edgeops fleet API?") from None


def tls_context() -> ssl.SSLContext:
    """What HTTPS answers are checked against: --ca, else EDGEOPS_CA, else the system's trust store."""
    cafile = ca_file or os.environ.get(CA_ENV) or None
    try:
        return ssl.create_default_context(cafile=cafile)
    except (OSError, ssl.SSLError) as exc:
        raise EdgeopsError(f"cannot use {cafile} as the fleet's CA (--ca or {CA_ENV}): "
                           f"{getattr(exc, 'strerror', None) or exc}") from None


def _untrusted(url: str, exc: ssl.SSLCertVerificationError) -> str:
    cafile = ca_file or os.environ.get(CA_ENV)
    why = exc.verify_message or str(exc)
    if "mismatch" in why.lower() or "not valid for" in why.lower():
        return (f"the fleet API at {url} has a certificate for other names ({why}): reach it by a name the "
                "certificate covers, or add this one with `edgeops fleet certs DIR --api-host NAME` and restart "
                "`fleet serve`")
    against = f"the CA in {cafile}" if cafile else "this machine's trusted CAs"
    return (f"the fleet API at {url} presented a certificate not signed by {against} ({why}): pass "
            f"--ca FLEET_DIR/pki/ca.pem (or set {CA_ENV}) for the fleet's own certificate")


def _reason(exc: urllib.error.HTTPError) -> str:
    try:
        return str(json.loads(exc.read())["error"])
    except (ValueError, KeyError, TypeError, OSError):
        return str(exc.reason)
