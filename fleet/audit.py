"""The fleet's append-only audit log: who changed what, when, on which object, with what result.

Invariants:
- Every change through the HTTP API (push, rollout actions, operators) and every local CLI change
  (push, rollout actions, operators) is one `audit` row: actor (an operator's name, or
  `cli:<os user>`), action, object, result (`ok` or `error: <reason>`), detail.
- The table refuses UPDATE and DELETE (triggers); this module has no function that changes a row.
- The rollout engine's own decisions stay in the `decisions` table (fleet/rollout.py), written once;
  `entries` shows them as actor `engine` by reading both tables.
- The table is created on first use by any function here: registries made before it need nothing.
"""

from __future__ import annotations

import contextlib
import getpass
import time
from dataclasses import dataclass
from typing import Any, Iterator

import sqlite_utils

from edgeops.fleet.sql import transaction

ENGINE = "engine"
DEFAULT_LIMIT = 100
MAX_LIMIT = 1000


def create_table(db: sqlite_utils.Database) -> None:
    db.execute("create table if not exists audit (id integer primary key, t real not null, actor text not null, "
               "action text not null, object text not null, result text not null, detail text not null)")
    for verb in ("update", "delete"):
        db.execute(f"create trigger if not exists audit_no_{verb} before {verb} on audit "
                   "begin select raise(abort, 'the audit log is append-only'); end")


def cli_actor() -> str:
    """The actor of a change made with the CLI on the fleet directory."""
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):  # no user name for this uid (a bare container)
        return "cli:unknown"


def record(db: sqlite_utils.Database, actor: str, action: str, obj: str, result: str = "ok", detail: str = "") -> None:
    create_table(db)
    with transaction(db):
        db.execute("insert into audit (t, actor, action, object, result, detail) values (?, ?, ?, ?, ?, ?)",
                   [time.time(), actor, action, obj, result, detail[:300]])


@dataclass
class Entry:
    """What `recorded` writes; the body may name the object better once it knows it."""

    object: str
    detail: str = ""


@contextlib.contextmanager
def recorded(db: sqlite_utils.Database, actor: str, action: str, obj: str, detail: str = "") -> Iterator[Entry]:
    """Record the change the body makes: `ok`, or `error: <reason>` and the exception goes on."""
    entry = Entry(obj, detail)
    try:
        yield entry
    except Exception as exc:
        record(db, actor, action, entry.object, f"error: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}",
               entry.detail)
        raise
    record(db, actor, action, entry.object, "ok", entry.detail)


def entries(db: sqlite_utils.Database, limit: int = DEFAULT_LIMIT) -> list[dict[str, Any]]:
    """The latest `limit` entries, newest first: the audit rows and the engine's decisions."""
    create_table(db)
    return [dict(row) for row in db.query(
        "select * from (select t, actor, action, object, result, detail from audit "
        "union all select t, ?, action, 'rollout ' || rollout, 'ok', reason from decisions where actor = ?) "
        "order by t desc limit ?", [ENGINE, ENGINE, limit])]
