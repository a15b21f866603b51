"""The fleet's HTTP JSON API for operators (`edgeops fleet serve --http`): FastAPI served by uvicorn.

One job: translate HTTP to library calls. The routes registered on `router` are the whole surface
(their request and answer models are fleet/schemas.py);
the OpenAPI document at /v1/openapi.json is generated from them and their pydantic models, and
every JSON answer is validated against its response model before it leaves (a mismatch is a 500).

Invariants:
- Every answer is JSON except /metrics and the dashboard's files: a bad request gets a one-line 4xx
  `{"error": reason}`; an unexpected exception a 500 `{"error": ...}`, logged with its traceback.
  No request stops the server.
- `Guard`, in front of the app, decides before any request body is read, in this order: 431 too many
  headers, 501 unknown method, 421 a Host header not on the allow-list (DNS rebinding), 404 unknown
  path, 405 (with Allow) wrong method, 401 a missing or wrong token, 403 a role below the route's,
  411/400/413/415 a body without a length, with a bad one, over the route's limit, or of another
  type. A body refused unread is drained for a bounded time first, so the client reads the answer.
- Roles (fleet/operators.py): reads need a viewer unless reads are open (by default only when bound
  to loopback); pushes and rollout actions an operator; operators an admin. /v1/health,
  /v1/openapi.json and the dashboard's files are open to all. A token that is sent is always checked.
- Every request for a change by a known operator is one audit row (fleet/audit.py): its name, the
  action, the object, `ok` or the error; the rollout engine's decisions show there as `engine`.
- Plain HTTP only on a loopback address; any other needs TLS (tls_cert, tls_key). `fleet serve`
  (`serve_options`) serves HTTPS with the fleet CA's certificate pki/api.pem unless told otherwise.
- Pushes arrive as multipart/form-data, each bundle spooled to disk, never whole in memory; they
  are signed with the targets key in the fleet repository (an offline key needs `edgeops push
  --fleet DIR --key KEY`).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import re
import shutil
import socket
import ssl
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import anyio
import uvicorn
from fastapi import APIRouter, Depends, FastAPI, File, Form, Path as PathParam, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from pydantic import Field, TypeAdapter, ValidationError
from starlette.exceptions import HTTPException
from starlette.routing import Match
from uvicorn.protocols.http.h11_impl import H11Protocol

from edgeops import __version__
from edgeops.fleet import audit, drift, operators, registry, rollout
from edgeops.fleet import home as fleethome
from edgeops.fleet.dashboard import HEADERS, TYPES, asset
from edgeops.fleet.plan import make_plan
from edgeops.fleet.schemas import (ActionRequest, AuditLog, Created, DeviceDetail, DevicePage, DriftReport, Error, Health,
                                   IssuedToken, NewOperator, Operators, PlanSettings, Releases, Revoked, RolloutDetail,
                                   Rollouts, Series, Status, Whoami)
from edgeops.protocol.errors import EdgeopsError
from edgeops.protocol.wire import STATES

log = logging.getLogger(__name__)

DEFAULT_HTTP = "127.0.0.1:8420"
DEFAULT_MAX_BODY = 512 * 1024 * 1024
MAX_JSON_BODY = 64 * 1024
MAX_HEADERS = 100
SQLITE_MAX_INT = 2**63 - 1  # ids beyond it name nothing (and SQLite refuses to bind them)
BUNDLE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,199}")  # a TUF target name; no path, no dot-file
DRAIN_SECONDS = 5.0
METHODS = {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT", "QUERY"}
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}
_ISSUE = "`edgeops operator add NAME --role ROLE --fleet DIR` issues one"


class ApiError(Exception):
    """A request the API refuses: HTTP status, one-line reason, extra response headers."""

    def __init__(self, status: int, reason: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(reason)
        self.status, self.reason, self.headers = status, reason, headers or {}


# --- models: what the API takes and answers ---------------------------------------------------------------


_SELECTOR = TypeAdapter(dict[Annotated[str, Field(min_length=1)], str])


# --- routes ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Policy:
    role: str | None  # needed (fleet/operators.py); None: open to all; "viewer" is waived while reads are open
    body: str | None = None  # the content type of the request body it takes
    body_required: bool = False
    action: str | None = None  # a change: recorded in the audit log under this name
    subject: str = ""  # the audit object, from the path parameters


POLICY: dict[Callable[..., Any], Policy] = {}
router = APIRouter(responses={"default": {"model": Error, "description": "Any other failure: 400 bad parameters, "
                                                                         "404 unknown path, 405 wrong method, "
                                                                         "500 server fault (logged)."}})


def route(method: str, path: str, policy: Policy, **settings: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register an endpoint on `router` under the policy `Guard` applies to it."""
    def register(endpoint: Callable[..., Any]) -> Callable[..., Any]:
        router.add_api_route(path, endpoint, methods=[method], **settings)
        POLICY[endpoint] = policy
        return endpoint
    return register


