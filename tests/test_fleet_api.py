"""The operators' HTTP API (edgeops.fleet.api) against a real fleet directory, over real sockets:
token auth, reads, pushes of real bundles, every kind of bad request answered with a JSON error (and
the server still up), the OpenAPI document matching the route table and the answers, and the CLI's
`push`/`status --fleet URL`. No MQTT, except the last test, which runs `edgeops fleet serve`."""

from __future__ import annotations

import base64
import http.client
import json
import logging
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from edgeops.cli import cli
from edgeops.fleet import registry
from edgeops.fleet.api import ROUTES, ApiServer
from edgeops.fleet.home import enroll_device, init_fleet

sys.path.insert(0, str(Path(__file__).parent))
from fleetkit import PROFILES, free_port, releases, wait_for  # noqa: E402,F401  (fixtures)

DEVICES = {"dev-a": "x86-vnni", "dev-b": "rpi4"}


@pytest.fixture
def home(tmp_path):
    home = init_fleet(tmp_path / "fleet")
    for device_id, profile in DEVICES.items():
        enroll_device(home, device_id, profile, {"site": "lab"}, tmp_path / device_id)
    return home


@pytest.fixture
def api(home):
    server = ApiServer(home, "127.0.0.1:0").start()
    yield server
    server.stop()


def call(server: ApiServer, method: str, path: str, body: Any = None, token: str | None = "home",
         headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], Any]:
    """One request; `body` is sent as JSON unless bytes; token "home" means the fleet's own token."""
    if token == "home":
        token = server._httpd.api.token
    sent = dict(headers or {})
    if token is not None:
        sent.setdefault("Authorization", f"Bearer {token}")
    if body is not None and not isinstance(body, bytes):
        body = json.dumps(body).encode()
    if body is not None:
        sent.setdefault("Content-Type", "application/json")
    host, port = server.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.request(method, path, body=body, headers=sent)
        response = conn.getresponse()
        raw = response.read()
        assert response.getheader("Content-Type") == "application/json", raw
        return response.status, dict(response.getheaders()), json.loads(raw)
    finally:
        conn.close()


def raw(server: ApiServer, request: bytes) -> tuple[int, Any]:
    """Send bytes as they are (what http.client would not send); the status and JSON body of the answer."""
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"\r\nContent-Type: application/json\r\n" in head, answer
    return int(head.split()[1]), json.loads(body)


def assert_alive(server: ApiServer) -> None:
    assert call(server, "GET", "/v1/health", token=None)[0] == 200


def push_body(paths: list[Path], select: dict[str, str] | None = None, names: list[str] | None = None) -> dict:
    names = names or [p.name for p in paths]
    return {"bundles": [{"name": n, "data": base64.b64encode(p.read_bytes()).decode()} for n, p in zip(names, paths)],
            "select": select or {}}


# --- token and reads ------------------------------------------------------------------------------------


def test_init_writes_a_token_readable_by_the_owner_only(home):
    config = home.path / "fleet.json"
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    assert len(json.loads(config.read_text())["api_token"]) >= 40


def _path(template: str) -> str:
    return template.replace("{device_id}", "dev-a").replace("{rollout_id}", "1").replace("{action}", "pause")


@pytest.mark.parametrize("route", [r for r in ROUTES if r.auth], ids=lambda r: f"{r.method} {r.template}")
def test_every_change_needs_the_token(api, route):
    assert route.method == "POST"
    path = _path(route.template)
    body = {"bundles": []} if route.body else None
    for token in (None, "wrong", ""):
        status, headers, data = call(api, route.method, path, body, token=token)
        assert status == 401, data
        assert "WWW-Authenticate" in headers and "api_token" in data["error"]
    basic = {"Authorization": "Basic " + base64.b64encode(b"x:y").decode()}
    assert call(api, route.method, path, body, token=None, headers=basic)[0] == 401
    assert call(api, route.method, path, body, token=api._httpd.api.token + "x")[0] == 401


def test_reads_need_no_token_but_a_wrong_one_is_refused(api):
    assert call(api, "GET", "/v1/health", token=None)[2]["status"] == "ok"
    assert call(api, "GET", "/v1/openapi.json", token=None)[2]["openapi"].startswith("3.1")
    assert [d["id"] for d in call(api, "GET", "/v1/devices", token=None)[2]["devices"]] == sorted(DEVICES)
    assert all(not r.auth for r in ROUTES if r.method == "GET")
    status, headers, data = call(api, "GET", "/v1/status", token="wrong")
    assert status == 401 and "WWW-Authenticate" in headers, data


