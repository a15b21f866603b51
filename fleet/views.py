"""`edgeops status` on the terminal: devices and releases as rich tables."""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console
from rich.table import Table


def _ago(timestamp: float | None) -> str:
    if not timestamp:
        return "never"
    seconds = max(0, time.time() - timestamp)
    return f"{seconds:.0f}s ago" if seconds < 120 else f"{seconds / 60:.0f}m ago"


def render_status(data: dict[str, Any], console: Console) -> None:
    devices = Table(title="devices")
    devices.add_column("device", no_wrap=True)
    for column in ("profile", "installed", "execution", "seen", "online", "calls", "errors", "p95 ms", "dropped"):
        devices.add_column(column)
    for d in data["devices"]:
        execution = d["execution"]
        state = f"r{execution['release_id']} {execution['state']}" if execution else "-"
        if execution and execution["reason"]:
            state += f" ({execution['reason']})"
        installed = f"{d['installed_model']} {d['installed_version']}" if d["installed_version"] else "-"
        t = d.get("telemetry") or {}
        p95 = f"{t['p95_ms']:.2f}" if t.get("p95_ms") is not None else "-"
        devices.add_row(d["id"], d["profile"], installed, state, _ago(d["last_seen"]), "yes" if d["online"] else "no",
                        str(t.get("inferences", "-")), str(t.get("errors", "-")), p95, str(t.get("dropped", "-")))
    console.print(devices)
    releases = Table(title="releases")
    for column in ("id", "model", "version", "selector", "bundles"):
        releases.add_column(column)
    for r in data["releases"]:
        selector = ",".join(f"{k}={v}" for k, v in r["selector"].items()) or "all"
        releases.add_row(str(r["id"]), r["model"], r["version"], selector, ", ".join(t["profile"] for t in r["targets"]))
    console.print(releases)


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