class FleetApi:
    """What the routes share: the fleet, and one registry connection used by one thread at a time."""

    def __init__(self, home: fleethome.FleetHome, max_body: int, reads_open: bool, hosts: set[str]) -> None:
        self.home, self.max_body, self.reads_open, self.hosts = home, max_body, reads_open, hosts
        self._db = registry.open_db(home.db_path)
        self._db_lock = threading.Lock()
        self.read(operators.sync_fleet_admin, home.config.get("api_token"))
        self.read(audit.create_table)

    def read(self, query: Callable[..., Any], *args: Any) -> Any:
        with self._db_lock:
            return query(self._db, *args)


def _fleet(request: Request) -> FleetApi:
    return request.app.state.fleet


Fleet = Annotated[FleetApi, Depends(_fleet)]
READ = Policy("viewer")


@route("GET", "/v1/health", Policy(None), response_model=Health, summary="Liveness.")
def health() -> dict[str, Any]:
    return {"status": "ok", "version": __version__}


@route("GET", "/v1/openapi.json", Policy(None), summary="This document.", include_in_schema=True)
def openapi(request: Request) -> JSONResponse:
    return JSONResponse(request.app.state.document)


@route("GET", "/v1/whoami", Policy(None), response_model=Whoami, summary="The operator the token names, and its role.")
def whoami(request: Request, fleet: Fleet) -> dict[str, Any]:
    who = request.state.operator
    return {"name": who and who.name, "role": who and who.role, "reads_open": fleet.reads_open}


@route("GET", "/v1/status", READ, response_model=Status, summary="Everything `edgeops status --json` prints.")
def status(fleet: Fleet) -> dict[str, Any]:
    return fleet.read(registry.status)


@route("GET", "/v1/devices", READ, response_model=DevicePage,
       summary="Devices with their latest execution, a page at a time, by id.")
def devices(fleet: Fleet,
            limit: Annotated[int, Query(ge=1, le=registry.MAX_PAGE, description="Devices per page.")] = registry.DEFAULT_PAGE,
            after: Annotated[str, Query(max_length=200, description="Start after this device id: the `next` of "
                                                                    "the previous page.")] = "",
            online: Annotated[Literal["true", "false"] | None, Query(
                description="Only devices online (true) or offline (false).")] = None,
            state: Annotated[Literal[(*STATES, "none")] | None, Query(
                description="Only devices whose latest execution is in this state (none: no report yet).")] = None,
            q: Annotated[str, Query(max_length=200, description="Words, each a case-insensitive substring of the "
                                    "device's id, profile, a label as key=value, its latest state or version.")] = "",
            ) -> dict[str, Any]:
    return fleet.read(registry.page, after, limit, None if online is None else online == "true", state, tuple(q.split()))


@route("GET", "/v1/devices/{device_id}", READ, response_model=DeviceDetail, summary="One device, with the release it should run.",
       responses={404: {"model": Error, "description": "No device with this id is enrolled."}})
def device(fleet: Fleet, device_id: str) -> dict[str, Any]:
    found = fleet.read(registry.device_detail, device_id)
    if found is None:
        raise ApiError(404, f"no device {device_id!r} is enrolled")
    return {**found, "history": fleet.read(registry.history, device_id)}


