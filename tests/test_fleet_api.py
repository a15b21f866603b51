"""The operators' HTTP API (edgeops.fleet.api, FastAPI on uvicorn) against a real fleet directory, over
real sockets: token auth, reads, pushes of real bundles (streamed multipart), every kind of bad
request answered with a one-line JSON error (and the server still up), the generated OpenAPI document
matching the routes and the answers, plain HTTP only on loopback and HTTPS with a certificate, the
Host allow-list, and the CLI's `push`/`status --fleet URL`. No MQTT, except the tests of `edgeops fleet
serve`, which serves HTTPS with the fleet CA's certificate. Roles and the audit log: tests/test_operators.py, tests/test_audit.py."""

from __future__ import annotations

import http.client
import json
import logging
import signal
import socket
import ssl
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from edgeops.cli import cli
from edgeops.fleet import registry
from edgeops.fleet.api import POLICY, ApiServer, router
from edgeops.fleet.home import enroll_device, init_fleet

sys.path.insert(0, str(Path(__file__).parent))
from fleetkit import PROFILES, free_port, releases, wait_for  # noqa: E402,F401  (fixtures)

DEVICES = {"dev-a": "x86-vnni", "dev-b": "rpi4"}
ROUTES = [(method, r.path_format, POLICY[r.endpoint]) for r in router.routes for method in r.methods]


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


def admin_token(server: ApiServer) -> str:
    return server.fleet.home.config["api_token"]


def call(server: ApiServer, method: str, path: str, body: Any = None, token: str | None = "home",
         headers: dict[str, str] | None = None, context: ssl.SSLContext | None = None) -> tuple[int, Any, Any]:
    """One request; `body` is sent as JSON unless bytes; token "home" means the fleet's own api_token."""
    if token == "home":
        token = admin_token(server)
    sent = dict(headers or {})
    if token is not None:
        sent.setdefault("Authorization", f"Bearer {token}")
    if body is not None and not isinstance(body, bytes):
        body = json.dumps(body).encode()
    if body is not None:
        sent.setdefault("Content-Type", "application/json")
    host, port = server._socket.getsockname()[:2]
    conn = (http.client.HTTPSConnection(host, port, timeout=30, context=context) if context
            else http.client.HTTPConnection(host, port, timeout=30))
    try:
        conn.request(method, path, body=body, headers=sent)
        response = conn.getresponse()
        raw = response.read()
        assert response.getheader("Content-Type") == "application/json", raw
        return response.status, response.headers, json.loads(raw)
    finally:
        conn.close()


def form(files: list[tuple[str, bytes]], fields: dict[str, str] | None = None) -> tuple[bytes, dict[str, str]]:
    """A multipart/form-data body: `bundle` parts (filename, bytes), then text fields."""
    boundary = "edgeops-test-boundary"
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="bundle"; filename="{name}"\r\n'
             "Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n" for name, data in files]
    parts += [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
              for k, v in (fields or {}).items()]
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def push_body(paths: list[Path], select: dict[str, str] | None = None, names: list[str] | None = None
              ) -> tuple[bytes, dict[str, str]]:
    names = names or [p.name for p in paths]
    return form([(n, p.read_bytes()) for n, p in zip(names, paths)], {"select": json.dumps(select or {})})


def push(server: ApiServer, upload: tuple[bytes, dict[str, str]], token: str | None = "home") -> tuple[int, Any]:
    body, headers = upload
    status, _, data = call(server, "POST", "/v1/releases", body, token=token, headers=headers)
    return status, data


def raw(server: ApiServer, request: bytes) -> tuple[int, Any]:
    """Send bytes as they are (what http.client would not send); the status and JSON body of the answer."""
    with socket.create_connection(server._socket.getsockname()[:2], timeout=10) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"\r\ncontent-type: application/json\r\n" in head.lower() + b"\r\n", answer
    return int(head.split()[1]), json.loads(body)


def assert_alive(server: ApiServer) -> None:
    assert call(server, "GET", "/v1/health", token=None)[0] == 200


# --- token and reads ------------------------------------------------------------------------------------


