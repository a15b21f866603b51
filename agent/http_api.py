"""The agent's local inference API, on 127.0.0.1 by default (stdlib http.server: no web stack on the device).

    POST /v1/infer   JSON {"inputs": {name: nested lists}} -> {"model", "version", "outputs": {name: lists}}
                     application/x-npz (arrays by input name) -> application/x-npz of the outputs
                     application/x-npy (models with one input) -> application/x-npz of the outputs
    GET  /v1/health  200 {"status": "ok", ...} while a model is served, 503 {"status": "no-model"} before
    GET  /v1/model   the served model's name, version, profile, runtime, inputs and outputs

Invariants: a bad request gets a 4xx with {"error": reason} (binary answers carry the model in
X-Edgeops-Model/X-Edgeops-Version headers); arrays are read with allow_pickle=False, so no request
can run code; bodies over MAX_BODY are refused before they are read; no request can stop the server.
"""

from __future__ import annotations

import io
import json
import logging
import threading
import zipfile
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np

from edgeops.agent.serving import InvalidInput, NoModel, Serving
from edgeops.protocol.errors import EdgeopsError

log = logging.getLogger(__name__)
DEFAULT_API = "127.0.0.1:8421"
MAX_BODY = 64 * 1024 * 1024
NPZ, NPY = "application/x-npz", "application/x-npy"


class _Handler(BaseHTTPRequestHandler):
    server: "InferenceServer"
    protocol_version = "HTTP/1.1"

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
            self._json(413 if length > MAX_BODY else 411, {"error": f"send a Content-Length of at most {MAX_BODY} bytes"})
            self.close_connection = True
            return
        body = self.rfile.read(length)
        kind = (self.headers.get("Content-Type") or "application/json").split(";")[0].strip()
        try:
            feed, binary = _parse(kind, body, self.server.serving)
            served, outputs = self.server.serving.infer(feed)
        except InvalidInput as exc:
            self._json(400, {"error": str(exc)})
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


def _parse(kind: str, body: bytes, serving: Serving) -> tuple[dict[str, Any], bool]:
    """(feed, whether to answer in npz) from a request body; InvalidInput when it cannot be read."""
    if kind == "application/json":
        try:
            message = json.loads(body)
        except (UnicodeDecodeError, ValueError) as exc:
            raise InvalidInput(f"the body is not JSON ({exc})") from None
        if not isinstance(message, dict) or not isinstance(message.get("inputs"), dict):
            raise InvalidInput('the body must be {"inputs": {"<input name>": <nested list>}}')
        return message["inputs"], False
    if kind in (NPZ, NPY):
        try:
            loaded = np.load(io.BytesIO(body), allow_pickle=False)
            if kind == NPZ:
                if not isinstance(loaded, np.lib.npyio.NpzFile):
                    raise ValueError("not an .npz archive")
                with loaded:
                    return {name: loaded[name] for name in loaded.files}, True
        except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as exc:
            raise InvalidInput(f"the body is not a readable {kind.split('-')[-1]} ({exc})") from None
        served = serving.served
        inputs = served.manifest["inputs"] if served else []
        if len(inputs) != 1 or not isinstance(loaded, np.ndarray):
            raise InvalidInput("an .npy body needs a model with exactly one input; send an .npz keyed by input name")
        return {inputs[0]["name"]: loaded}, True
    raise InvalidInput(f"unsupported Content-Type {kind!r}; use application/json, {NPZ} or {NPY}")


class InferenceServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, serving: Serving, address: str = DEFAULT_API):
        host, _, port = address.rpartition(":")
        try:
            super().__init__((host or "127.0.0.1", int(port)), _Handler)
        except (ValueError, OSError) as exc:
            raise EdgeopsError(f"cannot serve the inference API on {address} ({exc}); choose another with --api HOST:PORT") from None
        self.serving = serving
        self.url = f"http://{self.server_address[0]}:{self.server_address[1]}"

    def start(self) -> "InferenceServer":
        threading.Thread(target=self.serve_forever, name="edgeops-infer-api", daemon=True).start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
