"""`edgeops status`, `edgeops device list` and `edgeops drift report` on the terminal, as rich tables and panels.

`render_status` takes the dict registry.status() returns (GET /v1/status serves the same) and shows, in
order: devices (or, past LARGE_FLEET devices, only those that need attention plus one count per
state, from `device_counts`: past registry.LISTED the status lists no others), releases, rollouts
(a panel for each model's newest unfinished rollout, one compact row for every other), the latest
decisions, drift flags, anomalies (device reports that disagreed with the fleet's records), and
devices that need attention last, next to the prompt.

Invariants: rendering never fails on a dict from an older server (keys added with rollouts are read
with defaults), and it only reads the dict: nothing here computes fleet state.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

from rich.console import Console, Group
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from edgeops.protocol.wire import STATES

LARGE_FLEET = 50
DECISIONS = 8
FINISHED = ("completed", "superseded")
_MARKS = {True: "✓", False: "✗", None: "…"}


def _ago(timestamp: float | None) -> str:
    if not timestamp:
        return "never"
    seconds = max(0, time.time() - timestamp)
    return f"{seconds:.0f}s ago" if seconds < 120 else f"{seconds / 60:.0f}m ago"


def _counts(counts: dict[str, int]) -> str:
    """Non-zero counts in execution-state order (unknown states last), e.g. `3 active, 1 failed`."""
    order = [*STATES, *sorted(set(counts) - set(STATES))]
    return ", ".join(f"{counts[state]} {state}" for state in order if counts.get(state)) or "none"


def _table(title: str, *columns: str) -> Table:
    table = Table(title=title)
    for column in columns:
        table.add_column(column)
    return table


def _add(table: Table, *cells: Any) -> None:
    """Strings go in as plain text: a device's reason like "[/bold]" must not be read as rich markup."""
    table.add_row(*(Text(cell) if isinstance(cell, str) else cell for cell in cells))


def render_status(data: dict[str, Any], console: Console) -> None:
    """Print a status dict; see the module docstring for what shows when."""
    devices = data.get("devices", [])
    attention = data.get("attention", [])
    counts = data.get("device_counts")  # absent from older servers, which list every device
    total = counts["total"] if counts else len(devices)
    large = total > LARGE_FLEET
    if large:
        needy = {a["device"] for a in attention}
        if counts:
            states = Counter({"no report" if state == "none" else state: n for state, n in counts["states"].items()})
            online = counts["online"]
        else:
            states = Counter(d["execution"]["state"] if d.get("execution") else "no report" for d in devices)
            online = sum(1 for d in devices if d.get("online"))
        console.print(Text(f"{total} devices, {online} online: {_counts(states)}; "
                           f"listing the {len(needy)} that need attention"))
        devices = [d for d in devices if d["id"] in needy]
    if devices or not large:
        console.print(_devices(devices))
    console.print(_releases(data.get("releases", [])))
    _render_rollouts(data.get("rollouts", []), console)
    _render_decisions(data.get("decisions", [])[:DECISIONS], console)
    if data.get("drift"):
        flags = _table("drift", "model", "version", "status", "devices")
        for f in data["drift"]:
            _add(flags, f["model"], f["version"], f["status"], ", ".join(f.get("devices", [])) or "-")
        console.print(flags)
    if data.get("revoked"):
        gone = _table("revoked devices", "device", "revoked", "reason", "refused since")
        for r in data["revoked"]:
            _add(gone, r["id"], time.strftime("%Y-%m-%d %H:%M", time.gmtime(r["revoked_at"])), r["reason"] or "-",
                 str(r["refused_messages"]))
        console.print(gone)
    for cert in data.get("certificates", []):
        days = (cert["not_after"] - time.time()) / 86400
        when = f"expired {-days:.0f} days ago" if days < 0 else f"expires in {days:.0f} days"
        console.print(Text(f"warning: {cert['device']}'s certificate {when} "
                           f"({time.strftime('%Y-%m-%d', time.gmtime(cert['not_after']))}): "
                           f"edgeops device renew {cert['device']} --fleet DIR", style="yellow"))
    if data.get("anomalies"):
        claims = _table("anomalies: reports the fleet did not count", "device", "claimed", "fleet assigned", "times",
                        "last")
        for a in data["anomalies"]:
            _add(claims, a["device"], a["claimed"], a["assigned"], str(a["count"]), _ago(a["last_at"]))
        console.print(claims)
    if attention:
        needs = _table("needs attention", "device", "rollout", "reason")
        for a in attention:
            _add(needs, a["device"], "-" if a.get("rollout") is None else f"#{a['rollout']}", a.get("reason", ""))
        console.print(needs)


def render_devices(devices: list[dict[str, Any]], console: Console) -> None:
    """`edgeops device list`: the devices table of `edgeops status`, for the devices given."""
    console.print(_devices(devices))