@route("GET", "/v1/releases", READ, response_model=Releases, summary="Every release, oldest first.")
def releases(fleet: Fleet) -> dict[str, Any]:
    return {"releases": fleet.read(registry.releases)}


@route("POST", "/v1/releases", Policy("operator", "multipart/form-data", True, "push", "release"), status_code=201,
       response_model=Created, summary="Sign bundles of one model version into the repository and release them.",
       responses={400: {"model": Error, "description": "A bad field, or a bundle refused (the reason says why)."},
                  411: {"model": Error, "description": "No Content-Length."},
                  413: {"model": Error, "description": "The body is larger than the server's limit."},
                  415: {"model": Error, "description": "The body is not multipart/form-data."}})
def push(request: Request, fleet: Fleet,
         bundle: Annotated[list[UploadFile], File(description="The bundles of one model version, at most one per "
                                                              "profile; each part's filename becomes its TUF target name.")],
         select: Annotated[str, Form(description='JSON: only devices with these labels, e.g. {"site": "lab"}; '
                                                 "default: every device.")] = "{}",
         plan: Annotated[str, Form(description='JSON: rollout plan settings, e.g. {"stages": "1dev,10%,100%", "bake": '
                                               '"10m"} (docs/rollouts.md).')] = "{}") -> dict[str, Any]:
    names = [upload.filename or "" for upload in bundle]
    for i, name in enumerate(names):
        if not BUNDLE_NAME.fullmatch(name):
            raise ApiError(400, f"bundle[{i}]'s filename must be 1-200 letters, digits, '.', '_' or '-' not starting with '.'")
    if len(set(names)) != len(names):
        raise ApiError(400, "bundle filenames must be distinct")
    selector = _parse_json("select", _SELECTOR, select)
    settings = _parse_json("plan", TypeAdapter(PlanSettings), plan).model_dump(exclude_none=True)
    try:
        rollout_plan = make_plan(**settings)
    except (EdgeopsError, ValueError) as exc:  # ValueError: int() of 4300+ digits
        raise ApiError(400, f"plan: {exc}") from None
    with tempfile.TemporaryDirectory(prefix="edgeops-upload-") as tmp:
        paths = [Path(tmp, name) for name in names]
        for path, upload in zip(paths, bundle):
            with path.open("wb") as out:
                shutil.copyfileobj(upload.file, out, 1 << 20)
        try:
            release = fleethome.push(fleet.home, paths, selector, plan=rollout_plan)
        except EdgeopsError as exc:  # the reason names the bundle by its upload name, not the temp path
            raise ApiError(400, str(exc).replace(f"{tmp}/", "")) from None
    request.state.audit_object = f"release {release} ({', '.join(names)})"
    return {"release": release}


def _parse_json(field: str, adapter: TypeAdapter, text: str) -> Any:
    try:
        return adapter.validate_json(text)
    except ValidationError as exc:
        raise ApiError(400, f"{field}: {_first_error(exc.errors())}") from None


@route("GET", "/v1/rollouts", READ, response_model=Rollouts, summary="Every rollout, newest first.")
def rollouts(fleet: Fleet) -> dict[str, Any]:
    return {"rollouts": fleet.read(rollout.summaries)}


RolloutId = Annotated[int, PathParam(ge=1, le=SQLITE_MAX_INT)]


@route("GET", "/v1/rollouts/{rollout_id}", READ, response_model=RolloutDetail, summary="One rollout with its decisions.",
       responses={404: {"model": Error, "description": "No such rollout."}})
def rollout_detail(fleet: Fleet, rollout_id: RolloutId) -> dict[str, Any]:
    try:
        return fleet.read(rollout.summary, rollout_id)
    except EdgeopsError as exc:
        raise ApiError(404, str(exc)) from None


@route("POST", "/v1/rollouts/{rollout_id}/{action}",
       Policy("operator", "application/json", action="rollout {action}", subject="rollout {rollout_id}"),
       response_model=RolloutDetail, summary="Pause, resume, abort or roll back a rollout.",
       responses={404: {"model": Error, "description": "No such rollout."},
                  409: {"model": Error, "description": "The rollout's state does not allow it."}})
