"""A small self-contained HTML page charting the candidates: download size vs quality, by latency.

Plain SVG, no scripts and no external assets, so it opens anywhere and can be attached to a CI run.
"""

from __future__ import annotations

import html
from typing import Any

WIDTH, HEIGHT, PAD = 640, 360, 56


def _scale(value: float, lo: float, hi: float, out_lo: float, out_hi: float) -> float:
    return out_lo if hi == lo else out_lo + (value - lo) * (out_hi - out_lo) / (hi - lo)


def candidates_html(report: dict[str, Any]) -> str:
    """The report's candidates as an HTML page with one SVG scatter plot and a legend table."""
    measured = [c for c in report["candidates"] if not c["error"]]
    q = report["quality"]
    sizes = [c["download_bytes"] / 1e3 for c in measured] or [0.0]
    qualities = [c["quality"] for c in measured] + [q["fp32"]]
    latencies = [c["latency_ms"] for c in measured] or [1.0]
    x_hi, y_lo, y_hi = max(sizes) * 1.05, min(qualities) - 0.01, max(qualities) + 0.01
    points, rows = [], []
    for index, c in enumerate(measured, 1):
        x = _scale(c["download_bytes"] / 1e3, 0, x_hi, PAD, WIDTH - PAD)
        y = _scale(c["quality"], y_lo, y_hi, HEIGHT - PAD, PAD)
        radius = 4 + 10 * c["latency_ms"] / max(latencies)
        chosen = c["label"] == report["chosen"]
        colour = "#1a7f37" if chosen else ("#0969da" if c["ok"] else "#cf222e")
        points.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{radius:.1f}" fill="{colour}" fill-opacity="0.6">'
                      f"<title>{html.escape(c['label'])}</title></circle>"
                      f'<text x="{x + radius + 2:.1f}" y="{y + 4:.1f}" font-size="11">{index}</text>')
        rows.append(f"<tr><td>{index}</td><td>{html.escape(c['label'])}</td><td>{c['download_bytes'] / 1e3:.0f}</td>"
                    f"<td>{c['quality']:.4f}</td><td>{c['latency_ms']:.3f}</td>"
                    f"<td>{'chosen' if chosen else 'fits' if c['ok'] else html.escape('; '.join(c['misses']))}</td></tr>")
    fp32_y = _scale(q["fp32"], y_lo, y_hi, HEIGHT - PAD, PAD)
    limit_y = _scale(q["fp32"] - q["max_drop"], y_lo, y_hi, HEIGHT - PAD, PAD)
    title = html.escape(f"{report['name']} {report['version']} for {report['profile']}")
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{title}</title>
<style>body{{font-family:sans-serif;margin:2em}}td,th{{padding:2px 8px;text-align:left}}</style></head>
<body><h1>{title}</h1>
<p>Each circle is a candidate: download size (x), {html.escape(q['metric'])} (y), batch-1 latency (radius).
Green: chosen; blue: fits; red: misses the tolerance or a budget.</p>
<svg width="{WIDTH}" height="{HEIGHT}" role="img" aria-label="candidates">
<line x1="{PAD}" y1="{HEIGHT - PAD}" x2="{WIDTH - PAD}" y2="{HEIGHT - PAD}" stroke="black"/>
<line x1="{PAD}" y1="{PAD}" x2="{PAD}" y2="{HEIGHT - PAD}" stroke="black"/>
<line x1="{PAD}" y1="{fp32_y:.1f}" x2="{WIDTH - PAD}" y2="{fp32_y:.1f}" stroke="gray" stroke-dasharray="4"/>
<text x="{WIDTH - PAD - 40}" y="{fp32_y - 4:.1f}" font-size="11">fp32</text>
<line x1="{PAD}" y1="{limit_y:.1f}" x2="{WIDTH - PAD}" y2="{limit_y:.1f}" stroke="#cf222e" stroke-dasharray="2"/>
<text x="{WIDTH - PAD - 60}" y="{limit_y - 4:.1f}" font-size="11">tolerance</text>
<text x="{WIDTH / 2:.0f}" y="{HEIGHT - 16}" font-size="12">download (kB, 0 to {x_hi:.0f})</text>
<text x="8" y="{PAD - 12}" font-size="12">{html.escape(q['metric'])} ({y_lo:.3f} to {y_hi:.3f})</text>
{''.join(points)}
</svg>
<table><tr><th>#</th><th>configuration</th><th>kB</th><th>{html.escape(q['metric'])}</th><th>ms</th><th>result</th></tr>
{''.join(rows)}</table>
</body></html>
"""
