"""The fleet's HTTP JSON API for operators (`edgeops fleet serve --http`), on the standard library.

One job: translate HTTP to library calls — registry reads and `edgeops.fleet.home.push`. `ROUTES` is
the whole surface; `edgeops.fleet.openapi.DOCUMENT` describes exactly it.

Invariants:
- Every answer is JSON. A bad request gets a 4xx `{"error": reason}`; an unexpected exception gets a
  500 `{"error": ...}` and is logged with its traceback. No request stops the server. A known method
  on a path that does not serve it gets 405 with `Allow`; HEAD is GET without the body.
- Reads (GET) are open: the dashboard, /metrics and the JSON views show the fleet read-only to
  anyone who can reach the API (it listens on 127.0.0.1 unless told otherwise). Every change
  (POST) needs `Authorization: Bearer <api_token>` (from fleet.json), checked before any request
  body is read.
- A request body is read into memory only when its Content-Length is within `max_body`; a body left
  unread is drained for a bounded time after the answer, so the client gets to read the answer.
- Pushes are signed with the targets key in the fleet repository; an offline key needs
  `edgeops push --fleet DIR --key KEY`.
- Listens on 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import base64
import hmac
import json
import logging
import re
import tempfile
import threading
import time
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from edgeops import __version__
from edgeops.fleet import home as fleethome
from edgeops.fleet import drift, registry, rollout
from edgeops.fleet.plan import PLAN_KEYS, Plan, make_plan
from edgeops.fleet.openapi import DOCUMENT
from edgeops.protocol.errors import EdgeopsError
from edgeops.protocol.wire import STATES

log = logging.getLogger(__name__)

DEFAULT_HTTP = "127.0.0.1:8420"
DEFAULT_MAX_BODY = 512 * 1024 * 1024
SQLITE_MAX_INT = 2**63 - 1  # ids beyond it name nothing (and SQLite refuses to bind them)
BUNDLE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,199}")  # a TUF target name; no path, no dot-file
DRAIN_SECONDS = 5.0
STOP_POLL_S = 0.1  # how soon stop() takes effect
_TOKEN_HINT = "the token is api_token in the fleet's fleet.json"


class ApiError(Exception):
    """A request the API refuses: HTTP status, one-line reason, extra response headers."""

    def __init__(self, status: int, reason: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(reason)
        self.status, self.reason, self.headers = status, reason, headers or {}


@dataclass(frozen=True)
class Route:
    method: str
    template: str  # OpenAPI path template; `{name}` matches one path segment
    action: str  # FleetApi method; called with the path parameters, plus `body` (bytes) when `body`
    auth: bool = False
    body: bool = False
    body_optional: bool = False  # no body (or an empty one, of any type) is the same as `{}`
    query: tuple[str, ...] = ()  # query parameters passed on (None when absent)

    @property
    def pattern(self) -> re.Pattern[str]:
        return re.compile(re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", self.template))


ROUTES = (
    Route("GET", "/v1/health", "health"),
    Route("GET", "/v1/openapi.json", "openapi"),
    Route("GET", "/v1/status", "status"),
    Route("GET", "/v1/devices", "devices", query=("limit", "after", "online", "state", "q")),
    Route("GET", "/v1/devices/{device_id}", "device"),
    Route("GET", "/v1/releases", "releases"),
    Route("POST", "/v1/releases", "push", auth=True, body=True),
    Route("GET", "/v1/rollouts", "rollouts"),
    Route("GET", "/v1/rollouts/{rollout_id}", "rollout"),
    Route("POST", "/v1/rollouts/{rollout_id}/{action}", "act", auth=True, body=True, body_optional=True),
    Route("GET", "/v1/drift", "drift", query=("model", "devices")),
    Route("GET", "/v1/series", "series", query=("model", "bucket")),
    Route("GET", "/metrics", "metrics"),
    Route("GET", "/", "dashboard"),
    Route("GET", "/ui/{name}", "dashboard"),
)


@dataclass(frozen=True)
class Raw:
    """A non-JSON answer: the dashboard's files, the Prometheus exposition."""

    content_type: str
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()