def act(fleet: Fleet, rollout_id: RolloutId, action: Literal[rollout.ACTIONS],
        body: ActionRequest | None = None) -> dict[str, Any]:
    try:
        return fleet.read(rollout.act, rollout_id, action, (body or ActionRequest()).reason)
    except EdgeopsError as exc:
        raise ApiError(404 if str(exc).startswith("no rollout") else 409, str(exc)) from None


@route("POST", "/v1/devices/{device_id}/revoke",
       Policy("admin", "application/json", action="device revoke", subject="device {device_id}"),
       response_model=Revoked, summary="Revoke a device: its certificates onto the CRL, out of every rollout; "
       "`fleet serve` closes its connection (docs/security.md).",
       responses={404: {"model": Error, "description": "No enrolled device of that id."}})
def device_revoke(fleet: Fleet, device_id: str,
                  body: ActionRequest | None = None) -> dict[str, Any]:
    try:
        serials = fleethome.revoke_device(fleet.home, device_id, (body or ActionRequest()).reason)
    except EdgeopsError as exc:
        raise ApiError(404, str(exc)) from None
    return {"device": device_id, "certificates": len(serials)}


@route("GET", "/v1/drift", READ, response_model=DriftReport, summary="Drift per model version, merged over devices.",
       responses={404: {"model": Error, "description": "No drift telemetry from that model."}})
def drift_report(fleet: Fleet,
                 model: Annotated[str | None, Query(description="Only this model; default: every model.")] = None,
                 devices: Annotated[Literal["drifting", "all"], Query(
                     description="drifting: each version lists only its devices whose status is not ok; all: "
                                 "every device, as `edgeops drift report --json` prints it.")] = "drifting") -> dict[str, Any]:
    try:
        return fleet.read(drift.report, model, devices == "all")
    except EdgeopsError as exc:  # no drift telemetry from that model
        raise ApiError(404, str(exc)) from None


@route("GET", "/v1/series", READ, response_model=Series,
       summary="Per model version over time: calls, error rate, p95 latency, drift windows and alarms.")
def series(fleet: Fleet, model: str | None = None,
           bucket: Annotated[int, Query(ge=1, le=86400, description="Seconds per point.")] = 60) -> dict[str, Any]:
    from edgeops.fleet.series import version_series

    return fleet.read(version_series, model, bucket)


@route("GET", "/v1/audit", READ, response_model=AuditLog,
       summary="The audit log: every change, who made it and its result, with the rollout engine's decisions.")
def audit_log(fleet: Fleet, limit: Annotated[int, Query(ge=1, le=audit.MAX_LIMIT)] = audit.DEFAULT_LIMIT) -> dict[str, Any]:
    return {"entries": fleet.read(audit.entries, limit)}


@route("GET", "/v1/operators", Policy("admin"), response_model=Operators, summary="Every operator, revoked ones too.")
def operator_list(fleet: Fleet) -> dict[str, Any]:
    return {"operators": fleet.read(operators.listing)}


@route("POST", "/v1/operators", Policy("admin", "application/json", True, "operator add", "operator"), status_code=201,
       response_model=IssuedToken, summary="Add an operator; its token is in the answer, once.",
       responses={409: {"model": Error, "description": "An operator of that name holds a token."}})
def operator_add(request: Request, fleet: Fleet, body: NewOperator) -> dict[str, Any]:
    request.state.audit_object = f"operator {body.name} ({body.role})"
    try:
        token = fleet.read(operators.add, body.name, body.role)
    except EdgeopsError as exc:
        raise ApiError(409, str(exc)) from None
    return {"name": body.name, "role": body.role, "token": token}


@route("POST", "/v1/operators/{name}/revoke", Policy("admin", action="operator revoke", subject="operator {name}"),
       response_model=Operators, summary="Revoke an operator's token; the answer lists the operators afterwards.",
       responses={404: {"model": Error, "description": "No operator of that name holds a token."}})
def operator_revoke(fleet: Fleet, name: str) -> dict[str, Any]:
    try:
        fleet.read(operators.revoke, name)
    except EdgeopsError as exc:
        raise ApiError(404, str(exc)) from None
    return {"operators": fleet.read(operators.listing)}


