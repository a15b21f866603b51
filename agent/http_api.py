"""The agent's local inference API, on 127.0.0.1 by default (stdlib http.server: no web stack on the device).

    POST /v1/infer   JSON {"inputs": {name: nested lists}} -> {"model", "version", "outputs": {name: lists}}
                     application/x-npz (arrays by input name) -> application/x-npz of the outputs
                     application/x-npy (models with one input) -> application/x-npz of the outputs
    GET  /v1/health  200 {"status": "ok", ...} while a model is served, 503 {"status": "no-model"} before
    GET  /v1/model   the served model's name, version, profile, runtime, inputs and outputs

Invariants:
- a bad request gets a 4xx with {"error": reason} (binary answers carry the model in
  X-Edgeops-Model/X-Edgeops-Version headers): 400 malformed or not what the model takes, 413 over a
  limit, 429 (with Retry-After) when `max_concurrent` requests are in progress and no slot frees
  within QUEUE_S, 503 no model; no request can stop the server;
- memory is bounded per request and requests are bounded in number (agent/serving.Limits): a slot
  is taken before the body is read; the body's Content-Length is checked before it is read, against
  what the served model can take (`max_batch` samples, `max_input_bytes`); arrays are read with
  numpy's own .npy header readers, and their dtype and shape (hence their size) are checked before
  anything is allocated; .npz members are inflated at most to the size their zip entry declares and
  their .npy header implies, whichever is smaller; JSON is parsed only after its values were counted
  and its nesting measured, both bounded by the model's inputs;
- arrays are never unpickled (object dtypes are refused from the header), so no request can run code.
"""

from __future__ import annotations

import io
import json
import logging
import math
import re
import threading
import time
import zipfile
import zlib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import IO, Any

import numpy as np

from edgeops.agent.serving import InvalidInput, Limits, NoModel, Served, Serving, TooLarge, check_shape
from edgeops.protocol.errors import EdgeopsError

log = logging.getLogger(__name__)
DEFAULT_API = "127.0.0.1:8421"
MAX_BODY = 64 * 1024 * 1024  # whatever the model: no body is larger
NPZ, NPY = "application/x-npz", "application/x-npy"
QUEUE_S = 2.0  # how long a request waits for a free slot before its 429
RETRY_AFTER_S = 1
SOCKET_TIMEOUT_S = 30.0  # a connection silent this long (mid-request or idle between requests) is closed
BODY_TIMEOUT_S = 60.0  # the whole body must arrive within this
CHUNK = 1024 * 1024
NPY_HEADER_BYTES = 10_000  # numpy's own bound on an .npy header
ARCHIVE_SLACK = 64 * 1024 + NPY_HEADER_BYTES  # an .npz body over its arrays: zip headers and .npy headers
JSON_BYTES_PER_VALUE = 48  # generous for a float written out in full, a comma and indentation
JSON_MEMORY_PER_VALUE = 32  # a parsed JSON number (a Python float and its list slot); a cap on all values
STRINGS = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
BRACKETS = bytes.maketrans(b"{}", b"[]")
NOT_BRACKETS = bytes(set(range(256)) - set(b"[]{}"))