class FleetApi:
    """What the routes do. Holds one registry connection, used by one request thread at a time."""

    def __init__(self, home: fleethome.FleetHome, max_body: int = DEFAULT_MAX_BODY) -> None:
        token = home.config.get("api_token")
        if not isinstance(token, str) or not token:
            raise EdgeopsError(f"{home.path / fleethome.CONFIG} has no api_token (made by an older edgeops?); "
                               "add \"api_token\": \"<a long random string>\" to it, then serve again")
        self.home, self.token, self.max_body = home, token, max_body
        self._db = registry.open_db(home.db_path)
        self._db_lock = threading.Lock()

    def _read(self, query, *args: Any) -> Any:
        with self._db_lock:
            return query(self._db, *args)

    def health(self) -> tuple[int, Any]:
        return 200, {"status": "ok", "version": __version__}

    def openapi(self) -> tuple[int, Any]:
        return 200, DOCUMENT

    def status(self) -> tuple[int, Any]:
        return 200, self._read(registry.status)

    def devices(self, limit: str | None, after: str | None, online: str | None, state: str | None,
                q: str | None) -> tuple[int, Any]:
        """One page of devices by id (keyset paging: `after` is the last id of the previous page)."""
        if limit is not None and not (re.fullmatch(r"[0-9]{1,4}", limit) and 1 <= int(limit) <= registry.MAX_PAGE):
            raise ApiError(400, f"limit must be a whole number from 1 to {registry.MAX_PAGE}")
        if online not in (None, "true", "false"):
            raise ApiError(400, "online must be true or false")
        if state is not None and state not in (*STATES, "none"):
            raise ApiError(400, f"state must be one of {', '.join(STATES)} or none (no report yet)")
        if after is not None and len(after) > 200 or q is not None and len(q) > 200:
            raise ApiError(400, "after and q must be at most 200 characters")
        return 200, self._read(lambda db: registry.page(
            db, after or "", int(limit or registry.DEFAULT_PAGE), None if online is None else online == "true", state,
            tuple((q or "").split())))

    def device(self, device_id: str) -> tuple[int, Any]:
        found = self._read(registry.device_detail, device_id)
        if found is None:
            raise ApiError(404, f"no device {device_id!r} is enrolled")
        return 200, {**found, "history": self._read(registry.history, device_id)}

    def rollouts(self) -> tuple[int, Any]:
        return 200, {"rollouts": self._read(rollout.summaries)}

    def rollout(self, rollout_id: str) -> tuple[int, Any]:
        try:
            return 200, self._read(rollout.summary, _rollout_id(rollout_id))
        except EdgeopsError as exc:
            raise ApiError(404, str(exc)) from None

    def act(self, rollout_id: str, action: str, body: bytes) -> tuple[int, Any]:
        if action not in rollout.ACTIONS:
            raise ApiError(404, f"no action {action!r}; POST /v1/rollouts/ID/ACTION with ACTION one of "
                                f"{', '.join(rollout.ACTIONS)}")
        reason = parse_reason(body)
        try:
            return 200, self._read(rollout.act, _rollout_id(rollout_id), action, reason)
        except EdgeopsError as exc:
            raise ApiError(404 if str(exc).startswith("no rollout") else 409, str(exc)) from None

    def series(self, model: str | None, bucket: str | None) -> tuple[int, Any]:
        from edgeops.fleet.series import version_series

        if bucket is not None and not (re.fullmatch(r"[0-9]{1,5}", bucket) and 1 <= int(bucket) <= 86400):
            raise ApiError(400, "bucket must be a whole number of seconds from 1 to 86400")
        return 200, self._read(version_series, model, int(bucket or 60))

    def metrics(self) -> tuple[int, Any]:
        from edgeops.fleet.exposition import render

        body, content_type = self._read(render)
        return 200, Raw(content_type, body)

    def dashboard(self, name: str = "") -> tuple[int, Any]:
        from edgeops.fleet.dashboard import HEADERS, asset

        found = asset(f"/ui/{name}" if name else "/")
        if found is None:
            raise ApiError(404, f"no dashboard file {name!r}")
        return 200, Raw(*found, tuple(HEADERS.items()))

    def releases(self) -> tuple[int, Any]:
        return 200, {"releases": self._read(registry.releases)}

    def drift(self, model: str | None, devices: str | None) -> tuple[int, Any]:
        """The drift report; by default each version lists only its devices that drift (what an
        operator acts on) and counts all per status, so the answer does not grow with calm devices."""
        if devices not in (None, "drifting", "all"):
            raise ApiError(400, "devices must be drifting (the default) or all")
        try:
            return 200, self._read(drift.report, model, devices == "all")
        except EdgeopsError as exc:  # no drift telemetry from that model
            raise ApiError(404, str(exc)) from None

    def push(self, body: bytes) -> tuple[int, Any]:
        bundles, selector, plan = parse_push(body)
        with tempfile.TemporaryDirectory(prefix="edgeops-upload-") as tmp:
            paths = [Path(tmp, name) for name, _ in bundles]
            for path, (_, data) in zip(paths, bundles):
                path.write_bytes(data)
            try:
                release = fleethome.push(self.home, paths, selector, plan=plan)
            except EdgeopsError as exc:  # the reason names the bundle by its upload name, not the temp path
                raise ApiError(400, str(exc).replace(f"{tmp}/", "")) from None
        return 201, {"release": release}


