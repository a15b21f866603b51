"""Operators and roles (fleet/operators.py) on a live API with reads closed: every route × every role is
allowed or refused (401 without a token, 403 below the route's role), revoked tokens stop at once,
the fleet's api_token is `fleet-admin` until revoked, and the `edgeops operator` commands."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgeops.cli import cli
from edgeops.fleet import operators, registry
from edgeops.fleet.home import enroll_device, init_fleet

sys.path.insert(0, str(Path(__file__).parent))
from test_fleet_api import ROUTES, call, form  # noqa: E402

from edgeops.fleet.api import ApiServer  # noqa: E402

ROLES = (None, *operators.ROLES)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    root = tmp_path_factory.mktemp("operators")
    home = init_fleet(root / "fleet")
    enroll_device(home, "dev-a", "rpi4", {"site": "lab"}, root / "dev-a")
    db = registry.open_db(home.db_path)
    tokens = {role: operators.add(db, f"the-{role}", role) for role in operators.ROLES}
    server = ApiServer(home, "127.0.0.1:0", open_reads=False).start()
    yield server, tokens, db
    server.stop()


def _request(method: str, template: str, role: str | None) -> tuple[str, object, dict[str, str]]:
    """A path and body for the route that passes every check after the role's."""
    path = (template.replace("{device_id}", "dev-a").replace("{rollout_id}", "1").replace("{action}", "pause")
            .replace("{name}", "nobody"))
    if template == "/ui/{name}":
        path = "/ui/app.js"
    if template == "/v1/releases" and method == "POST":
        body, headers = form([("m.edgeops", b"x")])
        return path, body, headers
    if template == "/v1/operators" and method == "POST":
        return path, {"name": f"new-{role}", "role": "viewer"}, {}
    return path, ({} if method == "POST" else None), {}


@pytest.mark.parametrize("role", ROLES, ids=str)
@pytest.mark.parametrize("route", ROUTES, ids=lambda r: f"{r[0]} {r[1]}")
def test_every_route_for_every_role(fleet, route, role):
    server, tokens, _ = fleet
    method, template, policy = route
    path, body, headers = _request(method, template, role)
    token = tokens[role] if role else None
    host, port = server._socket.getsockname()[:2]
    import http.client

    conn = http.client.HTTPConnection(host, port, timeout=30)
    sent = {**headers, **({"Authorization": f"Bearer {token}"} if token else {})}
    if isinstance(body, dict):
        body, sent["Content-Type"] = json.dumps(body).encode(), "application/json"
    conn.request(method, path, body=body, headers=sent)
    status = conn.getresponse().status
    conn.close()
    if policy.role is None:
        assert status not in (401, 403), status
    elif role is None:
        assert status == 401
    elif operators.allows(role, policy.role):
        assert status not in (401, 403), status
    else:
        assert status == 403


def test_whoami_names_the_operator(fleet):
    server, tokens, _ = fleet
    assert call(server, "GET", "/v1/whoami", token=tokens["viewer"])[2] == {"name": "the-viewer", "role": "viewer",
                                                                          "reads_open": False}
    assert call(server, "GET", "/v1/whoami", token=None)[2] == {"name": None, "role": None, "reads_open": False}
    assert call(server, "GET", "/v1/whoami", token="nope")[0] == 401


def test_a_revoked_token_stops_at_once_and_fleet_admin_is_the_api_token(fleet):
    server, _, db = fleet
    token = operators.add(db, "temp", "operator")
    assert call(server, "GET", "/v1/status", token=token)[0] == 200
    status, _, data = call(server, "POST", "/v1/operators/temp/revoke", token="home")
    assert status == 200 and {o["name"]: o["revoked_at"] is not None for o in data["operators"]}["temp"]
    assert call(server, "GET", "/v1/status", token=token)[0] == 401
    status, _, issued = call(server, "POST", "/v1/operators", {"name": "temp", "role": "viewer"}, token="home")
    assert status == 201 and issued["role"] == "viewer" and issued["token"] != token  # a revoked name, re-issued
    assert call(server, "GET", "/v1/status", token=issued["token"])[0] == 200
    assert call(server, "POST", "/v1/operators", {"name": "temp", "role": "viewer"}, token="home")[0] == 409
    assert call(server, "POST", "/v1/operators", {"name": "../x", "role": "root"}, token="home")[0] == 400


def test_operator_commands(tmp_path):
    home = init_fleet(tmp_path / "fleet")
    fleet_dir = str(home.path)
    runner = CliRunner()
    added = runner.invoke(cli, ["operator", "add", "alice", "--role", "operator", "--fleet", fleet_dir])
    assert added.exit_code == 0, added.output
    token = added.stdout.strip()
    assert len(token) >= 40 and "\n" not in token and "only time" in added.stderr
    db = registry.open_db(home.db_path)
    assert operators.authenticate(db, token) == operators.Operator("alice", "operator")
    assert token not in json.dumps(list(db.query("select * from operators")))  # only its hash is kept
    listed = json.loads(runner.invoke(cli, ["operator", "list", "--fleet", fleet_dir, "--json"]).stdout)
    assert [(o["name"], o["role"], o["revoked_at"]) for o in listed] == [("alice", "operator", None),
                                                                         ("fleet-admin", "admin", None)]
    for args, expected in [(["add", "alice", "--role", "viewer"], "operator alice exists"),
                           (["add", "bob", "--role", "root"], "role 'root' must be one of viewer, operator, admin"),
                           (["add", "b/c", "--role", "viewer"], "operator name 'b/c' must be"),
                           (["revoke", "carol"], "no operator 'carol' holds a token")]:
        result = runner.invoke(cli, ["operator", *args, "--fleet", fleet_dir])
        assert result.exit_code == 1 and expected in result.output and len(result.output.splitlines()) == 1, result.output
    assert runner.invoke(cli, ["operator", "revoke", "fleet-admin", "--fleet", fleet_dir]).exit_code == 0
    assert operators.authenticate(db, home.config["api_token"]) is None
    operators.sync_fleet_admin(db, home.config["api_token"])  # what every server start does: stays revoked
    assert operators.authenticate(db, home.config["api_token"]) is None
    table = runner.invoke(cli, ["operator", "list", "--fleet", fleet_dir]).stdout
    assert "alice" in table and "fleet-admin" in table and "revoked" in table
