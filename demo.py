"""`edgeops demo`: the product end to end on its embedded defaults, with nothing to set up.

Train a real model (an MLP on scikit-learn's bundled digits), build it for two boards whose
profiles differ and compare what each got; then start the embedded broker and a fleet, enroll
simulated agents on both profiles, push the release, and show every agent verify and install the
bundle built for its own board. Then apps send traffic (real held-out digits), the broker goes down
while they keep going, and the records buffered in the agents' outboxes arrive once it is back.
Last, one device's inputs get dimmer: its drift windows alarm, the fleet flags the model version
"retraining recommended", and the samples the devices captured are exported for retraining.
"""

from __future__ import annotations

import logging
import shutil
import socket
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from rich.console import Console
from rich.table import Table

from edgeops.agent.service import Agent
from edgeops.compiler.build import BuildRequest, build
from edgeops.examples import train_digits_mlp
from edgeops.fleet import registry
from edgeops.fleet.drift import export
from edgeops.fleet.drift import report as drift_report
from edgeops.fleet.broker import EmbeddedBroker
from edgeops.fleet.home import enroll_device, init_fleet, push
from edgeops.fleet.server import FleetServer
from edgeops.fleet.views import render_drift, render_status

# Two boards that want different things: int8 on a 512 MB Pi with an older onnxruntime, fp16 on a
# Jetson whose GPU runs half precision.
PROFILES = ("rpi-zero2w", "jetson-orin-nano-fp16")
AGENTS_PER_PROFILE = 3
CALLS_PER_AGENT = 40  # inference calls per agent in each traffic round
# Short drift windows so the demo sees several; devices capture a few samples per window for retraining.
AGENT_SETTINGS = {"drift_window": 100, "capture": 8, "metrics_interval_s": 5.0}
DRIFT_BATCHES, DRIFT_BATCH = 15, 20  # per agent: 300 samples in the drift round, 3 windows
DIMMED = "rpi-zero2w-3"  # the device whose camera gets dimmer in the drift round
DEMO_FOLDERS = ("model", "bundles", "fleet", "devices")
DELIVERY_TIMEOUT_S = 120


def run_demo(workdir: Path, console: Console) -> list[dict[str, Any]]:
    """Train, build for each demo profile, print the comparison; return the build reports.

    Reruns start over: the demo's own subfolders of `workdir` from an earlier run are replaced.
    """
    workdir = Path(workdir)
    for previous in DEMO_FOLDERS:
        shutil.rmtree(workdir / previous, ignore_errors=True)
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
    samples = dict(np.load(example.eval))
    samples.pop("labels")
    status = deliver(workdir, [Path(r["bundle"]) for r in reports], samples, console)
    render_status(status, console)
    return reports