def test_init_writes_a_token_readable_by_the_owner_only(home):
    config = home.path / "fleet.json"
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    assert len(json.loads(config.read_text())["api_token"]) >= 40


def _path(template: str) -> str:
    return (template.replace("{device_id}", "dev-a").replace("{rollout_id}", "1").replace("{action}", "pause")
            .replace("{name}", "nobody"))


@pytest.mark.parametrize("route", [r for r in ROUTES if r[2].action], ids=lambda r: f"{r[0]} {r[1]}")
def test_every_change_needs_a_token(api, route):
    method, template, _ = route
    assert method == "POST"
    path = _path(template)
    for token in (None, "wrong", ""):
        status, headers, data = call(api, method, path, {}, token=token)
        assert status == 401, data
        assert "WWW-Authenticate" in headers and "edgeops operator add" in data["error"]
    basic = {"Authorization": "Basic Zm9vOmJhcg=="}
    assert call(api, method, path, {}, token=None, headers=basic)[0] == 401
    assert call(api, method, path, {}, token=admin_token(api) + "x")[0] == 401


def test_reads_on_loopback_need_no_token_but_a_wrong_one_is_refused(api):
    assert call(api, "GET", "/v1/health", token=None)[2]["status"] == "ok"
    assert call(api, "GET", "/v1/openapi.json", token=None)[2]["openapi"].startswith("3.1")
    assert [d["id"] for d in call(api, "GET", "/v1/devices", token=None)[2]["devices"]] == sorted(DEVICES)
    assert all(policy.role in ("viewer", None) for method, path, policy in ROUTES if method == "GET" and path != "/v1/operators")
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
    assert push(api, push_body(paths, {"site": "lab"})) == (201, {"release": 1})
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
    plan = {"stages": ["1dev", "100%"], "bake": "1m", "gates": {"drift": False}}
    body, headers = form([(paths[0].name, paths[0].read_bytes())], {"plan": json.dumps(plan)})
    assert push(api, (body, headers)) == (201, {"release": 2})
    assert call(api, "GET", "/v1/rollouts/2")[2]["plan"]["stages"] == ["1dev", "100%"]


def _tampered(path: Path) -> bytes:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle] ^= 0xFF
    return bytes(data)


@pytest.mark.parametrize("case", ["tampered", "not-a-zip", "mixed-versions", "two-for-one-profile"])
def test_a_refused_bundle_gets_the_readers_reason(api, home, releases, case):
    v1 = releases[("1.0.0", "x86-vnni")]
    if case == "tampered":
        upload = form([(v1.name, _tampered(v1))])
        expected = f"refusing bundle {v1.name}: "
    elif case == "not-a-zip":
        upload = form([(v1.name, b"hello")])
        expected = f"refusing bundle {v1.name}: not a bundle"
    elif case == "mixed-versions":
        upload = push_body([v1, releases[("1.1.0", "rpi4")]])
        expected = "one release is one model version"
    else:
        upload = push_body([v1, v1], names=[v1.name, "copy.edgeops"])
        expected = "one bundle per profile"
    status, data = push(api, upload)
    assert status == 400 and expected in data["error"], data
    assert "edgeops-upload-" not in data["error"]  # the server's temp dir stays out of the reason
    assert registry.releases(registry.open_db(home.db_path)) == []
    assert_alive(api)


GOOD = ("m.edgeops", b"x")


@pytest.mark.parametrize("upload, expected", [
    (form([]), "bundle: Field required"),
    (form([GOOD], {"select": "{not json"}), "select: not valid JSON"),
    (form([GOOD], {"select": '["site=lab"]'}), "select: Input should be an object"),
    (form([GOOD], {"select": '{"site": 1}'}), "select: site: Input should be a valid string"),
    (form([GOOD], {"plan": '{"stage": "100%"}'}), "plan: stage: Extra inputs are not permitted"),
    (form([GOOD], {"plan": '{"on_failure": "panic"}'}), "plan: on_failure: Input should be"),
    (form([GOOD], {"plan": '{"stages": "0%"}'}), "plan: "),
    (form([GOOD], {"plan": '{"bake": NaN}'}), "plan: "),
    (form([GOOD], {"plan": "[" * 100_000}), "plan: "),
    (form([("../../etc/passwd", b"x")]), "bundle[0]'s filename must be"),
    (form([(".hidden", b"x")]), "bundle[0]'s filename must be"),
    (form([GOOD, GOOD]), "bundle filenames must be distinct"),
    ((b"--x\r\nnot multipart", {"Content-Type": "multipart/form-data; boundary=x"}), ""),
], ids=lambda v: None if isinstance(v, str) else repr(v)[:60])
def test_a_bad_push_gets_a_one_line_json_error(api, upload, expected):
    status, data = push(api, upload)
    assert status == 400 and data["error"].startswith(expected) and "\n" not in data["error"], data
    assert_alive(api)


