"""The MQTT wire protocol between the fleet and its agents (docs/protocol.md is the reference).

Every topic lives under `edgeops/v1/devices/{device_id}/`, so a broker ACL can confine a device to
its own subtree. Payloads are UTF-8 JSON objects, except block replies, which carry a JSON header
line, a newline, then raw bytes (base64 would cost a third more on constrained links).

Invariants: parsing never trusts a payload: anything malformed raises `WireError` with the reason,
and the caller drops that message and keeps running. Nothing here is security-critical: what a
device installs is decided by signed TUF metadata, never by these messages alone.
"""

from __future__ import annotations

import json
import re
from typing import Any

from edgeops.protocol.errors import EdgeopsError

PREFIX = "edgeops/v1/devices"
DEVICE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# The leaves a device publishes and the ones it subscribes to, under its own id only (the broker ACL).
DEVICE_PUBLISHES = ("state", "fetch", "telemetry")
DEVICE_SUBSCRIBES = ("desired", "blocks")
MAX_BLOCK = 128 * 1024
MAX_JSON_PAYLOAD = 64 * 1024
# What a device may fetch: TUF metadata and content-addressed targets, nothing else.
FETCH_PATH = re.compile(r"^(metadata/([0-9]+\.)?(root|targets|snapshot|timestamp)\.json|targets/[0-9a-f]{64}\.[A-Za-z0-9._-]{1,200})$")

# Execution states of one device for one release (design.md, Fleet).
STATES = ("queued", "downloading", "verifying", "installing", "self-test", "active",
          "failed", "rolled-back", "rejected", "timed-out", "cancelled")


class WireError(EdgeopsError):
    """A message that does not follow the protocol; it is dropped, never acted on."""


def topic(device_id: str, leaf: str) -> str:
    return f"{PREFIX}/{device_id}/{leaf}"


def parse_topic(name: str) -> tuple[str, str]:
    """(device id, leaf) of a topic under the prefix; WireError for anything else."""
    parts = name.split("/")
    if len(parts) != 5 or "/".join(parts[:3]) != PREFIX or not DEVICE_ID.match(parts[3]):
        raise WireError(f"not an edgeops device topic: {name!r}")
    return parts[3], parts[4]


def encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message, sort_keys=True, separators=(",", ":")).encode()


def decode(payload: bytes, required: dict[str, type]) -> dict[str, Any]:
    """Parse a JSON object payload and check the required fields' types."""
    if len(payload) > MAX_JSON_PAYLOAD:
        raise WireError(f"payload of {len(payload)} bytes is larger than {MAX_JSON_PAYLOAD}")
    try:
        message = json.loads(payload)
    except (UnicodeDecodeError, ValueError) as exc:
        raise WireError(f"payload is not JSON ({exc})") from None
    if not isinstance(message, dict):
        raise WireError("payload is not a JSON object")
    for field, kind in required.items():
        value = message.get(field)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise WireError(f"field '{field}' must be {kind.__name__}")
    return message


def fetch_request(request_id: int, path: str, offset: int, length: int = MAX_BLOCK) -> bytes:
    return encode({"req": request_id, "path": path, "offset": offset, "length": length})


def parse_fetch_request(payload: bytes) -> dict[str, Any]:
    message = decode(payload, {"req": int, "path": str, "offset": int, "length": int})
    if not FETCH_PATH.fullmatch(message["path"]):
        raise WireError(f"path {message['path']!r} is not fetchable")
    if message["offset"] < 0 or not 0 < message["length"] <= MAX_BLOCK:
        raise WireError("offset must be >= 0 and length between 1 and 131072")
    return message


def block_reply(request_id: int, path: str, offset: int, total: int, data: bytes) -> bytes:
    return encode({"req": request_id, "path": path, "offset": offset, "total": total}) + b"\n" + data


def error_reply(request_id: int, path: str, error: str) -> bytes:
    return encode({"req": request_id, "path": path, "error": error}) + b"\n"


def parse_block_reply(payload: bytes) -> tuple[dict[str, Any], bytes]:
    """(header, data); the header has `error` instead of `offset`/`total` when the fetch failed."""
    head, sep, data = payload.partition(b"\n")
    if not sep:
        raise WireError("block reply has no header line")
    header = decode(head, {"req": int, "path": str})
    if "error" not in header:
        offset, total = header.get("offset"), header.get("total")
        if not isinstance(offset, int) or not isinstance(total, int) or not 0 <= offset <= total:
            raise WireError("block reply needs integer offset <= total")
        if len(data) > MAX_BLOCK or offset + len(data) > total:
            raise WireError("block reply carries more data than announced")
    return header, data
