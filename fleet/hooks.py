"""`fleet serve --on-drift CMD`: run an operator's command when a model version becomes "retraining
recommended" (fleet/drift.py).

Invariants: the command runs once per model version, also across fleet restarts (the versions it
ran for are kept in the registry table `drift_hooks`, written before the command starts); it runs
in the background with EDGEOPS_MODEL, EDGEOPS_VERSION and EDGEOPS_FLEET set, so a slow retraining
job never stalls the fleet; its exit status is logged. The command is the operator's own, run
through the shell like a cron line.
"""

from __future__ import annotations

import logging
import os
import subprocess
import threading
import time
from pathlib import Path

import sqlite_utils

from edgeops.fleet import drift
from edgeops.fleet.sql import transaction

log = logging.getLogger(__name__)


def create_table(db: sqlite_utils.Database) -> None:
    db.execute("create table if not exists drift_hooks (model text not null, version text not null, "
               "ran_at real not null, primary key (model, version))")


def run_new(db: sqlite_utils.Database, command: str, fleet_dir: Path) -> list[tuple[str, str]]:
    """Start `command` for every flagged model version it has not run for; returns those versions."""
    create_table(db)
    started = []
    for flag in drift.flagged(db):
        key = (flag["model"], flag["version"])
        with transaction(db):
            if db.execute("select 1 from drift_hooks where model = ? and version = ?", key).fetchone():
                continue
            db.execute("insert into drift_hooks values (?, ?, ?)", [*key, time.time()])
        env = {**os.environ, "EDGEOPS_MODEL": key[0], "EDGEOPS_VERSION": key[1], "EDGEOPS_FLEET": str(fleet_dir)}
        log.warning("%s %s: retraining recommended; running %s", *key, command)
        process = subprocess.Popen(command, shell=True, env=env, stdin=subprocess.DEVNULL)
        threading.Thread(target=_log_exit, args=(process, key), daemon=True).start()
        started.append(key)
    return started


def _log_exit(process: subprocess.Popen, key: tuple[str, str]) -> None:
    code = process.wait()
    (log.info if code == 0 else log.error)("--on-drift command for %s %s exited with %d", *key, code)