def test_push_needs_multipart_and_a_length(api):
    status, _, data = call(api, "POST", "/v1/releases", b'{"bundles": []}')
    assert status == 415 and "multipart/form-data" in data["error"]
    auth = f"Authorization: Bearer {admin_token(api)}\r\nContent-Type: multipart/form-data; boundary=x\r\n".encode()
    status, data = raw(api, b"POST /v1/releases HTTP/1.1\r\nHost: 127.0.0.1\r\n" + auth + b"\r\n")
    assert status == 411 and "Content-Length" in data["error"], data
    chunked = b"POST /v1/releases HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n" + auth + b"\r\n2\r\n{}\r\n0\r\n\r\n"
    assert raw(api, chunked)[0] == 411
    status, data = raw(api, b"POST /v1/releases HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: -3\r\n" + auth + b"\r\n")
    assert status == 400 and "Content-Length" in data["error"], data
    assert_alive(api)


def test_an_oversize_body_is_refused_unread(home):
    server = ApiServer(home, "127.0.0.1:0", max_body=1024).start()
    try:
        # Larger than loopback socket buffers: without the server's drain the client's send fails with
        # a broken pipe and it never reads the 413.
        body = b"x" * (64 << 20)
        multipart = {"Content-Type": "multipart/form-data; boundary=x"}
        status, _, data = call(server, "POST", "/v1/releases", body, headers=multipart)
        assert status == 413 and data["error"] == f"body of {len(body)} bytes is over this server's limit of 1024 bytes"
        status, _, data = call(server, "POST", "/v1/releases", body, token="wrong", headers=multipart)
        assert status == 401, data  # the token is checked before the body is even looked at
        status, _, data = call(server, "POST", "/v1/rollouts/1/pause", b"{}" + b" " * 70_000)
        assert status == 413, data  # a JSON body has a small limit of its own
        assert_alive(server)
    finally:
        server.stop()


def test_deeply_nested_json_is_a_400(api):
    for body in (b"[" * 100_000 + b"]" * 100_000, b'{"reason":' * 5000 + b'"x"' + b"}" * 5000):
        body = body[:60_000]  # under the JSON body limit, still far deeper than any parser recurses
        status, _, data = call(api, "POST", "/v1/rollouts/1/pause", body)
        assert status == 400 and "\n" not in data["error"], data
    status, _, data = call(api, "POST", "/v1/rollouts/1/pause", b'{"reason": NaN}')
    assert status == 400 and data["error"].startswith("reason:"), data
    assert_alive(api)


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
    status, _, data = call(api, "POST", "/v1/rollouts/x/pause", {})
    assert status == 400 and data["error"].startswith("path.rollout_id:"), data
    assert_alive(api)


def test_a_malformed_request_gets_a_json_error(api):
    status, data = raw(api, b"GET /v1/health GARBAGE HTTP/1.1\r\n\r\n")
    assert status == 400 and "malformed HTTP request" in data["error"]
    assert raw(api, b"GET /v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\n" + b"X: y\r\n" * 200 + b"\r\n")[0] == 431
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