def test_reads_answer_what_the_registry_holds(api, home):
    db = registry.open_db(home.db_path)
    status, _, data = call(api, "GET", "/v1/status")
    assert status == 200 and data == json.loads(json.dumps(registry.status(db)))
    assert [d["id"] for d in call(api, "GET", "/v1/devices")[2]["devices"]] == sorted(DEVICES)
    status, _, device = call(api, "GET", "/v1/devices/dev-b")
    assert status == 200
    assert (device["id"], device["profile"], device["labels"], device["execution"], device["desired"]) == (
        "dev-b", "rpi4", {"site": "lab"}, None, None)
    assert call(api, "GET", "/v1/releases")[2] == {"releases": []}


# --- pushes ---------------------------------------------------------------------------------------------


def test_push_over_http_creates_the_release(api, home, releases):
    paths = [releases[("1.0.0", p)] for p in PROFILES]
    status, _, data = call(api, "POST", "/v1/releases", push_body(paths, {"site": "lab"}))
    assert (status, data) == (201, {"release": 1})
    [release] = registry.releases(registry.open_db(home.db_path))
    assert (release["model"], release["version"], release["selector"]) == ("digits", "1.0.0", {"site": "lab"})
    assert {t["profile"]: t["target"] for t in release["targets"]} == {p: releases[("1.0.0", p)].name for p in PROFILES}
    for target in release["targets"]:
        assert (home.repo / "targets" / f"{target['sha256']}.{target['target']}").is_file()
    rollout = call(api, "GET", "/v1/rollouts/1")[2]
    assert (rollout["state"], rollout["stage"], rollout["plan"]["stages"]) == ("running", 0, ["1dev", "10%", "50%", "100%"])
    assert [d["action"] for d in rollout["decisions"]] == ["start"]
    # the engine (in `fleet serve`) assigns devices once they are online; these never connected
    assert call(api, "GET", "/v1/devices/dev-b")[2]["desired"] is None
    assert call(api, "GET", "/v1/releases")[2]["releases"][0]["id"] == 1


def _tampered(path: Path) -> bytes:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle] ^= 0xFF
    return bytes(data)


@pytest.mark.parametrize("case", ["tampered", "not-a-zip", "mixed-versions", "two-for-one-profile"])
def test_a_refused_bundle_gets_the_readers_reason(api, home, releases, case):
    v1 = releases[("1.0.0", "x86-vnni")]
    if case == "tampered":
        body = push_body([v1])
        body["bundles"][0]["data"] = base64.b64encode(_tampered(v1)).decode()
        expected = f"refusing bundle {v1.name}: "
    elif case == "not-a-zip":
        body = {"bundles": [{"name": v1.name, "data": base64.b64encode(b"hello").decode()}]}
        expected = f"refusing bundle {v1.name}: not a bundle"
    elif case == "mixed-versions":
        body = push_body([v1, releases[("1.1.0", "rpi4")]])
        expected = "one release is one model version"
    else:
        body = push_body([v1, v1], names=[v1.name, "copy.edgeops"])
        expected = "one bundle per profile"
    status, _, data = call(api, "POST", "/v1/releases", body)
    assert status == 400 and expected in data["error"], data
    assert "edgeops-upload-" not in data["error"]  # the server's temp dir stays out of the reason
    assert registry.releases(registry.open_db(home.db_path)) == []
    assert_alive(api)


GOOD = {"name": "m.edgeops", "data": base64.b64encode(b"x").decode()}


@pytest.mark.parametrize("body, expected", [
    (b"{not json", "body is not valid JSON"),
    (b"\xff\xfe", "body is not valid JSON"),
    ([GOOD], "body must be a JSON object"),
    ({}, "missing field bundles"),
    ({"bundles": [GOOD], "selector": {}}, "unknown field(s) selector"),
    ({"bundles": []}, "bundles must be a non-empty list"),
    ({"bundles": "m.edgeops"}, "bundles must be a non-empty list"),
    ({"bundles": [["m.edgeops", "eA=="]]}, "bundles[0] must be an object with exactly name and data"),
    ({"bundles": [{"name": "m.edgeops"}]}, "bundles[0] must be an object with exactly name and data"),
    ({"bundles": [{**GOOD, "name": 7}]}, "bundles[0].name must be a file name"),
    ({"bundles": [{**GOOD, "name": "../../etc/passwd"}]}, "bundles[0].name must be a file name"),
    ({"bundles": [{**GOOD, "name": ".hidden"}]}, "bundles[0].name must be a file name"),
    ({"bundles": [GOOD, {**GOOD, "data": 12}]}, "bundles[1].data must be a base64 string"),
    ({"bundles": [{**GOOD, "data": "not base64!"}]}, "bundles[0].data is not valid base64"),
    ({"bundles": [GOOD, GOOD]}, "bundle names must be distinct"),
    ({"bundles": [GOOD], "select": ["site=lab"]}, "select must be an object of label strings"),
    ({"bundles": [GOOD], "select": {"site": 1}}, "select must be an object of label strings"),
], ids=lambda v: None if isinstance(v, str) else repr(v)[:40])
def test_a_bad_push_body_gets_a_json_error(api, body, expected):
    status, _, data = call(api, "POST", "/v1/releases", body)
    assert status == 400 and data["error"].startswith(expected), data
    assert_alive(api)


