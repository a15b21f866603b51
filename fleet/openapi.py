"""The OpenAPI 3.1 description of the fleet's HTTP API (edgeops.fleet.api), written by hand.

Invariants (checked by tests/test_fleet_api.py): `DOCUMENT["paths"]` lists exactly the routes of
`edgeops.fleet.api.ROUTES`, and every answer the server gives conforms to the schema documented for
it: response objects list all their fields as required and allow no others.
"""

from __future__ import annotations

from typing import Any

from edgeops import __version__
from edgeops.protocol.wire import STATES

_NULLABLE_STRING = {"type": ["string", "null"]}
_LABELS = {"type": "object", "additionalProperties": {"type": "string"}, "examples": [{"site": "lab"}]}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _object(properties: dict[str, Any]) -> dict[str, Any]:
    """A response object: every property present (maybe null), nothing else."""
    return {"type": "object", "properties": properties, "required": sorted(properties), "additionalProperties": False}


def _json(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _error(description: str) -> dict[str, Any]:
    return _json(description, _ref("Error"))


_OTHER = {"default": _error("Any other failure: 404 unknown path, 405 wrong method, 500 server fault (logged).")}
_AUTHED = {"401": _error("Missing or wrong bearer token."), **_OTHER}


def _read(summary: str, description: str, schema: dict[str, Any], **errors: dict[str, Any]) -> dict[str, Any]:
    return {"get": {"summary": summary, "responses": {"200": _json(description, schema), **errors, **_AUTHED}}}


_SCHEMAS: dict[str, Any] = {
    "Error": _object({"error": {"type": "string", "description": "What was wrong with the request, in one line."}}),
    "Health": _object({"status": {"const": "ok"}, "version": {"type": "string"}}),
    "Execution": _object({
        "device": {"type": "string"},
        "release_id": {"type": "integer"},
        "state": {"enum": list(STATES)},
        "reason": {"type": "string", "description": "Why it failed or was rejected; empty otherwise."},
        "updated_at": {"type": "number", "description": "Unix time."},
    }),
    "Device": _object({
        "id": {"type": "string"},
        "profile": {"type": "string"},
        "labels": _LABELS,
        "enrolled_at": {"type": "number", "description": "Unix time."},
        "last_seen": {"type": ["number", "null"], "description": "Unix time; null before the device's first report."},
        "online": {"type": "boolean"},
        "installed_model": _NULLABLE_STRING,
        "installed_version": _NULLABLE_STRING,
        "installed_target": _NULLABLE_STRING,
        "slot": _NULLABLE_STRING,
        "execution": {"anyOf": [_ref("Execution"), {"type": "null"}], "description": "The latest execution."},
        "telemetry": {"anyOf": [_ref("DeviceTelemetry"), {"type": "null"}],
                      "description": "What the device's telemetry says; null before any arrived."},
    }),
    "DeviceTelemetry": _object({
        "received": {"type": "integer", "description": "Records received from the device (each counted once)."},
        "dropped": {"type": "integer", "description": "Records the device dropped because its outbox was full."},
        "inferences": {"type": "integer", "description": "Inference records among its latest 1000 records of that kind."},
        "errors": {"type": "integer", "description": "Failed inferences among those."},
        "p95_ms": {"type": ["number", "null"], "description": "95th percentile runtime latency over those."},
        "metrics": {"type": ["object", "null"], "description": "Its latest device metrics sample (docs/protocol.md)."},
    }),
    "DesiredRelease": _object({
        "release_id": {"type": "integer"},
        "model": {"type": "string"},
        "version": {"type": "string"},
        "target": {"type": "string", "description": "The bundle built for the device's profile."},
        "sha256": {"type": "string"},
        "length": {"type": "integer"},
    }),
    "ReleaseTarget": _object({
        "release_id": {"type": "integer"},
        "profile": {"type": "string"},
        "target": {"type": "string"},
        "sha256": {"type": "string"},
        "length": {"type": "integer"},
    }),
    "Release": _object({
        "id": {"type": "integer"},
        "model": {"type": "string"},
        "version": {"type": "string"},
        "selector": _LABELS,
        "created_at": {"type": "number", "description": "Unix time."},
        "targets": {"type": "array", "items": _ref("ReleaseTarget")},
    }),
    "PushRequest": {
        "type": "object",
        "required": ["bundles"],
        "additionalProperties": False,
        "properties": {
            "bundles": {
                "type": "array", "minItems": 1,
                "description": "The bundles of one model version, at most one per profile.",
                "items": {
                    "type": "object", "required": ["name", "data"], "additionalProperties": False,
                    "properties": {
                        "name": {"type": "string", "pattern": "^[A-Za-z0-9_-][A-Za-z0-9._-]{0,199}$",
                                 "description": "File name; becomes the TUF target name.",
                                 "examples": ["digits-1.1.0-rpi4.edgeops"]},
                        "data": {"type": "string", "contentEncoding": "base64", "description": "The bundle file."},
                    },
                },
            },
            "select": {**_LABELS, "description": "Only devices with these labels; default: every device."},
        },
    },
}
_SCHEMAS["DeviceDetail"] = _object({
    **_SCHEMAS["Device"]["properties"],
    "desired": {"anyOf": [_ref("DesiredRelease"), {"type": "null"}],
                "description": "The release the device should run: the newest one matching its labels and profile."},
})

DOCUMENT: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {
        "title": "edgeops fleet API",
        "version": __version__,
        "description": (
            "Operators' HTTP JSON API of `edgeops fleet serve`. Every route except /v1/health and "
            "/v1/openapi.json needs `Authorization: Bearer <token>`, the token being `api_token` in the "
            "fleet's fleet.json. Errors are `{\"error\": \"...\"}` with a 4xx status for bad requests and "
            "500 for server faults. Pushes are signed with the targets key kept in the fleet repository; "
            "to sign with an offline targets key, push with `edgeops push --fleet DIR --key KEY` instead."
        ),
    },
    "security": [{"bearer": []}],
    "paths": {
        "/v1/health": {"get": {"summary": "Liveness; needs no token.", "security": [],
                               "responses": {"200": _json("The server is up.", _ref("Health")), **_OTHER}}},
        "/v1/openapi.json": {"get": {"summary": "This document; needs no token.", "security": [],
                                     "responses": {"200": _json("OpenAPI 3.1 document.", {"type": "object"}), **_OTHER}}},
        "/v1/status": _read("Devices and releases, as `edgeops status --json` prints them.", "Fleet status.",
                            _object({"devices": {"type": "array", "items": _ref("Device")},
                                     "releases": {"type": "array", "items": _ref("Release")}})),
        "/v1/devices": _read("Every device with its latest execution.", "Devices by id.",
                             _object({"devices": {"type": "array", "items": _ref("Device")}})),
        "/v1/devices/{device_id}": {
            "parameters": [{"name": "device_id", "in": "path", "required": True, "schema": {"type": "string"}}],
            **_read("One device, with the release it should run.", "The device.", _ref("DeviceDetail"),
                    **{"404": _error("No device with this id is enrolled.")}),
        },
        "/v1/drift": {
            "parameters": [{"name": "model", "in": "query", "required": False, "schema": {"type": "string"},
                            "description": "Only this model; default: every model with drift telemetry."}],
            **_read("Drift per model version, merged over devices, as `edgeops drift report --json` prints it.",
                    "The drift report (fields: docs/drift.md).",
                    {"type": "object", "required": ["alpha", "psi_floor", "persistence", "versions"],
                     "properties": {"alpha": {"type": "number"}, "psi_floor": {"type": "number"},
                                    "persistence": {"type": "string"},
                                    "versions": {"type": "array", "items": {"type": "object"}}}},
                    **{"404": _error("No drift telemetry from that model.")}),
        },
        "/v1/releases": {
            **_read("Every release, oldest first.", "Releases.",
                    _object({"releases": {"type": "array", "items": _ref("Release")}})),
            "post": {
                "summary": "Sign bundles of one model version into the repository and release them.",
                "requestBody": {"required": True, "content": {"application/json": {"schema": _ref("PushRequest")}}},
                "responses": {
                    "201": _json("The release was created.", _object({"release": {"type": "integer"}})),
                    "400": _error("Bad JSON, a missing or mistyped field, bad base64, or a bundle refused "
                                  "(the reason says why: tampered, not a bundle, mixed versions, ...)."),
                    "411": _error("No Content-Length."),
                    "413": _error("The body is larger than the server's limit."),
                    "415": _error("The body is not application/json."),
                    **_AUTHED,
                },
            },
        },
    },
    "components": {
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                       "description": "`api_token` from the fleet's fleet.json."}},
        "schemas": _SCHEMAS,
    },
}