@route("GET", "/metrics", READ, response_class=Response, summary="Prometheus exposition: devices by state, rollout "
       "progress, ingest counters, drift flags.",
       responses={200: {"description": "Prometheus text format 0.0.4.", "content": {"text/plain": {"schema": {"type": "string"}}}}})
def metrics(fleet: Fleet) -> Response:
    from edgeops.fleet.exposition import render

    body, content_type = fleet.read(render)
    return Response(body, media_type=content_type)


_FILES = {"description": "A dashboard file.", "content": {kind: {"schema": {"type": "string"}} for kind in TYPES.values()}}


@route("GET", "/", Policy(None), response_class=Response, summary="The dashboard.", responses={200: _FILES})
def dashboard() -> Response:
    return dashboard_file("")


@route("GET", "/ui/{name}", Policy(None), response_class=Response, summary="The dashboard's scripts and styles.",
       responses={200: _FILES})
def dashboard_file(name: str) -> Response:
    found = asset(f"/ui/{name}" if name else "/")
    if found is None:
        raise ApiError(404, f"no dashboard file {name!r}")
    content_type, body = found
    return Response(body, headers={**HEADERS, "Content-Type": content_type})


# --- the app: errors as JSON, the generated document ------------------------------------------------------


class SortedJSON(JSONResponse):
    def render(self, content: Any) -> bytes:
        return json.dumps(content, sort_keys=True, allow_nan=False).encode()


def _first_error(errors: Any) -> str:
    """pydantic's first validation error as one line: where, then what."""
    first = errors[0]
    loc = [str(part) for part in first.get("loc", ())]
    where = ".".join(loc[1:] if loc[:1] == ["body"] and len(loc) > 1 else loc)
    message = first.get("msg", "invalid")
    if first.get("type") == "json_invalid":
        where, message = "body" if loc else "", f"not valid JSON ({first.get('ctx', {}).get('error', 'parse error')})"
    return (f"{where}: {message}" if where else message).replace("\n", " ")


def _json_error(status: int, reason: str, headers: dict[str, str] | None = None) -> SortedJSON:
    return SortedJSON({"error": reason}, status, headers)


def create_app(fleet: FleetApi) -> FastAPI:
    app = FastAPI(title="edgeops fleet API", version=__version__, openapi_url=None, docs_url=None, redoc_url=None,
                  default_response_class=SortedJSON, description=(
                      "Operators' HTTP JSON API of `edgeops fleet serve`, its dashboard (/) and Prometheus metrics "
                      "(/metrics). Send `Authorization: Bearer <token>`, a token from `edgeops operator add`; "
                      "`x-role` on each operation is the role it needs (viewer < operator < admin). Reads need "
                      "none on a server whose reads are open. Errors are `{\"error\": \"...\"}`, 4xx for bad "
                      "requests and 500 for server faults. Docs: docs/fleet-api.md."))
    app.state.fleet = fleet
    app.include_router(router)

    @app.exception_handler(ApiError)
    async def refused(request: Request, exc: ApiError) -> SortedJSON:
        return _json_error(exc.status, exc.reason, exc.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> SortedJSON:
        reason = "body is nested too deeply" if isinstance(exc.__cause__, RecursionError) else str(exc.detail)
        return _json_error(exc.status_code, reason, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> SortedJSON:
        return _json_error(400, _first_error(exc.errors()))

    @app.exception_handler(Exception)
    async def fault(request: Request, exc: Exception) -> SortedJSON:
        log.error("error serving %s %s", request.method, request.url.path, exc_info=exc)
        return _json_error(500, "internal error; the fleet server logged the details")

    app.state.document = document(app, fleet.reads_open)
    return app


def document(app: FastAPI, reads_open: bool) -> dict[str, Any]:
    """The OpenAPI document of `app`'s routes, with each operation's role and security, and without
    FastAPI's 422 answers (validation errors are 400 `{"error": ...}` here)."""
    doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=router.routes)
    doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer",
                                                       "description": "A token from `edgeops operator add`, or "
                                                                      "api_token in fleet.json (fleet-admin)."}}
    for schema in ("HTTPValidationError", "ValidationError"):
        doc["components"]["schemas"].pop(schema, None)
    error = {"$ref": "#/components/schemas/Error"}
    for api_route in router.routes:
        policy = POLICY[api_route.endpoint]
        for method in api_route.methods:
            operation = doc["paths"][api_route.path_format][method.lower()]
            operation["responses"].pop("422", None)
            needs = None if policy.role == "viewer" and reads_open else policy.role
            operation["x-role"] = needs or "none"
            operation["security"] = [{"bearer": []}] if needs else []
            answers = {"401": "Missing or wrong bearer token." if needs else "A token was sent and it is wrong."}
            if needs:
                answers["403"] = f"The token's role is below {needs}."
            for status, text in answers.items():
                operation["responses"][status] = {"description": text, "content": {"application/json": {"schema": error}}}
    return doc


