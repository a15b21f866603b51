"""The build report on the terminal: the chosen model against fp32, and every candidate tried."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def render(report: dict[str, Any], console: Console) -> None:
    q = report["quality"]
    lat = report["latency_ms"]
    summary = Table(title=f"{report['name']} {report['version']} for {report['profile']}", show_header=True)
    for column in ("", "fp32", "compiled", "ratio"):
        summary.add_column(column, justify="right")
    summary.add_row("size", _mb(report["fp32_size_bytes"]), _mb(report["size_bytes"]),
                    f"{report['size_bytes'] / report['fp32_size_bytes']:.2f}x")
    summary.add_row("download", "", _mb(report["bundle_bytes"]), f"{report['bundle_bytes'] / report['fp32_size_bytes']:.2f}x")
    summary.add_row(q["metric"], f"{q['fp32']:.4f}", f"{q['compiled']:.4f}", f"drop {q['drop']:+.4f}")
    summary.add_row("latency (batch 1)", f"{lat['fp32']:.3f} ms", f"{lat['compiled']:.3f} ms",
                    f"{lat['compiled'] / lat['fp32']:.2f}x" if lat["fp32"] else "")
    mem = report["peak_memory_mb"]
    summary.add_row("peak memory", f"{mem['fp32']:.1f} MB", f"{mem['compiled']:.1f} MB", "")
    console.print(summary)
    console.print(candidates_table(report))
    console.print(f"chosen: [bold]{report['chosen']}[/bold]")
    _footer(report, console)
    console.print(f"bundle: [bold]{report['bundle']}[/bold]  chart: {report['chart']}")


def render_failure(report: dict[str, Any], console: Console) -> None:
    """A build that found no fitting candidate: every candidate, so the user sees what to change."""
    console.print(candidates_table(report))
    _footer(report, console)


def _footer(report: dict[str, Any], console: Console) -> None:
    q, search = report["quality"], report["search"]
    console.print(f"metric: {q['metric']} ({q['why']}); fp32 scores {q['fp32']:.4f} on {q['eval_samples']} samples")
    for warning in report["warnings"]:
        console.print(f"[bold yellow]warning:[/bold yellow] {warning}")
    for note in report["notes"]:
        console.print(f"note: {note}")
    console.print(f"search: {len(report['candidates'])} candidates in {search['seconds']:.0f} s "
                  f"(limit {search['time_limit_s']:.0f} s); build: {report['compile_seconds']:.0f} s")


def _verdict(candidate: dict[str, Any], chosen: bool) -> str:
    if chosen:
        return "chosen"
    if candidate["error"]:
        return "failed: " + candidate["error"]
    return "fits" if candidate["ok"] else "; ".join(candidate["misses"])


def candidates_table(report: dict[str, Any]) -> Table:
    table = Table(title="candidates (details: --json)", show_header=True)
    table.add_column("configuration", no_wrap=True)
    table.add_column("kB", justify="right")
    table.add_column(report["quality"]["metric"], justify="right")
    table.add_column("ms", justify="right")
    table.add_column("result", overflow="fold")
    for c in report["candidates"]:
        chosen = c["label"] == report.get("chosen")
        measured = not c["error"]
        table.add_row(
            c["label"],
            f"{c['download_bytes'] / 1e3:.0f}" if measured else "-",
            f"{c['quality']:.4f}" if measured else "-",
            f"{c['latency_ms']:.3f}" if measured else "-",
            _verdict(c, chosen),
            style="bold green" if chosen else None,
        )
    return table