def _devices(devices: list[dict[str, Any]]) -> Table:
    table = _table("devices", "device", "profile", "installed", "execution", "seen", "online", "calls", "errors",
                   "p95 ms", "dropped")
    table.columns[0].no_wrap = True
    for d in devices:
        execution = d.get("execution")
        state = f"r{execution['release_id']} {execution['state']}" if execution else "-"  # reasons: decisions, attention
        installed = f"{d['installed_model']} {d['installed_version']}" if d.get("installed_version") else "-"
        t = d.get("telemetry") or {}
        p95 = f"{t['p95_ms']:.2f}" if t.get("p95_ms") is not None else "-"
        dropped = str(t.get("dropped", "-")) + (f" ({t['rejected_batches']} batches refused)" if t.get("rejected_batches") else "")
        _add(table, d["id"], d["profile"], installed, state, _ago(d.get("last_seen")), "yes" if d.get("online") else "no",
             str(t.get("inferences", "-")), str(t.get("errors", "-")), p95, dropped)
    return table


def _releases(releases: list[dict[str, Any]]) -> Table:
    table = _table("releases", "id", "model", "version", "selector", "bundles")
    for r in releases:
        selector = ",".join(f"{k}={v}" for k, v in r["selector"].items()) or "all"
        _add(table, str(r["id"]), r["model"], r["version"], selector, ", ".join(t["profile"] for t in r["targets"]))
    return table


def _render_rollouts(rollouts: list[dict[str, Any]], console: Console) -> None:
    """A panel for each model's newest rollout unless it finished well; a row for every other, so a
    long history stays one line a rollout."""
    shown, compact = set(), []
    for r in rollouts:  # newest first
        if r["model"] in shown or r["state"] in FINISHED:
            compact.append(r)
        else:
            console.print(_rollout_panel(r))
        shown.add(r["model"])
    if not compact:
        return
    table = _table("earlier rollouts", "rollout", "model", "version", "state", "stage", "active", "updated")
    for r in compact:
        stages = r.get("stages", [])
        label = stages[r["stage"]]["label"] if 0 <= r.get("stage", -1) < len(stages) else "-"
        _add(table, f"#{r['id']}", r["model"], r["version"], r["state"], label,
             f"{r.get('counts', {}).get('active', 0)}/{r.get('targeted', 0)}", _ago(r.get("updated_at")))
    console.print(table)


def _rollout_panel(r: dict[str, Any]) -> Panel:
    selector = ",".join(f"{k}={v}" for k, v in r.get("selector", {}).items()) or "all"
    parts: list[Any] = [Text(f"selector {selector} · profiles {', '.join(r.get('profiles', [])) or '-'} · "
                             f"{r.get('targeted', 0)} devices targeted")]
    stages = Table.grid(padding=(0, 2))
    for index, s in enumerate(r.get("stages", [])):
        mark = "◀ current" if index == r.get("stage") else ("done" if s.get("done") else "")
        failed = f"{s['failed']} failed" if s.get("failed") else ""
        installing = s.get("assigned", 0) - s["active"] - s.get("failed", 0)
        waiting = f"{installing} installing" if installing > 0 else ""
        _add(stages, s["label"], ProgressBar(total=max(s["target"], 1), completed=s["active"], width=30),
             f"{s['active']}/{s['target']} active", waiting, failed, mark)
    parts += [stages, Text(f"executions: {_counts(r.get('counts', {}))}")]
    if r.get("gates"):
        gates = Table.grid(padding=(0, 2))
        for g in r["gates"]:
            _add(gates, _MARKS[g.get("ok")], g["name"], g["value"], g["threshold"], g.get("detail", ""))
        parts.append(gates)
    parts.append(Text(f"next: {r.get('next') or '-'}"))
    return Panel(Group(*parts), title=Text(f"rollout #{r['id']} {r['model']} {r['version']} · {r['state']}"),
                 title_align="left")


def _render_decisions(decisions: list[dict[str, Any]], console: Console) -> None:
    if not decisions:
        return
    table = _table(f"latest decisions (last {DECISIONS})", "time", "rollout", "actor", "action", "reason")
    for d in decisions:
        _add(table, time.strftime("%m-%d %H:%M:%S", time.localtime(d["t"])), f"#{d['rollout']}", d["actor"],
             d["action"], d.get("reason", ""))
    console.print(table)


def render_drift(report: dict[str, Any], console: Console) -> None:
    """`edgeops drift report`: one row per model version, then its devices that drift."""
    versions = Table(title=f"drift (alpha {report['alpha']}, PSI floor {report['psi_floor']}, "
                           f"retraining when {report['persistence']} alarm)")
    for column in ("model", "version", "status", "windows", "samples", "devices drifting", "captured", "top features (PSI)"):
        versions.add_column(column)
    for v in report["versions"]:
        drifting = [name for name, d in v["devices"].items() if d["status"] != "ok"]
        top = ", ".join(f"{f['feature']} {f['psi']:.2f}" for f in v["top_features"][:3] if f["drifted"]) or "-"
        versions.add_row(v["model"], v["version"], v["status"], str(v["windows"]), str(v["samples"]),
                         f"{len(drifting)}/{len(v['devices'])}", str(v["captured"]), top)
    console.print(versions)
    for v in report["versions"]:
        rows = [(name, d) for name, d in v["devices"].items() if d["status"] != "ok"]
        if not rows:
            continue
        devices = Table(title=f"{v['model']} {v['version']}: devices that drift")
        for column in ("device", "status", "alarmed windows", "latest window drifted in"):
            devices.add_column(column)
        for name, d in rows:
            devices.add_row(name, d["status"], f"{d['alarmed']}/{d['windows']}", ", ".join(d["drifted"][:4]) or "-")
        console.print(devices)
