"""`edgeops demo`: the product end to end on its embedded defaults, with nothing to set up.

Train a real model (an MLP on scikit-learn's bundled digits) and build it for two boards whose
profiles differ; start the fleet's own Mosquitto (mutual TLS with the fleet CA), the fleet with its API and dashboard, and a dozen agents
as real `edgeops agent run` processes; apps call each agent's inference API all along. Version 1
rolls out in stages, gated by its health. Version 2, a smaller model trained on 4x4 thumbnails,
breaks the apps (they send 8x8 images): it fails its error-rate gate on the canary and the fleet
rolls it back by itself. Last, one device's camera gets dimmer: its drift windows alarm, the fleet
flags the model version "retraining recommended", and the captured samples are exported.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
from rich.console import Console
from rich.table import Table

from edgeops.agent import api_client
from edgeops.compiler.build import BuildRequest, build
from edgeops.examples import ExampleModel, train_digits_mlp
from edgeops.fleet import registry, rollout
from edgeops.fleet.api import ApiServer, serve_options
from edgeops.fleet.broker import ManagedBroker, free_port
from edgeops.fleet.drift import export, flagged
from edgeops.fleet.drift import report as drift_report
from edgeops.fleet.home import FleetHome, enroll_device, init_fleet, push
from edgeops.fleet.plan import make_plan
from edgeops.fleet.server import FleetServer
from edgeops.fleet.views import render_drift, render_status
from edgeops.protocol.errors import EdgeopsError

# Two boards that want different things: int8 on a 512 MB Pi with an older onnxruntime, fp16 on a
# Jetson whose GPU runs half precision.
PROFILES = ("rpi-zero2w", "jetson-orin-nano-fp16")
AGENTS_PER_PROFILE = 6
MODEL = "digits"
# Short stages and bakes so the demo takes minutes; `edgeops push --help` shows the real defaults.
PLAN = make_plan(stages="1dev,50%,100%", bake="3s", min_calls=20, abort="failed>10%,min=2")
# Drift windows of 300 samples: the demo sees several, and the statistics stay calm on undrifted devices
# (at 100, sampling noise alone pushes PSI past its 0.1 floor). Devices capture a few samples per window.
AGENT_SETTINGS = {"drift_window": 300, "capture": 8, "metrics_interval_s": 5.0}
CALL_INTERVAL_S = 0.1  # each app calls its agent ten times a second
DRIFT_BATCH = 20  # samples per call once the drift round starts
DIMMED = "rpi-zero2w-3"  # the device whose camera gets dimmer in the drift round
DEMO_FOLDERS = ("model", "model-v2", "bundles", "fleet", "devices", "retrain")
TIMEOUT_S = 180


def run_demo(workdir: Path, console: Console, keep_running: bool = False) -> dict[str, Any]:
    """Run the demo in `workdir` (its own subfolders from an earlier run are replaced); return the
    build reports of v1 and the fleet's final status."""
    workdir = Path(workdir)
    for previous in DEMO_FOLDERS:
        shutil.rmtree(workdir / previous, ignore_errors=True)
    with console.status("training v1 (8x8 digits) and v2 (4x4 thumbnails) on scikit-learn's digits"):
        v1_model = train_digits_mlp(workdir / "model")
        v2_model = train_digits_mlp(workdir / "model-v2", thumbnail=True)
    v1 = _build_all(v1_model, "1.0.0", workdir / "bundles", console)
    console.print(comparison(v1))
    v2 = _build_all(v2_model, "2.0.0", workdir / "bundles", console)
    samples = dict(np.load(v1_model.eval))
    samples.pop("labels")
    with Demo(workdir, console) as demo:
        demo.start_agents()
        demo.apps_start(samples)
        demo.roll_out([Path(r["bundle"]) for r in v1], "v1: the model the apps were written for")
        demo.roll_out([Path(r["bundle"]) for r in v2], "v2: retrained on 4x4 thumbnails, smaller, but the apps send 8x8")
        demo.drift_round()
        status = registry.status(demo.db)
        render_status(status, console)
        console.print(f"\ndashboard: [bold]{demo.api.url}/[/bold] (HTTPS with a certificate from the fleet CA "
                      f"{demo.home.pki / 'ca.pem'}: import it into the browser, or accept the warning; read-only until "
                      f"you sign in with api_token from {workdir / 'fleet' / 'fleet.json'})")
        if keep_running:
            demo.wait_for_interrupt()
    return {"builds": v1, "status": status}


def _build_all(model: ExampleModel, version: str, outdir: Path, console: Console) -> list[dict[str, Any]]:
    reports = []
    for profile in PROFILES:
        with console.status(f"building {version} for {profile}") as status:
            request = BuildRequest(model.onnx, profile, model.calib, model.eval, name=MODEL, version=version, outdir=outdir)
            reports.append(build(request, progress=lambda message, p=profile: status.update(f"{version} {p}: {message}")))
    return reports