# --- the guard: everything decided before a body is read -------------------------------------------------


class Guard:
    """ASGI middleware in front of the app; see the module's invariants for what it refuses, in order."""

    def __init__(self, app: FastAPI, fleet: FleetApi) -> None:
        self.app, self.fleet = app, fleet

    async def __call__(self, scope: dict[str, Any], receive: Callable[[], Awaitable[dict]],
                        send: Callable[[dict], Awaitable[None]]) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        scope["state"] = state = {"operator": None}
        refusal = await self._check(scope, state)
        if refusal is not None:
            await _drain(scope, receive)
            await refusal(scope, receive, send)
            return await self._audit(state, {"status": refusal.status_code, "body": refusal.body})
        answer: dict[str, Any] = {}

        async def watch(message: dict) -> None:
            if message["type"] == "http.response.start":
                answer["status"] = message["status"]
            elif message["type"] == "http.response.body" and answer.get("status", 200) >= 400:
                answer["body"] = answer.get("body", b"") + message.get("body", b"")
            await send(message)

        try:
            await self.app({**scope, "method": "GET"} if scope["method"] == "HEAD" else scope, receive, watch)
        except Exception:  # answered and logged by the app's handler for Exception; nothing else to do
            answer.setdefault("status", 500)
        await self._audit(state, answer)

    async def _check(self, scope: dict[str, Any], state: dict[str, Any]) -> SortedJSON | None:
        headers = scope["headers"]
        if len(headers) > MAX_HEADERS:
            return _json_error(431, f"more than {MAX_HEADERS} headers")
        method = scope["method"]
        if method not in METHODS:
            return _json_error(501, f"{method} is not an HTTP method this server knows")
        host = _header(headers, b"host")
        if host is not None and _hostname(host) not in self.fleet.hosts:
            return _json_error(421, f"Host {host[:100]!r} is not a name this fleet API answers to; start it with "
                                    "--allowed-host NAME to add one")
        found, allowed = None, set()
        for candidate in router.routes:
            match, child = candidate.matches({**scope, "method": "GET" if method == "HEAD" else method})
            if match is Match.FULL:
                found = candidate
                break
            if match is Match.PARTIAL:
                allowed |= candidate.methods
        if found is None:
            if allowed:
                listed = ", ".join(sorted(allowed))
                return _json_error(405, f"{scope['path']} accepts {listed}, not {method}", {"Allow": listed})
            return _json_error(404, f"no such endpoint {scope['path']}; see /v1/openapi.json")
        policy = POLICY[found.endpoint]
        state["policy"], state["params"] = policy, child.get("path_params", {})
        refusal = await self._authorize(headers, policy, state)
        return refusal or self._check_body(headers, policy)

    async def _authorize(self, headers: list[tuple[bytes, bytes]], policy: Policy, state: dict[str, Any]) -> SortedJSON | None:
        needs = None if policy.role == "viewer" and self.fleet.reads_open else policy.role
        sent = _header(headers, b"authorization")
        if sent is not None:  # a token sent is checked, never ignored
            scheme, _, token = sent.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                return _json_error(401, f"send the token as Authorization: Bearer <token> ({_ISSUE})",
                                   {"WWW-Authenticate": 'Bearer realm="edgeops"'})
            state["operator"] = await anyio.to_thread.run_sync(self.fleet.read, operators.authenticate, token.strip())
            if state["operator"] is None:
                return _json_error(401, f"wrong token: revoked, or never issued ({_ISSUE})",
                                   {"WWW-Authenticate": 'Bearer realm="edgeops", error="invalid_token"'})
        if needs is None:
            return None
        who = state["operator"]
        if who is None:
            return _json_error(401, f"missing token: send Authorization: Bearer <token> ({_ISSUE})",
                               {"WWW-Authenticate": 'Bearer realm="edgeops"'})
        if not operators.allows(who.role, needs):
            return _json_error(403, f"{who.name} is a {who.role}; this needs the {needs} role "
                                    "(`edgeops operator add NAME --role ROLE` on the fleet)")
        return None

    def _check_body(self, headers: list[tuple[bytes, bytes]], policy: Policy) -> SortedJSON | None:
        if policy.body is None:
            return None
        length, chunked = _header(headers, b"content-length"), _header(headers, b"transfer-encoding") is not None
        if not policy.body_required and length is None and not chunked:
            return None
        if chunked or length is None:
            return _json_error(411, "send the body with a Content-Length (no chunked encoding)")
        if not re.fullmatch(r"[0-9]{1,18}", length.strip()):
            return _json_error(400, "Content-Length must be a non-negative integer")
        limit = self.fleet.max_body if policy.body == "multipart/form-data" else MAX_JSON_BODY
        if int(length) > limit:
            return _json_error(413, f"body of {int(length)} bytes is over this server's limit of {limit} bytes")
        kind = (_header(headers, b"content-type") or "").split(";")[0].strip().lower()
        if int(length) and kind != policy.body:
            return _json_error(415, f"send the body as {policy.body}, not {kind or 'no Content-Type'}")
        return None

    async def _audit(self, state: dict[str, Any], answer: dict[str, Any]) -> None:
        """One audit row for a change asked by a known operator, whatever came of it."""
        policy, who = state.get("policy"), state["operator"]
        if policy is None or policy.action is None or who is None:
            return
        params = state["params"]
        status = answer.get("status", 500)
        result = "ok"
        if status >= 400:
            try:
                result = f"error {status}: {json.loads(answer.get('body', b''))['error']}"
            except (ValueError, KeyError, TypeError):
                result = f"error {status}"
        obj = state.get("audit_object") or policy.subject.format(**params) or policy.action.split()[0]
        await anyio.to_thread.run_sync(self.fleet.read, lambda db: audit.record(
            db, who.name, policy.action.format(**params), obj, result))


