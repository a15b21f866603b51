"""Operators of the fleet's HTTP API: named bearer tokens, each with a role, in the registry's
`operators` table.

Invariants:
- A token is 256 random bits (`secrets.token_urlsafe(32)`), shown once by `add`; the table keeps only
  its sha256, compared with `hmac.compare_digest`.
- Roles are ordered: a viewer reads; an operator also pushes releases and steers rollouts; an admin
  also manages operators. `allows(role, needed)` is the one place that order is applied.
- The fleet's `api_token` (fleet.json) is the admin `fleet-admin` until `revoke(db, "fleet-admin")`:
  `sync_fleet_admin` keeps its row on the current api_token and never brings a revoked one back.
- A revoked operator's row stays, marked revoked, so the audit log's names keep meaning; `add` of a
  revoked name gives that name a new token.
- The table is created on first use by any function here: registries made before it need nothing.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from dataclasses import dataclass
from typing import Any

import sqlite_utils

from edgeops.fleet.sql import transaction
from edgeops.protocol.errors import EdgeopsError

ROLES = ("viewer", "operator", "admin")
FLEET_ADMIN = "fleet-admin"
NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._@-]{0,63}")


@dataclass(frozen=True)
class Operator:
    name: str
    role: str


def create_table(db: sqlite_utils.Database) -> None:
    db.execute("create table if not exists operators (name text primary key, role text not null, "
               "token_sha256 text not null, created_at real not null, revoked_at real)")


def allows(role: str, needed: str) -> bool:
    return ROLES.index(role) >= ROLES.index(needed)


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def add(db: sqlite_utils.Database, name: str, role: str) -> str:
    """Create operator `name` with `role`; its token, which is stored nowhere."""
    create_table(db)
    if not NAME.fullmatch(name):
        raise EdgeopsError(f"operator name {name!r} must be 1-64 letters, digits, '.', '_', '@' or '-'")
    if role not in ROLES:
        raise EdgeopsError(f"role {role!r} must be one of {', '.join(ROLES)}")
    row = db.execute("select revoked_at from operators where name = ?", [name]).fetchone()
    if row is not None and row[0] is None:
        raise EdgeopsError(f"operator {name} exists; revoke it first (`edgeops operator revoke {name}`) to issue a new token")
    token = secrets.token_urlsafe(32)
    with transaction(db):
        db.execute("insert or replace into operators (name, role, token_sha256, created_at, revoked_at) "
                   "values (?, ?, ?, ?, null)", [name, role, _digest(token), time.time()])
    return token


def revoke(db: sqlite_utils.Database, name: str) -> None:
    create_table(db)
    with transaction(db):
        revoked = db.execute("update operators set revoked_at = ? where name = ? and revoked_at is null",
                             [time.time(), name]).rowcount
    if not revoked:
        raise EdgeopsError(f"no operator {name!r} holds a token; `edgeops operator list` shows them")


def sync_fleet_admin(db: sqlite_utils.Database, api_token: str | None) -> None:
    """Make `fleet-admin` the admin holding fleet.json's api_token, unless it was revoked."""
    create_table(db)
    if not api_token:
        return
    with transaction(db):
        db.execute("insert into operators (name, role, token_sha256, created_at) values (?, 'admin', ?, ?) "
                   "on conflict (name) do update set token_sha256 = excluded.token_sha256 where revoked_at is null",
                   [FLEET_ADMIN, _digest(api_token), time.time()])


def authenticate(db: sqlite_utils.Database, token: str) -> Operator | None:
    """The operator holding `token`, or None."""
    create_table(db)
    digest = _digest(token)
    found = None
    for name, role, stored in db.execute("select name, role, token_sha256 from operators where revoked_at is null"):
        if hmac.compare_digest(digest, stored):
            found = Operator(name, role)
    return found


def listing(db: sqlite_utils.Database) -> list[dict[str, Any]]:
    """Every operator, revoked ones too, by name; never a token or its hash."""
    create_table(db)
    return [dict(row) for row in db.query("select name, role, created_at, revoked_at from operators order by name")]