def test_push_needs_json_and_a_length(api):
    status, _, data = call(api, "POST", "/v1/releases", b"bundles=x", headers={"Content-Type": "text/plain"})
    assert status == 415 and "application/json" in data["error"]
    auth = f"Authorization: Bearer {api._httpd.api.token}\r\nContent-Type: application/json\r\n".encode()
    status, data = raw(api, b"POST /v1/releases HTTP/1.1\r\nHost: x\r\n" + auth + b"\r\n")
    assert status == 411 and "Content-Length" in data["error"], data
    chunked = b"POST /v1/releases HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n" + auth + b"\r\n2\r\n{}\r\n0\r\n\r\n"
    assert raw(api, chunked)[0] == 411
    status, _, data = call(api, "POST", "/v1/releases", b"{}", headers={"Content-Length": "-3"})
    assert status == 400 and "Content-Length" in data["error"], data
    assert_alive(api)


def test_an_oversize_body_is_refused_unread(home):
    server = ApiServer(home, "127.0.0.1:0", max_body=1024).start()
    try:
        # Larger than loopback socket buffers (up to 32 MB here): without the server's drain the client's
        # send fails with a broken pipe and it never reads the 413 (checked by disabling the drain).
        body = b"x" * (64 << 20)
        status, _, data = call(server, "POST", "/v1/releases", body)
        assert status == 413 and data["error"] == f"body of {len(body)} bytes is over this server's limit of 1024 bytes"
        status, _, data = call(server, "POST", "/v1/releases", body, token="wrong")
        assert status == 401, data  # the token is checked before the body is even looked at
        assert_alive(server)
    finally:
        server.stop()


# --- other errors ---------------------------------------------------------------------------------------


def test_unknown_paths_devices_and_methods_get_json_errors(api):
    status, _, data = call(api, "GET", "/v1/nothing")
    assert status == 404 and "no such endpoint /v1/nothing" in data["error"]
    assert call(api, "GET", "/v1/status/", token=None)[0] == 404
    status, _, data = call(api, "GET", "/v1/devices/ghost")
    assert status == 404 and data["error"] == "no device 'ghost' is enrolled"
    status, headers, data = call(api, "DELETE", "/v1/releases")
    assert (status, headers["Allow"]) == (405, "GET, POST"), data
    status, headers, data = call(api, "OPTIONS", "/v1/status")
    assert (status, headers["Allow"]) == (405, "GET") and "OPTIONS" in data["error"], data
    status, _, data = call(api, "BREW", "/v1/status")  # not an HTTP method at all
    assert status == 501 and "BREW" in data["error"], data
    assert_alive(api)


def test_a_malformed_request_gets_a_json_error(api):
    status, data = raw(api, b"GET /v1/health GARBAGE HTTP/1.1\r\n\r\n")
    assert status == 400 and "GARBAGE" in data["error"]
    assert raw(api, b"GET /v1/health HTTP/1.1\r\n" + b"X: y\r\n" * 200 + b"\r\n")[0] == 431
    assert_alive(api)


def test_an_unexpected_exception_is_a_logged_500(api, monkeypatch, caplog):
    def broken(db):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(registry, "status", broken)
    with caplog.at_level(logging.ERROR, logger="edgeops.fleet.api"):
        status, _, data = call(api, "GET", "/v1/status")
    assert status == 500 and "disk on fire" not in data["error"] and "logged" in data["error"]
    assert "disk on fire" in caplog.text and "Traceback" in caplog.text
    assert_alive(api)


