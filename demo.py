"""`edgeops demo`: the product end to end on its embedded defaults, with nothing to set up.

Today that is the compiler's half: train a real model (an MLP on scikit-learn's bundled digits),
build it for two boards whose profiles differ, and compare what each got.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from edgeops.compiler.build import BuildRequest, build
from edgeops.examples import train_digits_mlp

# Two boards that want different things: int8 on a 512 MB Pi with an older onnxruntime, fp16 on a
# Jetson whose GPU runs half precision.
PROFILES = ("rpi-zero2w", "jetson-orin-nano-fp16")


def run_demo(workdir: Path, console: Console) -> list[dict[str, Any]]:
    """Train, build for each demo profile, print the comparison; return the build reports."""
    workdir = Path(workdir)
    with console.status("training an MLP on scikit-learn's digits"):
        example = train_digits_mlp(workdir / "model")
    console.print(f"trained {example.name}: {example.onnx}")
    reports = []
    for profile in PROFILES:
        with console.status(f"building for {profile}") as status:
            request = BuildRequest(example.onnx, profile, example.calib, example.eval, name=example.name,
                                   outdir=workdir / "bundles")
            reports.append(build(request, progress=lambda message, p=profile: status.update(f"{p}: {message}")))
    console.print(comparison(reports))
    return reports


def comparison(reports: list[dict[str, Any]]) -> Table:
    """One column per board: what the same model became on each."""
    table = Table(title="one model, two boards")
    table.add_column("")
    for r in reports:
        table.add_column(r["profile"], overflow="fold")
    rows = {
        "runtime": lambda r: f"{r['runtime']['name']} {r['runtime']['device_version']}",
        "compiled as": lambda r: r["chosen"],
        "model size": lambda r: f"{r['size_bytes'] / 1e3:.0f} kB ({r['size_bytes'] / r['fp32_size_bytes']:.0%} of fp32)",
        "download": lambda r: f"{r['bundle_bytes'] / 1e3:.0f} kB",
        "accuracy": lambda r: f"{r['quality']['fp32']:.3f} fp32 -> {r['quality']['compiled']:.3f}",
        "peak memory": lambda r: f"{r['peak_memory_mb']['compiled']:.0f} MB",
        "latency": lambda r: f"{r['latency_ms']['fp32']:.3f} -> {r['latency_ms']['compiled']:.3f} ms",
        "bundle": lambda r: r["bundle"],
    }
    for label, cell in rows.items():
        table.add_row(label, *(cell(r) for r in reports))
    return table