class Demo:
    """The running parts: the fleet's Mosquitto (mutual TLS), fleet server and API, agent processes, the apps' traffic."""

    def __init__(self, workdir: Path, console: Console):
        self.workdir, self.console = workdir, console
        self.devices = {f"{profile}-{n}": profile for profile in PROFILES for n in range(1, AGENTS_PER_PROFILE + 1)}
        self.stop = threading.Event()
        self.dimmed = threading.Event()
        self.agents: list[subprocess.Popen] = []
        self.apps: list[threading.Thread] = []

    def __enter__(self) -> "Demo":
        self.home = init_fleet(self.workdir / "fleet", f"mqtts://127.0.0.1:{free_port()}")
        self.broker = ManagedBroker(self.home).start()
        for device_id, profile in self.devices.items():
            enroll_device(self.home, device_id, profile, {"site": "demo"}, self.workdir / "devices" / device_id, AGENT_SETTINGS)
        self.db = registry.open_db(self.home.db_path)
        self.server = FleetServer(self.home, self.home.broker_url, broker=self.broker).start()
        home = FleetHome.open(self.home.path)
        self.api = ApiServer(home, "127.0.0.1:0", **serve_options(home, {})).start()  # HTTPS, as `fleet serve`
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        for app in self.apps:
            app.join(timeout=10)
        for agent in self.agents:
            agent.terminate()
        for agent in self.agents:
            try:
                agent.wait(timeout=15)
            except subprocess.TimeoutExpired:
                agent.kill()
        self.api.stop()
        self.server.stop()
        self.broker.stop()

    def start_agents(self) -> None:
        """Each device is an `edgeops agent run` process with its inference API on a free port."""
        for device_id in self.devices:
            device_dir = self.workdir / "devices" / device_id
            with open(device_dir / "agent.log", "w") as log:
                self.agents.append(subprocess.Popen([sys.executable, "-m", "edgeops", "agent", "run", str(device_dir),
                                                     "--api", "127.0.0.1:0"], stdout=log, stderr=log))
        self._wait("agents starting", lambda: self._online(), len(self.devices),
                   lambda n: f"{n}/{len(self.devices)} agent processes online")
        self.console.print(f"{len(self.devices)} agents running as processes, {AGENTS_PER_PROFILE} per board, "
                           f"each serving inference on 127.0.0.1")

    def _online(self) -> int:
        ready = sum(1 for d in self.devices if (self.workdir / "devices" / d / "state" / "api.json").exists())
        online = self.db.execute("select count(*) from devices where online = 1").fetchone()[0]
        return min(ready, online)

    def apps_start(self, samples: dict[str, np.ndarray]) -> None:
        """One app per device calls its agent's API with held-out digits, as a camera app would."""
        for device_id in self.devices:
            app = threading.Thread(target=self._app, args=(device_id, samples), daemon=True)
            app.start()
            self.apps.append(app)

    def _app(self, device_id: str, samples: dict[str, np.ndarray]) -> None:
        rng = np.random.default_rng(abs(hash(device_id)) % 2**32)
        device_dir = self.workdir / "devices" / device_id
        count = len(next(iter(samples.values())))
        while not self.stop.wait(CALL_INTERVAL_S):
            size = DRIFT_BATCH if self.dimmed.is_set() else 1
            picks = rng.integers(0, count, size)
            dim = 0.5 if self.dimmed.is_set() and device_id == DIMMED else 1.0
            try:
                api_client.infer(device_dir, {name: values[picks] * dim for name, values in samples.items()})
            except EdgeopsError:
                pass  # no model yet, or one that refuses these inputs: the agent counts that as an error

    def roll_out(self, bundles: list[Path], title: str) -> None:
        """Push a release with the demo's plan and follow its rollout until it completes or rolls back."""
        self.console.rule(title)
        rollout_id = push(self.home, bundles, {"site": "demo"}, plan=PLAN)
        self.console.print(f"pushed release {rollout_id}: stages {','.join(PLAN.to_dict()['stages'])}, bake {PLAN.bake_s:g}s, "
                           f"at least {PLAN.min_calls} calls per stage, rollback on a failed gate")

        def settled() -> int:
            summary = rollout.summary(self.db, rollout_id)
            if summary["state"] == "rolled-back":  # settled once every device is back on what it ran before
                back = self.db.execute("select count(*) from devices where installed_version != ?",
                                       [summary["version"]]).fetchone()[0]
                return back == len(self.devices)
            return summary["state"] not in rollout.OPEN

        def progress(_: Any) -> str:
            s = rollout.summary(self.db, rollout_id)
            stages = " ".join(f"{st['label']}:{st['active']}/{st['target']}" for st in s["stages"])
            return f"rollout {rollout_id} {s['state']} [{stages}] {s['next']}"

        self._wait(f"rollout {rollout_id}", settled, True, progress)
        for decision in reversed(rollout.decisions(self.db, rollout_id)):
            self.console.print(f"  {decision['actor']:>8} {decision['action']:<9} {decision['reason']}")

    def drift_round(self) -> None:
        """The apps send batches; DIMMED's camera delivers half-bright pixels until the fleet flags it."""
        self.console.rule(f"drift: the camera of {DIMMED} gets dimmer")
        self.dimmed.set()
        self._wait("drift windows", lambda: any(DIMMED in f["devices"] for f in flagged(self.db)), True,
                   lambda _: f"drift windows at the fleet: {self.db.execute(_DRIFT_WINDOWS).fetchone()[0]}")
        self.dimmed.clear()
        render_drift(drift_report(self.db, MODEL), self.console)
        written = export(self.db, MODEL, None, self.workdir / "retrain")
        self.console.print(f"retraining dataset: {written['samples']} captured samples in {self.workdir / 'retrain'}")

    def _wait(self, what: str, measure: Callable[[], Any], goal: Any, describe: Callable[[Any], str]) -> None:
        deadline = time.monotonic() + TIMEOUT_S
        with self.console.status(what) as status:
            while time.monotonic() < deadline:
                value = measure()
                if value == goal:
                    return
                status.update(describe(value))
                time.sleep(0.25)
        raise EdgeopsError(f"the demo timed out waiting for {what}; agent logs are in {self.workdir / 'devices'}")

    def wait_for_interrupt(self) -> None:
        self.console.print("fleet, agents and apps keep running; Ctrl-C stops them")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass


_DRIFT_WINDOWS = "select count(*) from telemetry where kind = 'drift'"


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
