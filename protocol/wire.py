"""The MQTT wire protocol between the fleet and its agents (docs/protocol.md is the reference).

A device's topics live under `edgeops/v1/devices/{device_id}/`, so a broker ACL can confine a device
to its own subtree; the only shared topics are the read-only target streams
`edgeops/v1/streams/{sha256}`, on which the fleet broadcasts each requested block of a target once,
whatever the number of devices downloading it. Payloads are UTF-8 JSON objects, except blocks, which
carry a JSON header line, a newline, then raw bytes (base64 would cost a third more on constrained links).

Invariants: parsing never trusts a payload: anything malformed raises `WireError` with the reason,
and the caller drops that message and keeps running. Nothing here is security-critical: what a
device installs is decided by signed TUF metadata, never by these messages alone.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterable
from typing import Any

from edgeops.protocol.errors import EdgeopsError

PREFIX = "edgeops/v1/devices"
STREAMS = "edgeops/v1/streams"
DEVICE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# The leaves a device publishes and the ones it subscribes to, under its own id only (the broker ACL).
DEVICE_PUBLISHES = ("state", "fetch", "telemetry")
DEVICE_SUBSCRIBES = ("desired", "blocks", "acks", "cert")
MAX_BLOCK = 128 * 1024
MAX_JSON_PAYLOAD = 64 * 1024
MAX_TELEMETRY_PAYLOAD = 256 * 1024
TELEMETRY_KINDS = ("inference", "metrics", "drift", "sample")
MAX_COUNT = 2**53  # seqs and drop counters: exact as JSON numbers everywhere, and within SQLite's integers
# What a device may fetch: TUF metadata and content-addressed targets, nothing else.
FETCH_PATH = re.compile(r"^(metadata/([0-9]+\.)?(root|targets|snapshot|timestamp)\.json|targets/[0-9a-f]{64}\.[A-Za-z0-9._-]{1,200})$")
TARGET_PATH = re.compile(r"^targets/(?P<sha256>[0-9a-f]{64})\.[A-Za-z0-9._-]{1,200}$")
# In signed timestamp metadata: when the fleet signed it (UTC, "YYYY-MM-DDTHH:MM:SSZ"), a lower bound
# on the time that devices keep as their time floor (agent/clock.py). TUF ignores fields it does not know.
ISSUED_FIELD = "x-edgeops-issued"
ISSUED_FORMAT = "%Y-%m-%dT%H:%M:%SZ"

# Execution states of one device for one release (design.md, Fleet).
STATES = ("queued", "downloading", "verifying", "installing", "self-test", "active",
          "failed", "rolled-back", "rejected", "timed-out", "cancelled")


class WireError(EdgeopsError):
    """A message that does not follow the protocol; it is dropped, never acted on."""


def topic(device_id: str, leaf: str) -> str:
    return f"{PREFIX}/{device_id}/{leaf}"


def stream_topic(target_path: str) -> str:
    """The broadcast topic of a content-addressed target (`targets/{sha256}.{name}`)."""
    match = TARGET_PATH.fullmatch(target_path)
    if match is None:
        raise WireError(f"{target_path!r} is not a content-addressed target path")
    return f"{STREAMS}/{match['sha256']}"


def parse_topic(name: str) -> tuple[str, str]:
    """(device id, leaf) of a topic under the prefix; WireError for anything else."""
    parts = name.split("/")
    if len(parts) != 5 or "/".join(parts[:3]) != PREFIX or not DEVICE_ID.match(parts[3]):
        raise WireError(f"not an edgeops device topic: {name!r}")
    return parts[3], parts[4]


def encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def decode(payload: bytes, required: dict[str, type], limit: int = MAX_JSON_PAYLOAD) -> dict[str, Any]:
    """Parse a JSON object payload and check the required fields' types. NaN and Infinity, which
    Python's json reads but JSON (and SQLite's json functions) do not, are malformed."""
    if len(payload) > limit:
        raise WireError(f"payload of {len(payload)} bytes is larger than {limit}")
    try:
        message = json.loads(payload, parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError) as exc:
        raise WireError(f"payload is not JSON ({exc})") from None
    except RecursionError:  # e.g. 60 KiB of "[": under the size limit, deeper than Python recurses
        raise WireError("payload nests too deeply") from None
    if not isinstance(message, dict):
        raise WireError("payload is not a JSON object")
    for field, kind in required.items():
        value = message.get(field)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise WireError(f"field '{field}' must be {kind.__name__}")
    return message


def telemetry_batch(device_id: str, records: list[tuple[int, str, float, str]], dropped: int,
                    watermark: int | None = None, unsequenced: int = 0) -> bytes:
    """A batch of outbox records, (seq, kind, time, JSON body) each; bodies are spliced in as stored.
    With `watermark` (the highest seq the outbox ever dropped), the batch also carries it and
    `unsequenced` (drops that never had a seq), from which the fleet counts drops exactly."""
    items = ",".join(f'{{"seq":{seq},"kind":{json.dumps(kind)},"t":{t!r},"body":{body}}}'
                     for seq, kind, t, body in records)
    drops = f'"dropped":{int(dropped)}'
    if watermark is not None:
        drops += f',"drop_watermark":{int(watermark)},"dropped_unsequenced":{int(unsequenced)}'
    return f'{{"device":{json.dumps(device_id)},{drops},"records":[{items}]}}'.encode()


def parse_telemetry(payload: bytes) -> dict[str, Any]:
    """A telemetry batch; WireError unless every record has a positive integer seq, a known kind, a
    finite time and an object body, and the drop counters are integers >= 0 (`drop_watermark` and
    `dropped_unsequenced` both or neither: agents before them send neither)."""
    message = decode(payload, {"device": str, "dropped": int, "records": list}, MAX_TELEMETRY_PAYLOAD)
    if not 0 <= message["dropped"] <= MAX_COUNT:
        raise WireError(f"'dropped' must be between 0 and {MAX_COUNT}")
    if "drop_watermark" in message or "dropped_unsequenced" in message:
        for field in ("drop_watermark", "dropped_unsequenced"):
            value = message.get(field)
            if type(value) is not int or not 0 <= value <= MAX_COUNT:
                raise WireError(f"'{field}' must be an integer between 0 and {MAX_COUNT} "
                                "('drop_watermark' and 'dropped_unsequenced' come together)")
    for record in message["records"]:
        if not isinstance(record, dict):
            raise WireError("each record must be an object")
        seq, t = record.get("seq"), record.get("t")
        if not isinstance(seq, int) or isinstance(seq, bool) or not 1 <= seq <= MAX_COUNT:
            raise WireError(f"each record needs an integer seq between 1 and {MAX_COUNT}")
        if record.get("kind") not in TELEMETRY_KINDS:
            raise WireError(f"record kind must be one of {', '.join(TELEMETRY_KINDS)}")
        if not isinstance(t, (int, float)) or isinstance(t, bool) or t != t or abs(t) == float("inf"):
            raise WireError("each record needs a finite time 't'")
        if not isinstance(record.get("body"), dict):
            raise WireError("each record needs an object 'body'")
    return message


def telemetry_ack(seqs: list[int]) -> bytes:
    """The fleet stored these records (of one batch): `{"seqs": [[first, last], ...]}`, inclusive ranges."""
    ranges: list[list[int]] = []
    for seq in sorted(set(seqs)):
        if ranges and seq == ranges[-1][1] + 1:
            ranges[-1][1] = seq
        else:
            ranges.append([seq, seq])
    return encode({"seqs": ranges})


def parse_telemetry_ack(payload: bytes, limit: int = 10_000) -> list[int]:
    """The seqs an ack names; WireError for malformed ranges or more than `limit` seqs."""
    message = decode(payload, {"seqs": list})
    seqs: list[int] = []
    for pair in message["seqs"]:
        if (not isinstance(pair, list) or len(pair) != 2 or not all(type(v) is int for v in pair)
                or not 1 <= pair[0] <= pair[1] or len(seqs) + pair[1] - pair[0] >= limit):
            raise WireError(f"'seqs' must be at most {limit} seqs as [first, last] ranges")
        seqs.extend(range(pair[0], pair[1] + 1))
    return seqs


def fetch_request(request_id: int, path: str, offset: int, length: int = MAX_BLOCK) -> bytes:
    return encode({"req": request_id, "path": path, "offset": offset, "length": length})


def stream_request(request_id: int, path: str, blocks: Iterable[int]) -> bytes:
    """Ask for blocks of a target on its stream: `want` is a bitmap, bit i (LSB first) = block i."""
    wanted = sorted(set(blocks))
    bitmap = bytearray((wanted[-1] // 8 + 1) if wanted else 0)
    for index in wanted:
        bitmap[index // 8] |= 1 << (index % 8)
    return encode({"req": request_id, "path": path, "want": base64.b64encode(bytes(bitmap)).decode()})


def parse_fetch_request(payload: bytes) -> dict[str, Any]:
    """A block request by offset, or (with `want`) a stream request, whose wanted block indices are
    returned as `blocks`."""
    message = decode(payload, {"req": int, "path": str})
    if not FETCH_PATH.fullmatch(message["path"]):
        raise WireError(f"path {message['path']!r} is not fetchable")
    if "want" in message:
        message["blocks"] = _parse_want(message["path"], message["want"])
        return message
    offset, length = message.get("offset"), message.get("length")
    if type(offset) is not int or type(length) is not int or offset < 0 or not 0 < length <= MAX_BLOCK:
        raise WireError("offset must be an integer >= 0 and length between 1 and 131072")
    return message


def _parse_want(path: str, want: Any) -> list[int]:
    if not TARGET_PATH.fullmatch(path):
        raise WireError("only targets are streamed")
    try:
        bitmap = base64.b64decode(want, validate=True) if isinstance(want, str) else None
    except ValueError:
        bitmap = None
    if bitmap is None:
        raise WireError("'want' must be a base64 bitmap")
    blocks = [i * 8 + bit for i, byte in enumerate(bitmap) if byte for bit in range(8) if byte >> bit & 1]
    if not blocks:
        raise WireError("'want' names no block")
    return blocks


def block_reply(request_id: int, path: str, offset: int, total: int, data: bytes) -> bytes:
    return encode({"req": request_id, "path": path, "offset": offset, "total": total}) + b"\n" + data


def stream_block(path: str, offset: int, total: int, data: bytes) -> bytes:
    return encode({"path": path, "offset": offset, "total": total}) + b"\n" + data


def error_reply(request_id: int, path: str, error: str) -> bytes:
    return encode({"req": request_id, "path": path, "error": error}) + b"\n"


def parse_block_reply(payload: bytes) -> tuple[dict[str, Any], bytes]:
    """(header, data); the header has `error` instead of `offset`/`total` when the fetch failed."""
    return _parse_block(payload, {"req": int, "path": str})


def parse_stream_block(payload: bytes) -> tuple[dict[str, Any], bytes]:
    """(header, data) of a block broadcast on a target's stream."""
    header, data = _parse_block(payload, {"path": str})
    if "error" in header or header["offset"] % MAX_BLOCK:
        raise WireError("a stream block starts at a multiple of 131072 and carries no error")
    return header, data


def _parse_block(payload: bytes, required: dict[str, type]) -> tuple[dict[str, Any], bytes]:
    head, sep, data = payload.partition(b"\n")
    if not sep:
        raise WireError("block has no header line")
    header = decode(head, required)
    if "error" not in header:
        offset, total = header.get("offset"), header.get("total")
        if not isinstance(offset, int) or not isinstance(total, int) or not 0 <= offset <= total:
            raise WireError("block needs integer offset <= total")
        if len(data) > MAX_BLOCK or offset + len(data) > total:
            raise WireError("block carries more data than announced")
    return header, data