async def _drain(scope: dict[str, Any], receive: Callable[[], Awaitable[dict]]) -> None:
    """Read and drop a request body, for a bounded time: closing on unread data resets the
    connection, and the client may lose the answer it has not read yet. A client waiting for
    `100 Continue` sent nothing, so nothing is read."""
    headers = scope["headers"]
    if (_header(headers, b"content-length") in (None, "0") and _header(headers, b"transfer-encoding") is None
            or (_header(headers, b"expect") or "").lower() == "100-continue"):
        return
    with anyio.move_on_after(DRAIN_SECONDS):
        while (await receive()).get("more_body"):
            pass


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> str | None:
    return next((value.decode("latin-1") for key, value in headers if key == name), None)


def _hostname(host: str) -> str:
    """The name in a Host header, without the port, lowercase; IPv6 without brackets."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    return host.rpartition(":")[0] if host.count(":") == 1 else host


class _Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol answering unparseable requests with JSON, as every other answer is."""

    def handle_events(self) -> None:
        try:
            super().handle_events()
        except ValueError:  # h11's int() of a Content-Length of 4300 digits or more
            self.send_400_response("")

    def send_400_response(self, msg: str) -> None:
        import h11

        body = json.dumps({"error": "malformed HTTP request: check the request line, the headers and "
                                    "Content-Length"}).encode()
        for event in (h11.Response(status_code=400, reason=b"Bad Request", headers=[
                          (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                          (b"connection", b"close")]),
                      h11.Data(data=body), h11.EndOfMessage()):
            self.transport.write(self.conn.send(event))
        self.transport.close()


# --- the server -----------------------------------------------------------------------------------------


def parse_bind(text: str) -> tuple[str, int]:
    """`HOST:PORT` (port 0: any free port; an IPv6 host in brackets) as a (host, port) pair; EdgeopsError otherwise."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise EdgeopsError(f"--http {text!r} must look like HOST:PORT, e.g. {DEFAULT_HTTP}")
    return host.removeprefix("[").removesuffix("]"), int(port)


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host.lower() == "localhost"


def serve_options(home: fleethome.FleetHome, options: dict[str, Any]) -> dict[str, Any]:
    """ApiServer's options for `fleet serve`: HTTPS with the fleet's API certificate (pki/api.pem from
    the fleet CA; issued now for a fleet made before it) unless tls_cert/tls_key are given or
    `plain_http` is set (ApiServer allows plain HTTP on loopback only); the certificate's names
    are accepted in the Host header."""
    options = dict(options)
    plain = options.pop("plain_http", False)
    if plain and (options.get("tls_cert") is not None or options.get("tls_key") is not None):
        raise EdgeopsError("give --plain-http or --tls-cert/--tls-key, not both")
    if plain or options.get("tls_cert") is not None or options.get("tls_key") is not None:
        return options
    cert, key = home.pki / fleethome.API_CERT, home.pki / fleethome.API_KEY
    if not cert.exists() or not key.exists():
        fleethome.issue_api_certificate(home)
    hosts = (*options.get("allowed_hosts", ()), *home.config.get("api_hosts", []))
    return {**options, "tls_cert": cert, "tls_key": key, "allowed_hosts": hosts}


class ApiServer:
    """The API on its own thread (uvicorn). Binds when constructed, so a taken port or an unusable
    certificate fails before `start()`; plain HTTP only on loopback."""

    def __init__(self, home: fleethome.FleetHome, bind: str = DEFAULT_HTTP, max_body: int = DEFAULT_MAX_BODY, *,
                 tls_cert: Path | None = None, tls_key: Path | None = None, allowed_hosts: tuple[str, ...] = (),
                 open_reads: bool | None = None) -> None:
        host, port = parse_bind(bind)
        if (tls_cert is None) != (tls_key is None):
            raise EdgeopsError("give --tls-cert and --tls-key together")
        if tls_cert is None and not is_loopback(host):
            raise EdgeopsError(f"--http {bind} is not a loopback address: serve it over HTTPS (without --plain-http: "
                               "the fleet's certificate, or --tls-cert and --tls-key), or bind 127.0.0.1")
        self.tls = tls_cert is not None
        hosts = LOOPBACK_NAMES | {host.lower()} | {name.lower() for name in allowed_hosts}
        fleet = FleetApi(home, max_body, is_loopback(host) if open_reads is None else open_reads, hosts)
        self.app = create_app(fleet)
        try:
            self._socket = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
        except OSError as exc:  # taken port, unknown host
            raise EdgeopsError(f"cannot listen on {bind} for the HTTP API: {exc.strerror or exc}") from None
        config = uvicorn.Config(Guard(self.app, fleet), http=_Protocol, lifespan="off", log_config=None, proxy_headers=False,
                                access_log=False, timeout_graceful_shutdown=3, server_header=False,
                                ssl_certfile=tls_cert and str(tls_cert), ssl_keyfile=tls_key and str(tls_key))
        try:
            config.load()
        except (OSError, ssl.SSLError) as exc:
            self._socket.close()
            raise EdgeopsError(f"cannot serve HTTPS with --tls-cert {tls_cert} and --tls-key {tls_key}: {exc}") from None
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._socket]},
                                        name="edgeops-api", daemon=True)

    @property
    def fleet(self) -> FleetApi:
        return self.app.state.fleet

    @property
    def url(self) -> str:
        host, port = self._socket.getsockname()[:2]
        return f"{'https' if self.tls else 'http'}://{f'[{host}]' if ':' in host else host}:{port}"

    def start(self) -> "ApiServer":
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise EdgeopsError(f"the HTTP API on {self.url} did not start; see the log above")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        if self._thread.is_alive():
            self._server.should_exit = True
            self._thread.join(timeout=10)
        self._socket.close()