class _Handler(BaseHTTPRequestHandler):
    server: "InferenceServer"
    protocol_version = "HTTP/1.1"
    timeout = SOCKET_TIMEOUT_S

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.address_string(), *args)

    def do_GET(self) -> None:
        served = self.server.serving.served
        if self.path == "/v1/health":
            if served is None:
                self._json(503, {"status": "no-model"})
            else:
                self._json(200, {"status": "ok", "model": served.name, "version": served.version, "slot": served.slot})
        elif self.path == "/v1/model":
            if served is None:
                self._json(503, {"error": "no model is installed yet"})
            else:
                m = served.manifest
                self._json(200, {key: m.get(key) for key in ("name", "version", "profile", "runtime", "inputs", "outputs",
                                                              "classifier_output")} | {"slot": served.slot})
        else:
            self._json(404, {"error": f"no such endpoint {self.path}; try POST /v1/infer, GET /v1/health, GET /v1/model"})

    def do_POST(self) -> None:
        if self.path != "/v1/infer":
            self._json(404, {"error": f"no such endpoint {self.path}; inference is POST /v1/infer"})
            return
        try:
            length = int(self.headers.get("Content-Length") or -1)
        except ValueError:
            length = -1
        if not 0 <= length <= MAX_BODY:
            self._refuse(413 if length > MAX_BODY else 411, f"send a Content-Length of at most {MAX_BODY} bytes")
            return
        kind = (self.headers.get("Content-Type") or "application/json").split(";")[0].strip()
        serving = self.server.serving
        served = serving.served
        if served is None:
            self._refuse(503, "no model is installed yet; push a release to this device")
            return
        limit = body_limit(kind, served, serving.limits)
        if length > limit:
            self._refuse(413, f"a {kind} body for {served.name} {served.version} is at most {limit} bytes; "
                              f"send fewer samples per request")
            return
        if not self.server.slots.acquire(timeout=QUEUE_S):
            self._refuse(429, f"{serving.limits.max_concurrent} requests are in progress; retry in {RETRY_AFTER_S} s",
                         {"Retry-After": str(RETRY_AFTER_S)})
            return
        try:
            self._infer(kind, length, served)
        finally:
            self.server.slots.release()

    def _infer(self, kind: str, length: int, served: Served) -> None:
        serving = self.server.serving
        body = self._read_body(length)
        if body is None:
            return
        try:
            try:
                feed, binary = parse(kind, body, served, serving.limits)
            except InvalidInput as exc:
                serving.refused(served, exc)
                raise
            del body  # only the arrays are kept while the model runs
            served, outputs = serving.infer(feed)
        except InvalidInput as exc:
            self._json(400, {"error": str(exc)})
        except TooLarge as exc:
            self._json(413, {"error": str(exc)})
        except NoModel as exc:
            self._json(503, {"error": str(exc)})
        except EdgeopsError as exc:  # the runtime refused the input at run time
            self._json(422, {"error": str(exc)})
        except Exception:  # a bug: answer and log it, never leave the client without an answer
            log.exception("error serving POST /v1/infer")
            self._json(500, {"error": "internal error; the agent logged the details"})
        else:
            if binary:
                buffer = io.BytesIO()
                np.savez(buffer, **outputs)
                self._send(200, NPZ, buffer.getvalue(), {"X-Edgeops-Model": served.name, "X-Edgeops-Version": served.version})
            else:
                self._json(200, {"model": served.name, "version": served.version,
                                 "outputs": {name: value.tolist() for name, value in outputs.items()}})

    def _read_body(self, length: int) -> bytes | None:
        """The body, read in chunks; None (and the connection closed) when it does not arrive in time."""
        chunks, left, deadline = [], length, time.monotonic() + BODY_TIMEOUT_S
        try:
            while left:
                chunk = self.rfile.read1(min(left, CHUNK))  # type: ignore[attr-defined]
                if not chunk or time.monotonic() > deadline:
                    raise TimeoutError
                chunks.append(chunk)
                left -= len(chunk)
        except (TimeoutError, OSError):
            self.close_connection = True
            return None
        return b"".join(chunks)

    def _refuse(self, status: int, reason: str, headers: dict[str, str] | None = None) -> None:
        """Answer before the body is read, and close: what is left of the body is never read."""
        self._send(status, "application/json", json.dumps({"error": reason}).encode(), {"Connection": "close", **(headers or {})})
        self.close_connection = True

    def _json(self, status: int, body: dict[str, Any]) -> None:
        self._send(status, "application/json", json.dumps(body).encode())

    def _send(self, status: int, kind: str, data: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)


def body_limit(kind: str, served: Served, limits: Limits) -> int:
    """The largest body of Content-Type `kind` that can hold a request `served` may accept."""
    if kind == "application/json":
        return min(MAX_BODY, json_values(served, limits) * JSON_BYTES_PER_VALUE + ARCHIVE_SLACK)
    return min(MAX_BODY, limits.max_input_bytes + len(served.inputs) * ARCHIVE_SLACK)