def test_a_fleet_without_a_token_is_not_served(home):
    from edgeops.fleet.home import FleetHome
    from edgeops.protocol.errors import EdgeopsError

    config = dict(home.config)
    del config["api_token"]
    with pytest.raises(EdgeopsError, match="no api_token"):
        ApiServer(FleetHome(home.path, config), "127.0.0.1:0")


@pytest.mark.parametrize("bind", ["8420", "localhost:", ":8420", "127.0.0.1:http", "127.0.0.1:70000"])
def test_a_bad_bind_address_is_refused(home, bind):
    from edgeops.protocol.errors import EdgeopsError

    with pytest.raises(EdgeopsError, match="must look like HOST:PORT"):
        ApiServer(home, bind)


# --- the OpenAPI document -------------------------------------------------------------------------------


def conforms(value: Any, schema: dict, doc: dict, where: str = "$") -> None:
    """Check `value` against the JSON Schema subset the document uses; AssertionError says where it fails."""
    if "$ref" in schema:
        target = doc
        for part in schema["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        return conforms(value, target, doc, where)
    if "anyOf" in schema:
        failures = []
        for option in schema["anyOf"]:
            try:
                return conforms(value, option, doc, where)
            except AssertionError as exc:
                failures.append(str(exc))
        raise AssertionError(f"{where}: matches none of anyOf: {failures}")
    kinds = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None),
             "integer": int, "number": (int, float)}
    types = schema.get("type")
    if types is not None:
        types = [types] if isinstance(types, str) else types
        assert any(isinstance(value, kinds[t]) and not (isinstance(value, bool) and t in ("integer", "number"))
                   for t in types), f"{where}: {value!r} is not {types}"
    if "enum" in schema:
        assert value in schema["enum"], f"{where}: {value!r} not in {schema['enum']}"
    if "const" in schema:
        assert value == schema["const"], f"{where}: {value!r} != {schema['const']!r}"
    if isinstance(value, dict):
        for name in schema.get("required", []):
            assert name in value, f"{where}: documented field {name} is missing"
        properties, extra = schema.get("properties", {}), schema.get("additionalProperties", True)
        for name, item in value.items():
            if name in properties:
                conforms(item, properties[name], doc, f"{where}.{name}")
            else:
                assert extra is not False, f"{where}: field {name} is not documented"
                if isinstance(extra, dict):
                    conforms(item, extra, doc, f"{where}.{name}")
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            conforms(item, schema["items"], doc, f"{where}[{i}]")


def response_schema(doc: dict, template: str, method: str, status: int) -> dict:
    responses = doc["paths"][template][method.lower()]["responses"]
    return responses.get(str(status), responses.get("default"))["content"]["application/json"]["schema"]


def test_openapi_lists_exactly_the_served_routes(api):
    doc = call(api, "GET", "/v1/openapi.json", token=None)[2]
    documented = {(method.upper(), path) for path, item in doc["paths"].items()
                  for method in item if method in ("get", "post", "put", "patch", "delete")}
    assert documented == {(r.method, r.template) for r in ROUTES}
    for route in ROUTES:
        operation = doc["paths"][route.template][route.method.lower()]
        assert (operation.get("security") == []) == (not route.auth), route
        if route.auth:
            assert "401" in operation["responses"]
    for ref in {m for m in json.dumps(doc).split('"') if m.startswith("#/")}:
        target = doc
        for part in ref.removeprefix("#/").split("/"):
            target = target[part]  # every reference resolves


def test_answers_conform_to_the_documented_schemas(api, releases):
    doc = call(api, "GET", "/v1/openapi.json", token=None)[2]
    body = push_body([releases[("1.1.0", p)] for p in PROFILES], {"site": "lab"})
    conforms(body, doc["paths"]["/v1/releases"]["post"]["requestBody"]["content"]["application/json"]["schema"], doc)
    status, _, data = call(api, "POST", "/v1/releases", body)
    conforms(data, response_schema(doc, "/v1/releases", "POST", status), doc)
    json_reads = [r for r in ROUTES if r.method == "GET" and r.template != "/v1/openapi.json"
                  and "application/json" in doc["paths"][r.template]["get"]["responses"]["200"]["content"]]
    assert {r.template for r in json_reads} >= {"/v1/status", "/v1/rollouts", "/v1/rollouts/{rollout_id}", "/v1/series"}
    for route in json_reads:
        path = _path(route.template)
        status, _, data = call(api, "GET", path)
        assert status == 200, data
        conforms(data, response_schema(doc, route.template, "GET", status), doc, route.template)
    for method, path, body, token in [("GET", "/v1/devices/ghost", None, "home"), ("GET", "/v1/status", None, None),
                                      ("POST", "/v1/releases", b"[", "home")]:
        template = "/v1/devices/{device_id}" if path.startswith("/v1/devices/") else path
        status, _, data = call(api, method, path, body, token=token)
        conforms(data, response_schema(doc, template, method, status), doc, f"{method} {path} {status}")


