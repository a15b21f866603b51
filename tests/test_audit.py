"""The audit log (fleet/audit.py): every change through the API and the CLI is one row with its actor
and result, the rollout engine's decisions show as `engine`, and the table refuses UPDATE and DELETE."""

from __future__ import annotations

import json
import sqlite3
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgeops.cli import cli
from edgeops.fleet import audit, operators, registry, rollout
from edgeops.fleet.api import ApiServer
from edgeops.fleet.home import init_fleet
from edgeops.fleet.plan import make_plan

sys.path.insert(0, str(Path(__file__).parent))
from test_fleet_api import call, form  # noqa: E402

TARGET = [{"profile": "rpi4", "target": "digits-rpi4.edgeops", "sha256": "a" * 64, "length": 1000}]


def test_every_change_is_recorded_with_its_actor(tmp_path):
    home = init_fleet(tmp_path / "fleet")
    db = registry.open_db(home.db_path)
    registry.create_release(db, "digits", "1.0", {}, TARGET, make_plan(stages="100%"))
    rollout.record(db, 1, "withdraw", "unsigned digits-rpi4.edgeops")  # as the server's engine loop does
    alice, viewer = operators.add(db, "alice", "operator"), operators.add(db, "vic", "viewer")
    server = ApiServer(home, "127.0.0.1:0").start()
    try:
        assert call(server, "POST", "/v1/rollouts/1/pause", {"reason": "ticket 7"}, token=alice)[0] == 200
        assert call(server, "POST", "/v1/rollouts/1/resume", {}, token=viewer)[0] == 403
        assert call(server, "POST", "/v1/rollouts/1/resume", {}, token=None)[0] == 401  # no one to name: not recorded
        body, headers = form([("m.edgeops", b"not a bundle")])
        assert call(server, "POST", "/v1/releases", body, token=alice, headers=headers)[0] == 400
        assert call(server, "POST", "/v1/operators", {"name": "bob", "role": "viewer"})[0] == 201
        runner = CliRunner()
        for args in (["rollout", "resume", "1", "--fleet", str(home.path)],
                     ["operator", "revoke", "bob", "--fleet", str(home.path)]):
            assert runner.invoke(cli, args).exit_code == 0
        user = audit.cli_actor()
        expected = [(user, "operator revoke", "operator bob", "ok"),
                    (user, "rollout resume", "rollout 1", "ok"),
                    ("fleet-admin", "operator add", "operator bob (viewer)", "ok"),
                    ("alice", "push", "release", "error 400: refusing bundle m.edgeops: not a bundle"),
                    ("vic", "rollout resume", "rollout 1", "error 403: vic is a viewer; this needs the operator role"),
                    ("alice", "rollout pause", "rollout 1", "ok"),
                    ("engine", "withdraw", "rollout 1", "ok")]

        def seen(entries: list[dict]) -> list[tuple]:
            return [(e["actor"], e["action"], e["object"], e["result"][:len(want[3])])
                    for e, want in zip(entries, expected)]

        status, _, data = call(server, "GET", "/v1/audit")
        assert status == 200 and seen(data["entries"]) == expected and len(data["entries"]) == len(expected)
        printed = runner.invoke(cli, ["audit", "--fleet", str(home.path), "--json"])
        assert seen(json.loads(printed.stdout)) == expected
        assert seen(json.loads(runner.invoke(cli, ["audit", "--fleet", server.url, "--json", "--limit", "2"]).stdout)) == expected[:2]
        assert "alice" in runner.invoke(cli, ["audit", "--fleet", str(home.path)]).stdout
    finally:
        server.stop()


def test_the_log_is_append_only(tmp_path):
    db = registry.open_db(tmp_path / "registry.db")
    audit.record(db, "cli:me", "push", "release 1")
    for statement in ("update audit set actor = 'someone else'", "delete from audit"):
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            db.execute(statement)
    assert [e["actor"] for e in audit.entries(db)] == ["cli:me"]


def test_device_changes_are_recorded_from_the_cli_and_the_api(tmp_path):
    home = init_fleet(tmp_path / "fleet")
    runner = CliRunner()
    for args in (["device", "enroll", "dev-a", "-p", "rpi4", "--fleet", str(home.path), "-o", str(tmp_path / "dev-a")],
                 ["device", "enroll", "dev-b", "-p", "rpi4", "--fleet", str(home.path), "-o", str(tmp_path / "dev-b")],
                 ["device", "renew", "dev-a", "--fleet", str(home.path)],
                 ["device", "revoke", "dev-a", "--fleet", str(home.path), "--reason", "stolen"]):
        assert runner.invoke(cli, args).exit_code == 0
    db = registry.open_db(home.db_path)
    admin = operators.add(db, "ada", "admin")
    server = ApiServer(home, "127.0.0.1:0").start()
    try:
        assert call(server, "POST", "/v1/devices/dev-b/revoke", {"reason": "lost"}, token=operators.add(db, "opal", "operator"))[0] == 403
        status, _, answer = call(server, "POST", "/v1/devices/dev-b/revoke", {"reason": "lost"}, token=admin)
        assert status == 200 and answer == {"device": "dev-b", "certificates": 1}
        assert call(server, "POST", "/v1/devices/dev-b/revoke", {}, token=admin)[0] == 404
    finally:
        server.stop()
    assert registry.revoked_ids(db) == ["dev-a", "dev-b"]
    user = audit.cli_actor()
    got = [(e["actor"], e["action"], e["object"], e["result"][:5]) for e in reversed(audit.entries(db))]
    assert got == [(user, "device enroll", "device dev-a", "ok"), (user, "device enroll", "device dev-b", "ok"),
                   (user, "device renew", "device dev-a", "ok"), (user, "device revoke", "device dev-a", "ok"),
                   ("opal", "device revoke", "device dev-b", "error"), ("ada", "device revoke", "device dev-b", "ok"),
                   ("ada", "device revoke", "device dev-b", "error")]