def deliver(workdir: Path, bundles: list[Path], samples: dict[str, np.ndarray], console: Console) -> dict[str, Any]:
    """Fleet + embedded broker + simulated agents in this process: push and wait until all are
    active, then traffic, an outage with more traffic, and the buffered telemetry arriving after it."""
    port = _free_port()
    # amqtt logs tracebacks of its own races when many clients reconnect at once after the outage;
    # the clients retry and the demo checks every record arrived, so keep its output readable.
    for noisy in ("amqtt", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.CRITICAL)
    broker = EmbeddedBroker("127.0.0.1", port).start()
    home = init_fleet(workdir / "fleet", broker.url)
    devices = {f"{profile}-{n}": profile for profile in PROFILES for n in range(1, AGENTS_PER_PROFILE + 1)}
    for device_id, profile in devices.items():
        enroll_device(home, device_id, profile, {"site": "demo"}, workdir / "devices" / device_id, AGENT_SETTINGS)
    server = FleetServer(home, broker.url).start()
    stop = threading.Event()
    agents = [Agent(workdir / "devices" / device_id) for device_id in devices]
    threads = [threading.Thread(target=a.run, args=(stop,), daemon=True) for a in agents]
    for thread in threads:
        thread.start()
    try:
        db = registry.open_db(home.db_path)
        with console.status("pushing the release to the fleet") as progress:
            release = push(home, bundles, {"site": "demo"})
            deadline = time.monotonic() + DELIVERY_TIMEOUT_S
            while time.monotonic() < deadline:
                active = db["executions"].count_where("release_id = ? and state = 'active'", [release])
                progress.update(f"release {release}: {active}/{len(agents)} agents verified and installed it")
                if active == len(agents):
                    break
                time.sleep(0.2)
        traffic(agents, samples)
        _wait_for_records(db, len(agents) * CALLS_PER_AGENT, console, "inference records reaching the fleet")
        console.print(f"{len(agents)} agents served {len(agents) * CALLS_PER_AGENT} inferences; the fleet has their records")
        broker.stop()
        traffic(agents, samples)
        for agent in agents:
            agent.telemetry.flush()  # what the recorder thread does every 50 ms
        console.print(f"broker down: {len(agents) * CALLS_PER_AGENT} more inferences served and kept in the agents' outboxes "
                      f"({sum(a.telemetry.outbox.count() for a in agents)} records waiting)")
        broker = EmbeddedBroker("127.0.0.1", port).start()
        _wait_for_records(db, 2 * len(agents) * CALLS_PER_AGENT, console, "the buffered records after the outage")
        console.print("broker back: every record made during the outage arrived, none twice")
        drift_round(agents, samples)
        report = _wait_for_flag(db, console)
        render_drift(report, console)
        written = export(db, report["versions"][0]["model"], None, workdir / "retrain")
        console.print(f"retraining dataset: {written['samples']} captured samples in {workdir / 'retrain'}")
        return registry.status(db)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=10)
        server.stop()
        broker.stop()


def traffic(agents: list[Agent], samples: dict[str, np.ndarray]) -> None:
    """Each agent classifies CALLS_PER_AGENT real held-out digits, one call each, as an app would."""
    for agent in agents:
        for i in range(CALLS_PER_AGENT):
            agent.infer({name: values[i : i + 1] for name, values in samples.items()})


def drift_round(agents: list[Agent], samples: dict[str, np.ndarray]) -> None:
    """Every agent classifies more held-out digits in batches; on DIMMED the pixels come in at half
    brightness, as from a camera whose exposure changed."""
    rng = np.random.default_rng(7)
    for agent in agents:
        for _ in range(DRIFT_BATCHES):
            picks = rng.integers(0, len(next(iter(samples.values()))), DRIFT_BATCH)
            batch = {name: values[picks] * (0.5 if agent.config.id == DIMMED else 1.0) for name, values in samples.items()}
            agent.infer(batch)


def _wait_for_flag(db, console: Console) -> dict[str, Any]:
    """The drift report once the fleet has every device's drift windows and has flagged the dimmed one."""
    expected = len(list(db.query("select id from devices"))) * DRIFT_BATCHES * DRIFT_BATCH // AGENT_SETTINGS["drift_window"]
    deadline = time.monotonic() + DELIVERY_TIMEOUT_S
    with console.status("waiting for the drift windows") as progress:
        while time.monotonic() < deadline:
            windows = db.execute("select count(*) from telemetry where kind = 'drift'").fetchone()[0]
            progress.update(f"drift windows at the fleet: {windows}/{expected}")
            if windows >= expected:
                return drift_report(db)
            time.sleep(0.2)
    raise TimeoutError(f"only {windows} of {expected} drift windows reached the fleet")


def _wait_for_records(db, expected: int, console: Console, what: str) -> None:
    deadline = time.monotonic() + DELIVERY_TIMEOUT_S
    with console.status(f"waiting for {what}") as progress:
        while time.monotonic() < deadline:
            got = db.execute("select count(*) from telemetry where kind = 'inference'").fetchone()[0]
            progress.update(f"{what}: {got}/{expected}")
            if got >= expected:
                return
            time.sleep(0.2)
    raise TimeoutError(f"only {got} of {expected} inference records reached the fleet")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