# --- the CLI with --fleet URL ---------------------------------------------------------------------------


def test_cli_status_over_http_matches_the_directory(api, home, cli_ok):
    local = json.loads(cli_ok("status", "--fleet", home.path, "--json").stdout)
    token = api._httpd.api.token
    assert json.loads(cli_ok("status", "--fleet", api.url, "--token", token, "--json").stdout) == local
    result = CliRunner().invoke(cli, ["status", "--fleet", api.url + "/", "--json"], env={"EDGEOPS_TOKEN": token})
    assert result.exit_code == 0 and json.loads(result.stdout) == local, result.output
    assert "dev-a" in cli_ok("status", "--fleet", api.url, "--token", token).stdout


def test_cli_push_over_http(api, home, releases, cli_ok):
    paths = [releases[("1.0.0", p)] for p in PROFILES]
    token = api._httpd.api.token
    result = cli_ok("push", *paths, "--fleet", api.url, "--token", token, "--select", "site=lab", "--json")
    assert {k: v for k, v in json.loads(result.stdout).items() if k != "plan"} == {"release": 1, "rollout": 1}
    [release] = registry.releases(registry.open_db(home.db_path))
    assert (release["version"], release["selector"], len(release["targets"])) == ("1.0.0", {"site": "lab"}, 2)
    assert cli_ok("push", paths[0], "--fleet", api.url, "--token", token).stdout.startswith("release 2 pushed; rollout 2: stages 1dev,10%,50%,100%")


def test_cli_over_http_fails_in_one_clear_line(api, releases, cli_error, monkeypatch, tmp_path):
    monkeypatch.delenv("EDGEOPS_TOKEN", raising=False)
    bundle = releases[("1.0.0", "rpi4")]
    assert "--token or set EDGEOPS_TOKEN" in cli_error("push", bundle, "--fleet", api.url)
    assert "--token or set EDGEOPS_TOKEN" in cli_error("rollout", "pause", "1", "--fleet", api.url)
    assert "wrong token" in cli_error("status", "--fleet", api.url, "--token", "nope")
    line = cli_error("push", bundle, "--fleet", api.url, "--token", "t", "--key", tmp_path / "targets.pem")
    assert "--key needs --fleet DIR" in line and "offline key" in line
    token = api._httpd.api.token
    tampered = tmp_path / bundle.name
    tampered.write_bytes(_tampered(bundle))
    line = cli_error("push", tampered, "--fleet", api.url, "--token", token)
    assert f"refusing bundle {bundle.name}" in line and "(HTTP 400)" in line
    assert "cannot read bundle" in cli_error("push", tmp_path / "missing.edgeops", "--fleet", api.url, "--token", token)
    assert "cannot reach the fleet API" in cli_error("status", "--fleet", f"http://127.0.0.1:{free_port()}", "--token", token)


# --- `edgeops fleet serve --http` -----------------------------------------------------------------------


def test_fleet_serve_runs_the_api(home, tmp_path):
    from edgeops.fleet.home import FleetHome

    config = dict(home.config, broker=f"mqtt://127.0.0.1:{free_port()}")  # the embedded broker, on a free port
    (home.path / "fleet.json").write_text(json.dumps(config))
    port = free_port()
    log = (tmp_path / "serve.log").open("w+")
    proc = subprocess.Popen([sys.executable, "-m", "edgeops", "fleet", "serve", str(home.path),
                             "--http", f"127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _answers(port), "the API of `edgeops fleet serve` to answer", 30)
        status, data = call_url(url, "/v1/status", config["api_token"])
        assert status == 200 and [d["id"] for d in data["devices"]] == sorted(DEVICES)
        assert call_url(url, "/v1/status", "wrong")[0] == 401
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
        log.seek(0)
        output = log.read()
    assert f"HTTP API on http://127.0.0.1:{port}" in output, output
    assert FleetHome.open(home.path).config["api_token"] == config["api_token"]
    assert not _answers(port)


def _answers(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


def call_url(url: str, path: str, token: str) -> tuple[int, Any]:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url + path, headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())