def _rollout_id(text: str) -> int:
    if not (re.fullmatch(r"[0-9]{1,19}", text) and int(text) <= SQLITE_MAX_INT):
        raise ApiError(404, f"no rollout {text!r}; rollout ids are numbers (GET /v1/rollouts lists them)")
    return int(text)


def _json_body(body: bytes) -> Any:
    """The request body as JSON; ApiError 400 for invalid JSON, including NaN and Infinity, which
    Python's json accepts but JSON does not (they would come back out as invalid JSON)."""
    try:
        return json.loads(body, parse_constant=_refuse_constant)
    except ValueError as exc:
        raise ApiError(400, f"body is not valid JSON: {exc}") from None


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


def parse_reason(body: bytes) -> str:
    """The optional `{"reason": "..."}` of a rollout action; an empty body is no reason."""
    if not body.strip():
        return ""
    request = _json_body(body)
    if not isinstance(request, dict) or set(request) - {"reason"} or not isinstance(request.get("reason", ""), str):
        raise ApiError(400, 'body must be {} or {"reason": "why, in a few words"}')
    return request.get("reason", "")[:300]


def parse_push(body: bytes) -> tuple[list[tuple[str, bytes]], dict[str, str], Plan]:
    """The bundles (name, bytes), selector and rollout plan of a POST /v1/releases body; ApiError 400
    saying what is wrong."""
    request = _json_body(body)
    if not isinstance(request, dict):
        raise ApiError(400, 'body must be a JSON object: {"bundles": [{"name": ..., "data": ...}], "select": {...}}')
    unknown = sorted(set(request) - {"bundles", "select", "plan"})
    if unknown:
        raise ApiError(400, f"unknown field(s) {', '.join(unknown)}; expected bundles, select and plan")
    if "bundles" not in request:
        raise ApiError(400, "missing field bundles")
    items = request["bundles"]
    if not isinstance(items, list) or not items:
        raise ApiError(400, "bundles must be a non-empty list of {\"name\": ..., \"data\": <base64>}")
    bundles = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or set(item) != {"name", "data"}:
            raise ApiError(400, f"bundles[{i}] must be an object with exactly name and data")
        name, data = item["name"], item["data"]
        if not isinstance(name, str) or not BUNDLE_NAME.fullmatch(name):
            raise ApiError(400, f"bundles[{i}].name must be a file name of 1-200 letters, digits, '.', '_' or '-' "
                                "not starting with '.'")
        if not isinstance(data, str):
            raise ApiError(400, f"bundles[{i}].data must be a base64 string")
        try:
            bundles.append((name, base64.b64decode(data, validate=True)))
        except ValueError as exc:  # binascii.Error, or a character outside ASCII
            raise ApiError(400, f"bundles[{i}].data is not valid base64 ({exc})") from None
    names = [name for name, _ in bundles]
    if len(set(names)) != len(names):
        raise ApiError(400, "bundle names must be distinct")
    selector = request.get("select", {})
    if not isinstance(selector, dict) or not all(isinstance(k, str) and k and isinstance(v, str)
                                                 for k, v in selector.items()):
        raise ApiError(400, 'select must be an object of label strings, e.g. {"site": "lab"}')
    plan = request.get("plan", {})
    if not isinstance(plan, dict) or set(plan) - set(PLAN_KEYS):
        raise ApiError(400, f"plan must be an object with some of {', '.join(PLAN_KEYS)} (docs/rollouts.md)")
    try:
        return bundles, selector, make_plan(**plan)
    except (EdgeopsError, TypeError, AttributeError, ValueError) as exc:  # ValueError: int() of 4300+ digits
        raise ApiError(400, f"plan: {exc}") from None


