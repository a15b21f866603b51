"""Transactions on the registry that are really transactions.

sqlite-utils' `Database.execute()` commits each write on its own unless a transaction is open, and
`with conn:` does not open one; so every multi-statement change in the fleet goes through
`transaction`, and stays all-or-nothing.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import sqlite_utils


@contextlib.contextmanager
def transaction(db: sqlite_utils.Database) -> Iterator[None]:
    """One write transaction, taken up front (BEGIN IMMEDIATE): what it reads, no other writer
    changes before it commits, and all of its writes land or none do."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        db.conn.rollback()
        raise
    db.execute("COMMIT")