def test_a_host_not_on_the_allow_list_is_refused(home):
    server = ApiServer(home, "127.0.0.1:0", allowed_hosts=("fleet.lan",)).start()
    try:
        port = server._socket.getsockname()[1]
        for host in ("127.0.0.1", f"127.0.0.1:{port}", f"localhost:{port}", "[::1]:80", "FLEET.lan:8420"):
            assert call(server, "GET", "/v1/status", headers={"Host": host})[0] == 200, host
        for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.evil.example"):
            status, _, data = call(server, "GET", "/v1/status", headers={"Host": host})
            assert status == 421 and "--allowed-host" in data["error"], (host, data)
        assert call(server, "GET", "/", headers={"Host": "evil.example"}, token=None)[0] == 421  # the page too
    finally:
        server.stop()


@pytest.mark.parametrize("bind", ["8420", "localhost:", ":8420", "127.0.0.1:http", "127.0.0.1:70000"])
def test_a_bad_bind_address_is_refused(home, bind):
    from edgeops.protocol.errors import EdgeopsError

    with pytest.raises(EdgeopsError, match="must look like HOST:PORT"):
        ApiServer(home, bind)


def test_plain_http_only_on_loopback(home):
    from edgeops.protocol.errors import EdgeopsError

    for bind in ("0.0.0.0:0", "[::]:0", "192.0.2.1:8420"):
        with pytest.raises(EdgeopsError, match="not a loopback address: serve it over HTTPS"):
            ApiServer(home, bind)
    taken = ApiServer(home, "127.0.0.1:0")
    try:
        with pytest.raises(EdgeopsError, match="cannot listen on"):
            ApiServer(home, f"127.0.0.1:{taken._socket.getsockname()[1]}")
    finally:
        taken.stop()