class _Handler(BaseHTTPRequestHandler):
    server: _HTTPServer
    server_version = f"edgeops/{__version__}"
    _unread = 0  # request body bytes declared and not read yet

    def _dispatch(self) -> None:
        self._unread = _declared_length(self.headers.get("Content-Length"))
        headers: dict[str, str] = {}
        try:
            status, data = self._route()
        except ApiError as exc:
            status, data, headers = exc.status, {"error": exc.reason}, exc.headers
        except Exception:
            log.exception("error serving %s %s", self.command, self.path)
            status, data = 500, {"error": "internal error; the fleet server logged the details"}
        self._send(status, data, headers)
        self._drain()

    # Every method HTTP defines, so that one a path does not serve gets 405, not the base class's 501.
    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = do_TRACE = do_CONNECT = do_QUERY = _dispatch

    def _route(self) -> tuple[int, Any]:
        path = urlsplit(self.path).path
        matches = [(route, m) for route in ROUTES if (m := route.pattern.fullmatch(path))]
        if not matches:
            raise ApiError(404, f"no such endpoint {path}; see /v1/openapi.json")
        method = "GET" if self.command == "HEAD" else self.command
        chosen = [(route, m) for route, m in matches if route.method == method]
        if not chosen:
            allowed = ", ".join(sorted({route.method for route, _ in matches}))
            raise ApiError(405, f"{path} accepts {allowed}, not {self.command}", {"Allow": allowed})
        route, match = chosen[0]
        if route.auth or "Authorization" in self.headers:  # a token sent is checked, never ignored
            self._authorize()
        kwargs: dict[str, Any] = {name: unquote(value) for name, value in match.groupdict().items()}
        if route.body:
            kwargs["body"] = self._body(route.body_optional)
        if route.query:
            given = parse_qs(urlsplit(self.path).query, keep_blank_values=True)
            kwargs |= {name: given[name][-1] if name in given else None for name in route.query}
        return getattr(self.server.api, route.action)(**kwargs)

    def _authorize(self) -> None:
        scheme, _, token = (self.headers.get("Authorization") or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ApiError(401, f"missing token: send Authorization: Bearer <token> ({_TOKEN_HINT})",
                           {"WWW-Authenticate": 'Bearer realm="edgeops"'})
        if not hmac.compare_digest(token.strip().encode(), self.server.api.token.encode()):
            raise ApiError(401, f"wrong token ({_TOKEN_HINT})",
                           {"WWW-Authenticate": 'Bearer realm="edgeops", error="invalid_token"'})

    def _body(self, optional: bool) -> bytes:
        chunked = self.headers.get("Transfer-Encoding") is not None
        if optional and not chunked and self._unread == 0:
            return b""
        content_type = self.headers.get_content_type()
        if content_type != "application/json":
            raise ApiError(415, f"send the body as application/json, not {content_type}")
        if chunked or self.headers.get("Content-Length") is None:
            raise ApiError(411, "send the body with a Content-Length (no chunked encoding)")
        length, limit = self._unread, self.server.api.max_body
        if length < 0:
            raise ApiError(400, "Content-Length must be a non-negative integer")
        if length > limit:
            raise ApiError(413, f"body of {length} bytes is over this server's limit of {limit} bytes")
        body = self.rfile.read(length)
        self._unread = 0
        if len(body) != length:
            raise ApiError(400, f"body ended after {len(body)} of {length} bytes")
        return body

    def _drain(self) -> None:
        """Read and drop a body left unread, for a bounded time: closing on unread data resets the
        connection, and the client may lose the answer it has not read yet."""
        if self._unread <= 0:
            return
        deadline = time.monotonic() + DRAIN_SECONDS
        try:
            while self._unread > 0 and (left := deadline - time.monotonic()) > 0:
                self.connection.settimeout(left)
                chunk = self.rfile.read1(min(self._unread, 1 << 20))
                if not chunk:
                    break
                self._unread -= len(chunk)
        except OSError:
            pass  # timed out or reset: the connection closes either way
        self.close_connection = True

    def _send(self, status: int, data: Any, headers: dict[str, str]) -> None:
        raw = data if isinstance(data, Raw) else Raw("application/json", json.dumps(data, sort_keys=True).encode())
        body = raw.body
        self.send_response(status)
        self.send_header("Content-Type", raw.content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for name, value in [*headers.items(), *raw.headers]:
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """The base class's answer to unparseable requests and unknown methods, as JSON, not HTML."""
        log.info("refused request %r: %d %s", self.requestline, code, message)
        self.close_connection = True
        self._send(code, {"error": message or HTTPStatus(code).phrase}, {})

    def log_message(self, format: str, *args: Any) -> None:
        log.info("%s %s", self.address_string(), format % args)


def _declared_length(value: str | None) -> int:
    """Content-Length as an int: 0 when absent, -1 when not a non-negative integer of at most 18 digits
    (more is past any limit, and int() refuses 4300 digits and up)."""
    if value is None:
        return 0
    return int(value) if re.fullmatch(r"[0-9]{1,18}", value.strip()) else -1


class _HTTPServer(ThreadingHTTPServer):
    def __init__(self, address: tuple[str, int], api: FleetApi) -> None:
        self.api = api
        super().__init__(address, _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.warning("connection from %s failed", client_address[0], exc_info=True)


def parse_bind(text: str) -> tuple[str, int]:
    """`HOST:PORT` (port 0: any free port) as a (host, port) pair; EdgeopsError otherwise."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise EdgeopsError(f"--http {text!r} must look like HOST:PORT, e.g. {DEFAULT_HTTP}")
    return host, int(port)


class ApiServer:
    """The API on its own threads. Binds when constructed, so a taken port fails before `start()`."""

    def __init__(self, home: fleethome.FleetHome, bind: str = DEFAULT_HTTP, max_body: int = DEFAULT_MAX_BODY) -> None:
        host, port = parse_bind(bind)
        api = FleetApi(home, max_body)
        try:
            self._httpd = _HTTPServer((host, port), api)
        except OSError as exc:  # taken port, unknown host
            raise EdgeopsError(f"cannot listen on {bind} for the HTTP API: {exc.strerror or exc}") from None
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": STOP_POLL_S},
                                        name="edgeops-api", daemon=True)

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "ApiServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread.is_alive():
            self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=10)
