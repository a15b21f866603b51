"""schemathesis against the fleet's HTTP API, driven by the OpenAPI document the server itself serves
(GET /v1/openapi.json): a live `ApiServer` on a real fleet directory holding a pushed release, device
reports and telemetry, so the reads return real rows.

Two passes over every operation, one with the fleet's bearer token and one without. schemathesis's
examples, coverage and fuzzing phases send schema-valid and malformed requests (wrong types, missing
and extra fields, out-of-range ids, undeclared methods) and check each answer: no 5xx; the status code,
content type, headers and body are the ones the document gives for it (so every error is the
documented `{"error": ...}` JSON); malformed requests get a 4xx; reads and changes refuse a missing or
wrong token as documented.

Fuzzed examples per operation: EDGEOPS_SCHEMA_EXAMPLES (default 50; both passes take about 20 s on this
2-core machine, plus the digits bundle build shared with other tests). A longer run (300: about 3 min):
`EDGEOPS_SCHEMA_EXAMPLES=1000 .venv/bin/pytest -q tests/test_api_schema.py`. The seed is fixed, so a run
repeats the same requests; change it in `_schema` to explore others.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import time

import pytest
import schemathesis
from schemathesis import engine
from schemathesis.engine import events

from edgeops.fleet import client, registry
from edgeops.fleet.api import ApiServer
from edgeops.fleet.home import enroll_device, init_fleet
from telemetrykit import inference, report, send, window

EXAMPLES = int(os.environ.get("EDGEOPS_SCHEMA_EXAMPLES", "50"))
DEVICES = {"dev-a": "x86-vnni", "dev-b": "rpi4"}
# A malformed request must be refused with a 4xx: never accepted, never a 5xx (schemathesis's default
# also accepts 5xx here; the fleet's contract does not).
REFUSED = ["400", "401", "403", "404", "405", "409", "411", "413", "415"]


@pytest.fixture(scope="module")
def served(tmp_path_factory, digits_bundle):
    """The API on a fleet with two devices, release 1 (digits for x86-vnni) pushed over the API,
    dev-a running it, and inference and drift telemetry from dev-a."""
    tmp = tmp_path_factory.mktemp("schema-fleet")
    home = init_fleet(tmp / "fleet")
    for device_id, profile in DEVICES.items():
        enroll_device(home, device_id, profile, {"site": "lab"}, tmp / device_id)
    server = ApiServer(home, "127.0.0.1:0").start()
    assert client.push(server.url, home.config["api_token"], [digits_bundle.path], {"site": "lab"}) == 1
    db = registry.open_db(home.db_path)
    version = registry.releases(db)[0]["version"]
    report(db, "dev-a", 1, "active", installed=("digits", version))
    report(db, "dev-b", 1, "failed", reason="self-test failed")
    now = time.time()
    send(db, "dev-a", [(seq, "inference", now - 60 + seq, inference("digits", version, 1.0 + seq / 10, ok=seq % 7 != 0))
                       for seq in range(1, 40)]
         + [(40 + i, "drift", now - 30 + i, window("digits", version, i, shifted=i > 1)) for i in range(4)], dropped=3)
    yield server
    server.stop()


def _schema(server: ApiServer, token: str | None) -> schemathesis.BaseSchema:
    config: dict = {
        "seed": 7,  # the same requests every run; a longer run explores more of them
        "generation": {"max-examples": EXAMPLES, "mode": "all", "with-security-parameters": False,
                       "database": "none"},
        "phases": {"stateful": {"enabled": False}},
        "checks": {"negative_data_rejection": {"expected-statuses": REFUSED}},
        # Bundles that pass the reader's checks cannot be generated from a schema: a generated push is
        # refused with 400 "not a bundle", which is right; the real pushes are in test_fleet_api.py.
        "operations": [{"include-path": "/v1/releases", "include-method": "POST",
                        "checks": {"positive_data_acceptance": {"enabled": False}}}],
    }
    if token is not None:
        config["auth"] = {"openapi": {"bearer": {"bearer": token}}}
    return schemathesis.openapi.from_url(f"{server.url}/v1/openapi.json",
                                         config=schemathesis.Config.from_dict(config))


@schemathesis.check
def changes_need_the_token(ctx, response, case) -> None:
    """A change (a documented POST) without `Authorization` is refused with 401 before anything else is looked at."""
    if case.operation.method.upper() == response.request.method == "POST" and "Authorization" not in response.request.headers:
        assert response.status_code == 401, f"POST without a token got {response.status_code}, not 401"


def run(schema: schemathesis.BaseSchema) -> tuple[list[str], dict[str, int]]:
    """Every phase schemathesis runs from the command line (examples, coverage, fuzzing) over every
    operation; the failures (check, operation, reason, how to reproduce) and the requests sent per operation."""
    failures, sent = [], {}
    for event in engine.from_schema(schema).execute():
        if isinstance(event, events.ScenarioFinished):
            recorder = event.recorder
            sent[recorder.label] = sent.get(recorder.label, 0) + len(recorder.interactions)
            for checks in recorder.checks.values():
                for check in checks:
                    if check.failure_info is not None:
                        failure = check.failure_info.failure
                        failures.append(f"{check.name} on {recorder.label}: {failure.title}: {failure.message}\n"
                                        f"    {check.failure_info.code_sample}")
        elif isinstance(event, events.NonFatalError):
            failures.append(f"schemathesis error on {event.label}: {event.value!r}")
        elif isinstance(event, events.FatalError):
            failures.append(f"schemathesis stopped: {event.exception!r}")
    return sorted(set(failures)), sent


@pytest.mark.parametrize("token", [True, False], ids=["with-token", "without-token"])
def test_every_operation_conforms_to_the_openapi_document(served, token):
    schema = _schema(served, served.fleet.home.config["api_token"] if token else None)
    failures, sent = run(schema)
    assert not failures, f"{len(failures)} failure(s):\n" + "\n".join(failures)
    operations = {f"{method.upper()} {path}" for path, item in schema.raw_schema["paths"].items() for method in item
                  if method in ("get", "post") and path != "/v1/openapi.json"}  # schemathesis skips its own source
    assert {label for label, count in sent.items() if count} >= operations, sent


def test_head_is_get_without_the_body(served):
    conn = http.client.HTTPConnection(*served._socket.getsockname()[:2], timeout=30)
    try:
        conn.request("GET", "/v1/status")
        got = conn.getresponse()
        body = got.read()
        conn.close()
        conn.request("HEAD", "/v1/status")
        head = conn.getresponse()
        assert (head.status, head.getheader("Content-Type"), head.read()) == (200, "application/json", b"")
        assert int(head.getheader("Content-Length")) == len(body) and got.status == 200
    finally:
        conn.close()


def test_a_content_length_of_thousands_of_digits_gets_a_json_answer(served):
    """Found reading the code, not by schemathesis (it does not vary Content-Length): int() refuses
    4300 digits and up (h11 too), which dropped the connection without an answer."""
    token = served.fleet.home.config["api_token"]
    for request, expected in [(f"POST /v1/releases HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n"
                               "Content-Type: multipart/form-data; boundary=x\r\n", (400, "error")),
                              ("GET /v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\n", (400, "error"))]:
        with socket.create_connection(served._socket.getsockname()[:2], timeout=30) as sock:
            sock.sendall(f"{request}Content-Length: {'9' * 5000}\r\n\r\n".encode())
            sock.shutdown(socket.SHUT_WR)
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        head, _, body = answer.partition(b"\r\n\r\n")
        assert b"\r\ncontent-type: application/json\r\n" in head.lower() + b"\r\n", answer
        status, field = expected
        assert int(head.split()[1]) == status and field in json.loads(body), answer