def self_signed(tmp_path: Path, name: str = "localhost") -> tuple[Path, Path]:
    """A certificate for `name` and 127.0.0.1, signed by its own key (PEM files)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "api.pem", tmp_path / "api.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_https_with_a_certificate(home, tmp_path, monkeypatch):
    from edgeops.fleet import client
    from edgeops.protocol.errors import EdgeopsError

    cert, key = self_signed(tmp_path)
    with pytest.raises(EdgeopsError, match="--tls-cert and --tls-key together"):
        ApiServer(home, "127.0.0.1:0", tls_cert=cert)
    with pytest.raises(EdgeopsError, match="cannot serve HTTPS"):
        ApiServer(home, "127.0.0.1:0", tls_cert=cert, tls_key=cert)
    server = ApiServer(home, "127.0.0.1:0", tls_cert=cert, tls_key=key).start()
    try:
        assert server.url.startswith("https://127.0.0.1:")
        trusting = ssl.create_default_context(cafile=str(cert))
        status, _, data = call(server, "GET", "/v1/status", context=trusting)
        assert status == 200 and [d["id"] for d in data["devices"]] == sorted(DEVICES)
        with pytest.raises(ssl.SSLCertVerificationError):
            call(server, "GET", "/v1/health", context=ssl.create_default_context())
        with pytest.raises(EdgeopsError, match="not signed by this machine's trusted CAs .*: pass --ca"):
            client.status(server.url, None)  # the system's CAs do not know this certificate
        monkeypatch.setenv("EDGEOPS_CA", str(cert))
        assert [d["id"] for d in client.status(server.url, None)["devices"]] == sorted(DEVICES)
        other, _ = self_signed(tmp_path / "other" if (tmp_path / "other").mkdir() is None else tmp_path)
        monkeypatch.setattr(client, "ca_file", str(other))  # --ca wins over EDGEOPS_CA
        with pytest.raises(EdgeopsError, match=f"not signed by the CA in {other}"):
            client.status(server.url, None)
        monkeypatch.setattr(client, "ca_file", None)
        monkeypatch.delenv("EDGEOPS_CA")
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # the system's trust store, as OpenSSL finds it
        assert [d["id"] for d in client.status(server.url, None)["devices"]] == sorted(DEVICES)
    finally:
        server.stop()


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
    assert documented == {(method, path) for method, path, _ in ROUTES}
    for method, path, policy in ROUTES:
        operation = doc["paths"][path][method.lower()]
        needs = None if policy.role == "viewer" else policy.role  # reads are open on loopback
        assert (operation["security"] == [], operation["x-role"]) == (needs is None, needs or "none"), path
        assert "422" not in operation["responses"] and "401" in operation["responses"]
        assert ("403" in operation["responses"]) == (needs is not None)
    for ref in {m for m in json.dumps(doc).split('"') if m.startswith("#/")}:
        target = doc
        for part in ref.removeprefix("#/").split("/"):
            target = target[part]  # every reference resolves


def test_answers_conform_to_the_documented_schemas(api, releases):
    doc = call(api, "GET", "/v1/openapi.json", token=None)[2]
    assert set(doc["paths"]["/v1/releases"]["post"]["requestBody"]["content"]) == {"multipart/form-data"}
    status, data = push(api, push_body([releases[("1.1.0", p)] for p in PROFILES], {"site": "lab"}))
    conforms(data, response_schema(doc, "/v1/releases", "POST", status), doc)
    json_reads = [path for method, path, _ in ROUTES if method == "GET" and path != "/v1/openapi.json"
                  and "application/json" in doc["paths"][path]["get"]["responses"]["200"]["content"]]
    assert set(json_reads) >= {"/v1/status", "/v1/rollouts", "/v1/rollouts/{rollout_id}", "/v1/series", "/v1/audit"}
    for template in json_reads:
        status, _, data = call(api, "GET", _path(template))
        assert status == 200, data
        conforms(data, response_schema(doc, template, "GET", status), doc, template)
    for method, path, body, token in [("GET", "/v1/devices/ghost", None, "home"), ("GET", "/v1/status", None, "x"),
                                      ("POST", "/v1/rollouts/1/pause", b"[", "home")]:
        template = {"/v1/devices/ghost": "/v1/devices/{device_id}", "/v1/rollouts/1/pause": "/v1/rollouts/{rollout_id}/{action}"
                    }.get(path, path)
        status, _, data = call(api, method, path, body, token=token)
        conforms(data, response_schema(doc, template, method, status), doc, f"{method} {path} {status}")


# --- the CLI with --fleet URL ---------------------------------------------------------------------------


def test_cli_status_over_http_matches_the_directory(api, home, cli_ok):
    local = json.loads(cli_ok("status", "--fleet", home.path, "--json").stdout)
    token = admin_token(api)
    assert json.loads(cli_ok("status", "--fleet", api.url, "--token", token, "--json").stdout) == local
    result = CliRunner().invoke(cli, ["status", "--fleet", api.url + "/", "--json"], env={"EDGEOPS_TOKEN": token})
    assert result.exit_code == 0 and json.loads(result.stdout) == local, result.output
    assert "dev-a" in cli_ok("status", "--fleet", api.url, "--token", token).stdout


def test_cli_push_over_http(api, home, releases, cli_ok):
    paths = [releases[("1.0.0", p)] for p in PROFILES]
    token = admin_token(api)
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
    token = admin_token(api)
    tampered = tmp_path / bundle.name
    tampered.write_bytes(_tampered(bundle))
    line = cli_error("push", tampered, "--fleet", api.url, "--token", token)
    assert f"refusing bundle {bundle.name}" in line and "(HTTP 400)" in line
    assert "cannot read bundle" in cli_error("push", tmp_path / "missing.edgeops", "--fleet", api.url, "--token", token)
    assert "cannot reach the fleet API" in cli_error("status", "--fleet", f"http://127.0.0.1:{free_port()}", "--token", token)


# --- `edgeops fleet serve --http` -----------------------------------------------------------------------


def test_fleet_serve_runs_the_api_over_https_with_the_fleet_ca(home, tmp_path, cli_ok):
    from edgeops.fleet.home import FleetHome

    config = dict(home.config, broker=f"mqtts://127.0.0.1:{free_port()}")  # its private Mosquitto, on a free port
    (home.path / "fleet.json").write_text(json.dumps(config))
    port = free_port()
    log = (tmp_path / "serve.log").open("w+")
    proc = subprocess.Popen([sys.executable, "-m", "edgeops", "fleet", "serve", str(home.path),
                             "--http", f"127.0.0.1:{port}", "--closed-reads"], stdout=log, stderr=subprocess.STDOUT)
    url = f"https://127.0.0.1:{port}"
    pinned = ssl.create_default_context(cafile=str(home.pki / "ca.pem"))  # the fleet CA, nothing else
    try:
        wait_for(lambda: _answers(port), "the API of `edgeops fleet serve` to answer", 30)
        status, data = call_url(url, "/v1/status", config["api_token"], pinned)
        assert status == 200 and [d["id"] for d in data["devices"]] == sorted(DEVICES)
        assert call_url(url, "/v1/status", "wrong", pinned)[0] == 401
        assert call_url(url, "/v1/status", None, pinned)[0] == 401  # --closed-reads: even on loopback
        with pytest.raises(OSError, match="CERTIFICATE_VERIFY_FAILED"):  # not a certificate the system's CAs know
            call_url(url, "/v1/health", None, ssl.create_default_context())
        listed = cli_ok("status", "--fleet", url, "--ca", home.pki / "ca.pem", "--token", config["api_token"], "--json")
        assert [d["id"] for d in json.loads(listed.stdout)["devices"]] == sorted(DEVICES)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
        log.seek(0)
        output = log.read()
    assert f"HTTP API on https://127.0.0.1:{port}" in output and str(home.pki / "ca.pem") in output, output
    assert FleetHome.open(home.path).config["api_token"] == config["api_token"]
    assert not _answers(port)


def test_fleet_serve_plain_http_only_when_asked_and_only_on_loopback(home):
    from edgeops.fleet.api import serve_options
    from edgeops.protocol.errors import EdgeopsError

    fleet_tls = serve_options(home, {"allowed_hosts": ("proxy.lan",)})
    assert (fleet_tls["tls_cert"], fleet_tls["tls_key"]) == (home.pki / "api.pem", home.pki / "api.key")
    assert {"proxy.lan", "localhost", "127.0.0.1", "::1"} <= set(fleet_tls["allowed_hosts"])
    assert serve_options(home, {"plain_http": True, "tls_cert": None, "tls_key": None}) == {"tls_cert": None, "tls_key": None}
    with pytest.raises(EdgeopsError, match="--plain-http or --tls-cert"):
        serve_options(home, {"plain_http": True, "tls_cert": home.pki / "api.pem", "tls_key": home.pki / "api.key"})
    for name in ("api.pem", "api.key"):  # a fleet made before the API had a certificate gets one
        (home.pki / name).unlink()
    assert serve_options(home, {})["tls_cert"].exists()
    server = ApiServer(home, "127.0.0.1:0", **serve_options(home, {}))
    try:
        assert server.url.startswith("https://")
    finally:
        server.stop()
    port = free_port()
    refused = subprocess.run([sys.executable, "-m", "edgeops", "fleet", "serve", str(home.path), "--http",
                              f"0.0.0.0:{port}", "--plain-http"], capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0 and "not a loopback address" in refused.stderr and not _answers(port)


def test_api_cert_covers_the_names_asked_for(tmp_path, cli_ok):
    from cryptography import x509

    def names(home_dir: Path) -> set[str]:
        cert = x509.load_pem_x509_certificate((home_dir / "pki" / "api.pem").read_bytes())
        return {str(n) for n in cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
                .get_values_for_type(x509.DNSName)} | {str(n) for n in cert.extensions.get_extension_for_class(
                    x509.SubjectAlternativeName).value.get_values_for_type(x509.IPAddress)}

    cli_ok("fleet", "init", tmp_path / "f", "--broker", "mqtts://broker.lan:8883", "--api-host", "fleet.lan")
    assert names(tmp_path / "f") == {"broker.lan", "fleet.lan", "localhost", "127.0.0.1", "::1"}
    assert "10.0.0.5" in cli_ok("fleet", "certs", tmp_path / "f", "--api-host", "10.0.0.5").stdout
    assert names(tmp_path / "f") == {"broker.lan", "fleet.lan", "localhost", "127.0.0.1", "::1", "10.0.0.5"}
    ca_pem = ssl.create_default_context(cafile=str(tmp_path / "f" / "pki" / "ca.pem"))
    assert ca_pem.cert_store_stats()["x509_ca"] == 1


def _answers(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


def call_url(url: str, path: str, token: str | None, context: ssl.SSLContext | None = None) -> tuple[int, Any]:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url + path, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=10, context=context) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())