def json_values(served: Served, limits: Limits) -> int:
    """How many JSON values (numbers and lists) a request may hold: `max_batch` samples of every
    input (a dimension of any size counted as 1), and never more than max_input_bytes / JSON_MEMORY_PER_VALUE."""
    values = 8  # {"inputs": {...}}
    for _, shape in served.inputs.values():
        sizes = [d or 1 for d in shape[1:]]
        per_sample = math.prod(sizes) + sum(math.prod(sizes[:j]) for j in range(len(sizes)))
        values += 1 + limits.max_batch * per_sample
    return min(values, limits.max_input_bytes // JSON_MEMORY_PER_VALUE)


def parse(kind: str, body: bytes, served: Served, limits: Limits) -> tuple[dict[str, Any], bool]:
    """(feed, whether to answer in npz) from a request body, in memory bounded by `limits`;
    InvalidInput when it cannot be read, TooLarge when it asks for more than the limits."""
    if kind == "application/json":
        return _parse_json(body, served, limits), False
    if kind not in (NPZ, NPY):
        raise InvalidInput(f"unsupported Content-Type {kind!r}; use application/json, {NPZ} or {NPY}")
    try:
        if kind == NPY:
            if len(served.inputs) != 1:
                raise InvalidInput("an .npy body needs a model with exactly one input; send an .npz keyed by input name")
            name = next(iter(served.inputs))
            return {name: _read_npy(io.BytesIO(body), name, served, limits, limits.max_input_bytes)}, True
        return _read_npz(body, served, limits), True
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise InvalidInput(f"the body is not a readable {kind.split('-')[-1]} ({exc})") from None


def _parse_json(body: bytes, served: Served, limits: Limits) -> dict[str, Any]:
    depth = 2 + max(len(shape) for _, shape in served.inputs.values())  # {"inputs": {name: nested lists}}
    brackets = STRINGS.sub(b'""', body).translate(BRACKETS, NOT_BRACKETS)
    for _ in range(depth):  # each pass removes the innermost level
        brackets = brackets.replace(b"[]", b"")
    if b"[]" in brackets:
        raise InvalidInput(f"the JSON nests deeper than {depth} levels; this model's inputs need at most that")
    most = json_values(served, limits)
    if body.count(b",") + body.count(b"[") + body.count(b"{") + 1 > most:
        raise TooLarge(f"the JSON holds more than {most} values; send fewer samples per request, or an .npz")
    try:
        message = json.loads(body)
    except (UnicodeDecodeError, ValueError) as exc:
        raise InvalidInput(f"the body is not JSON ({exc})") from None
    if not isinstance(message, dict) or not isinstance(message.get("inputs"), dict):
        raise InvalidInput('the body must be {"inputs": {"<input name>": <nested list>}}')
    for name, value in message["inputs"].items():
        if isinstance(value, list) and len(value) > limits.max_batch:
            raise TooLarge(f"input {name} has {len(value)} samples, at most {limits.max_batch} are served per request")
    return message["inputs"]


def _read_npz(body: bytes, served: Served, limits: Limits) -> dict[str, np.ndarray | None]:
    # Every central directory entry carries this signature: more of them than inputs (and some
    # chance matches in the data) and the archive is refused before zipfile lists its entries.
    if body.count(b"PK\x01\x02") > len(served.inputs) + 16:
        raise InvalidInput(f"the .npz has more members than the model's {len(served.inputs)} input(s)")
    budget, feed = limits.max_input_bytes, {}
    with zipfile.ZipFile(io.BytesIO(body)) as archive:
        for info in archive.infolist():
            name = info.filename.removesuffix(".npy")
            if name in feed:
                raise InvalidInput(f"the .npz holds {info.filename!r} twice; send each input once")
            if name not in served.inputs:
                feed[name] = None  # never read: validation names it, with the inputs the model takes
                continue
            if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                raise InvalidInput(f"the .npz member {info.filename!r} is compressed with method {info.compress_type}; "
                                   "use np.savez or np.savez_compressed")
            if info.file_size > budget + NPY_HEADER_BYTES:
                raise TooLarge(f"the .npz member {info.filename!r} is {info.file_size} bytes, "
                               f"more than the {limits.max_input_bytes} bytes of inputs a request may hold")
            with archive.open(info) as member:  # zipfile never inflates past file_size, whatever the data
                feed[name] = _read_npy(member, name, served, limits, budget)
            budget -= feed[name].nbytes
    return feed


def _read_npy(source: IO[bytes], name: str, served: Served, limits: Limits, budget: int) -> np.ndarray:
    """Input `name` from an .npy stream, checked from its header before anything is allocated."""
    version = np.lib.format.read_magic(source)
    if version not in ((1, 0), (2, 0)):
        raise ValueError(f".npy format version {version[0]}.{version[1]} is not supported; use np.save")
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran_order, dtype = read_header(source, max_header_size=NPY_HEADER_BYTES)
    model_dtype, model_shape = served.inputs[name]
    if dtype.kind not in "biufc" or not np.can_cast(dtype, model_dtype, casting="same_kind"):
        raise InvalidInput(f"input {name} is {dtype}, the model takes {model_dtype}")
    check_shape(name, shape, model_shape)
    if shape and shape[0] > limits.max_batch:
        raise TooLarge(f"input {name} has {shape[0]} samples, at most {limits.max_batch} are served per request")
    size = math.prod(shape) * dtype.itemsize
    if size > budget:
        raise TooLarge(f"input {name} is {size} bytes, more than the {limits.max_input_bytes} bytes of inputs "
                       "a request may hold; send fewer samples per request")
    array = np.empty(shape[::-1] if fortran_order else shape, dtype)
    view, filled = memoryview(array.reshape(-1).view(np.uint8)), 0
    for chunk in _chunks(source, size):
        view[filled:filled + len(chunk)] = chunk
        filled += len(chunk)
    if filled < size or source.read(1):
        raise InvalidInput(f"input {name}: the data is {'shorter' if filled < size else 'longer'} than its .npy header says")
    return array.T if fortran_order else array


def _chunks(source: IO[bytes], size: int) -> Iterator[bytes]:
    """At most `size` bytes of `source`, CHUNK at a time, until it ends."""
    while size > 0 and (chunk := source.read(min(size, CHUNK))):
        size -= len(chunk)
        yield chunk


class InferenceServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024  # the listen backlog: bursts of new connections wait instead of being reset

    def __init__(self, serving: Serving, address: str = DEFAULT_API):
        host, _, port = address.rpartition(":")
        try:
            super().__init__((host or "127.0.0.1", int(port)), _Handler)
        except (ValueError, OSError) as exc:
            raise EdgeopsError(f"cannot serve the inference API on {address} ({exc}); choose another with --api HOST:PORT") from None
        self.serving = serving
        self.slots = threading.BoundedSemaphore(serving.limits.max_concurrent)
        self.url = f"http://{self.server_address[0]}:{self.server_address[1]}"

    def start(self) -> "InferenceServer":
        threading.Thread(target=self.serve_forever, name="edgeops-infer-api", daemon=True).start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
