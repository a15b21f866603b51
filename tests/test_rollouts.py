"""Staged rollouts end to end (fleet/rollout.py): the fleet's own Mosquitto (mutual TLS with the
fleet CA), a real FleetServer running the rollout engine, real agents (with their device certificates)
installing signed bundles, and real inference traffic feeding the health gates. Covered: advancing
stage by stage within each stage's quota, rolling back on a failing error-rate gate and on install
failures, timing out a silent device, late joiners, operator pause / resume / abort, a fleet server
restarted mid-rollout, a release with bundles for two profiles, and the CLI (`edgeops push
--stages/--plan`, `edgeops rollout ...`).

Waiting is on conditions with deadlines (fleetkit.wait_for). Where a test shows that something does
NOT happen (no assignment while paused, none after an abort), it waits for the engine to run a few
more times: `Ticks` counts the engine rounds the fleet server ran (the real `rollout.tick`, counted).
The fleet server runs the engine every `ENGINE_S` (1 s); here every 0.25 s: the same decisions, sooner
(bakes and deadlines are wall-clock times, not rounds).

The v2 that fails its error-rate gate is the digits MLP trained on 4x4 thumbnails (16 inputs), built
as digits 2.0.0: apps sending 8x8 digits get InvalidInput from it, which the agent records as a failed
inference. Training it takes ~20 s, so it runs in a subprocess started when this module starts and is
collected by the test that needs it (placed late in the file).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from edgeops.agent.service import Agent
from edgeops.agent.serving import InvalidInput
from edgeops.fleet import registry, rollout, trust
from edgeops.fleet import server as fleet_server
from edgeops.fleet.home import FleetHome, enroll_device, init_fleet, push
from edgeops.fleet.plan import Plan, make_plan
from edgeops.fleet.server import FleetServer
from edgeops.protocol.bundle import bundle_filename, read_bundle
from edgeops.protocol.errors import EdgeopsError

sys.path.insert(0, str(Path(__file__).parent))
from fleetkit import AT_ONCE, PROFILES, fleet_home, releases, wait_for  # noqa: E402,F401  (fixtures)
from test_fleet_faults import AgentProcess  # noqa: E402
from test_slots import shift_probabilities, variant  # noqa: E402

PROFILE = "x86-vnni"
ENGINE_S = 0.25  # the fleet server runs the engine every second; four times as often here, same decisions sooner
ROLLOUT_S = 45  # deadline for a whole rollout to finish (they take 1-3 s per stage)


# --- the thumbnail model, trained in the background ------------------------------------------------

THUMBNAIL_JOB = """
import sys
from pathlib import Path
from edgeops.compiler.build import BuildRequest, build
from edgeops.examples import train_digits_mlp
out = Path(sys.argv[1])
model = train_digits_mlp(out / "model", thumbnail=True)
report = build(BuildRequest(model.onnx, "x86-vnni", model.calib, model.eval, name="digits", version="2.0.0",
                            outdir=out / "bundle"))
print(report["bundle"])
"""


@pytest.fixture(scope="module", autouse=True)
def thumbnail_job(tmp_path_factory):
    """Train and build the thumbnail digits 2.0.0 in a subprocess, while the first tests run."""
    out = tmp_path_factory.mktemp("thumbnail")
    log = open(out / "job.log", "w")
    proc = subprocess.Popen([sys.executable, "-c", THUMBNAIL_JOB, str(out)], stdout=subprocess.PIPE, stderr=log, text=True)
    yield SimpleNamespace(proc=proc, out=out)
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    log.close()


@pytest.fixture(scope="module")
def thumbnail_v2(thumbnail_job):
    """The thumbnail digits MLP built for x86-vnni as digits 2.0.0 (16 inputs where 1.0.0 takes 64)."""
    stdout, _ = thumbnail_job.proc.communicate(timeout=300)
    assert thumbnail_job.proc.returncode == 0, (thumbnail_job.out / "job.log").read_text()[-3000:]
    path = Path(stdout.strip().splitlines()[-1])
    manifest = read_bundle(path).manifest
    assert (manifest["name"], manifest["version"], manifest["profile"]) == ("digits", "2.0.0", PROFILE)
    assert [i["shape"][-1] for i in manifest["inputs"]] == [16]
    return path


@pytest.fixture(scope="module")
def digits(digits_model):
    """Real 8x8 digits, what apps send: (N, 64) float32."""
    with np.load(digits_model.eval) as data:
        pixels = data["pixels"].astype(np.float32)
    assert pixels.shape[1] == 64
    return pixels


# --- a fleet on a real broker --------------------------------------------------------------------------


class Ticks:
    """Counts the engine rounds (`rollout.tick`) the fleet servers in this process ran; the real tick runs."""

    def __init__(self, monkeypatch):
        self.count = 0
        real = rollout.tick

        def counted(db, now=None):
            real(db, now)
            self.count += 1

        monkeypatch.setattr(rollout, "tick", counted)

    def wait(self, rounds: int) -> None:
        """Until the engine ran `rounds` more times (each one a committed transaction)."""
        target = self.count + rounds
        wait_for(lambda: self.count >= target, f"{rounds} more engine rounds", 2 * rounds + 10)


class Frozen:
    """An agent process that connected and reported online, then was frozen (SIGSTOP): online for the
    broker and the fleet, silent on everything the fleet asks of it."""

    def __init__(self, fleet: "Fleet", device_id: str):
        self.agent = AgentProcess(fleet.tmp / device_id)

        def online() -> bool:
            assert self.agent.proc.poll() is None, f"the agent died:\n{self.agent.tail()}"
            return (registry.device(fleet.db, device_id) or {}).get("online")

        wait_for(online, f"{device_id} to report online")
        os.kill(self.agent.proc.pid, signal.SIGSTOP)

    def close(self) -> None:
        if self.agent.proc.poll() is None:
            os.kill(self.agent.proc.pid, signal.SIGCONT)
            self.agent.proc.kill()
            self.agent.proc.wait(10)


class Fleet:
    def __init__(self, tmp: Path, home: FleetHome):
        """Devices, servers and agents of the fleet `home`, whose broker runs."""
        self.tmp, self.home, self.url = tmp, home, home.broker_url
        self.db = registry.open_db(self.home.db_path)
        self.server: FleetServer | None = None
        self.agents: dict[str, Agent] = {}
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._frozen: list[Frozen] = []

    def enroll(self, *device_ids: str, profile: str = PROFILE) -> None:
        for device_id in device_ids:
            enroll_device(self.home, device_id, profile, {"site": "lab"}, self.tmp / device_id)

    def start_server(self) -> FleetServer:
        self.server = FleetServer(self.home, self.url).start()
        return self.server

    def stop_server(self) -> None:
        self.server.stop()
        self.server = None

    def run(self, *device_ids: str) -> list[Agent]:
        """Start in-process agents for these (enrolled) devices and wait until the fleet sees them online."""
        started = []
        for device_id in device_ids:
            agent = Agent(self.tmp / device_id)
            thread = threading.Thread(target=agent.run, args=(self._stop,), daemon=True, name=f"agent-{device_id}")
            thread.start()
            self.agents[device_id], started = agent, [*started, agent]
            self._threads.append(thread)
        self.wait_online(*device_ids)
        return started

    def freeze(self, device_id: str) -> Frozen:
        self._frozen.append(Frozen(self, device_id))
        return self._frozen[-1]

    def wait_online(self, *device_ids: str) -> None:
        wait_for(lambda: all((registry.device(self.db, d) or {}).get("online") for d in device_ids),
                 f"{', '.join(device_ids)} to report online")

    def push(self, bundles: list[Path], plan: Plan) -> int:
        return push(self.home, bundles, {}, plan=plan)

    # what the registry says

    def state(self, release: int) -> str:
        return self.db.execute("select state from rollouts where id = ?", [release]).fetchone()[0]

    def wait_state(self, release: int, *states: str, timeout: float = ROLLOUT_S) -> str:
        return wait_for(lambda: (s := self.state(release)) in states and s, f"rollout {release} to be {' or '.join(states)}",
                        timeout)

    def executions(self, release: int) -> dict[str, str]:
        return dict(self.db.execute("select device, state from executions where release_id = ?", [release]).fetchall())

    def decisions(self, release: int) -> list[dict]:
        return list(reversed(rollout.decisions(self.db, release)))

    def decided(self, release: int, action: str) -> list[dict]:
        """The decisions, oldest first, once one is `action`. (Waited for, as the engine's state change and
        the decision behind it can commit separately: see test_engine_rounds_and_operator_actions_are_one_transaction.)"""
        return wait_for(lambda: (found := self.decisions(release)) and action in [d["action"] for d in found] and found,
                        f"a {action} decision on rollout {release}", 10)

    def actions(self, release: int) -> list[tuple[str, str]]:
        return [(d["actor"], d["action"]) for d in self.decisions(release)]

    def row(self, release: int) -> dict:
        return dict(next(self.db.query("select * from rollouts where id = ?", [release])))

    def desired(self, device_id: str) -> int | None:
        return (registry.desired(self.db, device_id) or {}).get("release_id")

    def version(self, device_id: str) -> str | None:
        return (self.agents[device_id].installed() or {}).get("version")

    def wait_versions(self, version: str, *device_ids: str) -> None:
        wait_for(lambda: all(self.version(d) == version for d in device_ids), f"{', '.join(device_ids)} to run {version}")

    def close(self) -> None:
        self._stop.set()  # agents and the server stop side by side: each takes a second or so
        stopping = threading.Thread(target=self.server.stop) if self.server is not None else None
        if stopping is not None:
            stopping.start()
        for frozen in self._frozen:
            frozen.close()
        for thread in self._threads:
            thread.join(timeout=10)
        if stopping is not None:
            stopping.join(timeout=15)


@pytest.fixture
def fleet(fleet_home, tmp_path, monkeypatch):
    monkeypatch.setattr(fleet_server, "ENGINE_S", ENGINE_S)
    fleet = Fleet(tmp_path, fleet_home())  # its Mosquitto stops after the fleet closes (fleet_home's teardown)
    try:
        yield fleet
    finally:
        fleet.close()


@pytest.fixture
def ticks(monkeypatch):
    return Ticks(monkeypatch)


def quota_snapshot(fleet: Fleet, release: int) -> tuple[int, int]:
    """(stage, devices assigned) read in one statement, so both come from the same committed state."""
    return fleet.db.execute("select o.stage, (select count(*) from executions e where e.release_id = o.id "
                            "and e.state != 'cancelled') from rollouts o where o.id = ?", [release]).fetchone()


def assert_withdrawn(fleet: Fleet, release: int, target: str, keeps: str) -> None:
    """After a rollback the fleet server unsigns the rolled-back bundle (so devices accept their previous,
    older release again), and records that as the rollout's last decision."""
    decisions = fleet.decided(release, "withdraw")
    assert [(d["actor"], d["action"]) for d in decisions] == \
        [("operator", "start"), ("engine", "rollback"), ("engine", "withdraw")]
    assert decisions[-1]["reason"] == f"unsigned {target}: its devices may return to their previous release"
    listed = trust.listed_targets(fleet.home.repo)
    assert target not in listed and keeps in listed


def rolled_out_v1(fleet: Fleet, v1: Path, devices: list[str]) -> int:
    """1.0.0 on every device, at once, and the fleet knowing it."""
    release = fleet.push([v1], AT_ONCE)
    fleet.wait_state(release, "completed")
    fleet.wait_versions("1.0.0", *devices)
    wait_for(lambda: fleet.executions(release) == dict.fromkeys(devices, "active"), "1.0.0 active everywhere")
    return release


# --- stage by stage -----------------------------------------------------------------------------------


def test_a_rollout_advances_stage_by_stage_within_each_quota(fleet, slot_releases):
    devices = [f"d{i}" for i in range(5)]
    fleet.enroll(*devices)
    fleet.start_server()
    fleet.run(*devices)
    plan = make_plan(stages="1dev,50%,100%", bake="0.5s", min_calls=0)
    quotas = [stage.quota(len(devices)) for stage in plan.stages]
    assert quotas == [1, 3, 5]
    release = fleet.push([slot_releases.v1], plan)
    seen_stages = set()

    def within_quota() -> bool:
        installed = sum(fleet.version(d) == "1.0.0" for d in devices)  # read first: assignments only grow
        stage, assigned = quota_snapshot(fleet, release)
        seen_stages.add(stage)
        assert assigned <= quotas[stage], f"stage {plan.stages[stage].label} holds {assigned} devices"
        assert installed <= assigned, f"{installed} devices run 1.0.0, {assigned} were assigned"
        return fleet.state(release) == "completed"

    wait_for(within_quota, "the rollout to complete", ROLLOUT_S)
    assert seen_stages == {0, 1, 2}

    decisions = fleet.decided(release, "complete")
    assert [(d["actor"], d["action"]) for d in decisions] == \
        [("operator", "start"), ("engine", "advance"), ("engine", "advance"), ("engine", "complete")]
    assert decisions[0]["reason"].startswith("stages 1dev,50%,100%, bake 0.5s, min 0 calls")
    # when it advanced, each stage held exactly its quota, every device of it settled and healthy
    assert decisions[1]["reason"].startswith("stage 1dev -> 50%: install success 1/1 ok")
    assert decisions[2]["reason"].startswith("stage 50% -> 100%: install success 3/3 ok")
    assert decisions[3]["reason"].startswith("every targeted device reached: install success 5/5 ok")
    for before, after in zip(decisions, decisions[1:]):  # each stage baked before the next
        assert after["t"] - before["t"] >= plan.bake_s

    fleet.wait_versions("1.0.0", *devices)
    wait_for(lambda: fleet.executions(release) == dict.fromkeys(devices, "active"), "every device reported active")
    summary = rollout.summary(fleet.db, release)
    assert summary["state"] == "completed" and summary["stage"] == 2 and summary["targeted"] == 5
    assert [(s["label"], s["target"], s["done"]) for s in summary["stages"]] == \
        [("1dev", 1, True), ("50%", 3, True), ("100%", 5, True)]
    assert summary["counts"]["active"] == 5 and summary["next"].startswith("done")
    assert all(fleet.desired(d) == release for d in devices)
    assert {d["id"]: d["installed_version"] for d in registry.devices(fleet.db)} == dict.fromkeys(devices, "1.0.0")


# --- install failures abort per the plan --------------------------------------------------------------


@pytest.mark.parametrize("on_failure", ["rollback", "pause"])
def test_install_failures_past_the_abort_criteria_stop_the_rollout(fleet, slot_releases, ticks, tmp_path, on_failure):
    devices = ["d0", "d1"]
    fleet.enroll(*devices)
    fleet.start_server()
    fleet.run(*devices)
    v1 = rolled_out_v1(fleet, slot_releases.v1, devices)
    # a coherent, signed bundle whose self-test fails on every device: pushed (and so re-signed) after the edit
    model = read_bundle(slot_releases.v1).manifest["name"]
    bad = variant(slot_releases.v1, tmp_path / bundle_filename(model, "1.2.0", PROFILE),
                  edit_arrays=shift_probabilities(0.5), edit_manifest=lambda m: m.update(version="1.2.0"))
    release = fleet.push([bad], make_plan(stages="1dev,100%", bake="0.5s", min_calls=0, abort="failed>0%,min=1",
                                          on_failure=on_failure))

    fleet.wait_state(release, "rolled-back" if on_failure == "rollback" else "paused")
    decision = next(d for d in fleet.decided(release, on_failure) if d["action"] == on_failure)
    assert decision["actor"] == "engine"
    executions = fleet.executions(release)
    assert list(executions.values()) == ["failed"], executions  # the canary only: the second stage never came
    canary = next(iter(executions))
    reason = fleet.db.execute("select reason from executions where release_id = ?", [release]).fetchone()[0]
    assert "self-test" in reason, reason
    assert decision["reason"].startswith("health gate failed: install success 0/1 ok, limit failed <= 0% (after 1 settle)")
    assert fleet.row(release)["stage"] == 0

    if on_failure == "rollback":  # the canary is named its previous release again; it never left it
        assert "return" not in decision["reason"]  # it never switched, so no device goes back
        wait_for(lambda: fleet.desired(canary) == v1, "the canary to be sent back to 1.0.0")
        assert_withdrawn(fleet, release, bad.name, keeps=slot_releases.v1.name)
    else:  # paused: nothing more happens until an operator acts
        ticks.wait(3)
        assert fleet.actions(release) == [("operator", "start"), ("engine", "pause")]
        assert fleet.state(release) == "paused" and fleet.executions(release) == executions
        assert fleet.desired(canary) == release
        assert bad.name in trust.listed_targets(fleet.home.repo)  # paused, not rolled back: still signed
    other = next(d for d in devices if d != canary)
    assert fleet.desired(other) == v1
    assert all(fleet.version(d) == "1.0.0" for d in devices)  # a failed install leaves the old model serving
    assert fleet.agents[canary].infer({"pixels": np.zeros((1, 64), np.float32)})["label"].shape == (1,)


# --- a silent device times out ------------------------------------------------------------------------


def test_a_silent_device_times_out_and_counts_as_a_failure(fleet, slot_releases, ticks):
    fleet.enroll("a-frozen", "b-good")
    fleet.start_server()
    fleet.freeze("a-frozen")  # online for the fleet, but it will never report on the release
    fleet.run("b-good")
    # a 2 s deadline on the state a-frozen is stuck in (b-good's install steps keep the default ones, so a
    # slow machine cannot time it out too)
    release = fleet.push([slot_releases.v1], make_plan(stages="100%", bake="0.5s", min_calls=0, deadlines={"queued": "2s"},
                                                      abort="failed>0%,min=1", on_failure="pause"))
    started = fleet.decisions(release)[0]["t"]

    fleet.wait_state(release, "paused", timeout=30)
    decisions = fleet.decided(release, "pause")
    executions = fleet.executions(release)
    assert executions["a-frozen"] == "timed-out", executions
    reason = fleet.db.execute("select reason from executions where device = 'a-frozen'").fetchone()[0]
    assert reason == "no report for 2s while queued"
    assert [(d["actor"], d["action"]) for d in decisions] == \
        [("operator", "start"), ("engine", "timeout"), ("engine", "pause")]
    timeout, pause = decisions[1], decisions[2]
    assert timeout["reason"] == "1 device(s) silent past their deadline: a-frozen (queued)"
    assert timeout["t"] - started >= 2  # not before its deadline
    assert pause["reason"].startswith("health gate failed: install success ") and "limit failed <= 0%" in pause["reason"]
    fleet.wait_versions("1.0.0", "b-good")  # the healthy device installed regardless
    wait_for(lambda: fleet.executions(release)["b-good"] == "active", "b-good to report active")
    ticks.wait(3)  # the time-out is decided once, not on every round
    assert [d["action"] for d in fleet.decisions(release)] == ["start", "timeout", "pause"]
    summary = rollout.summary(fleet.db, release)
    assert summary["counts"]["timed-out"] == 1 and summary["counts"]["active"] == 1
    attention = registry.status(fleet.db)["attention"]
    assert {"device": "a-frozen", "rollout": release, "reason": "timed-out: no report for 2s while queued"} in attention


# --- late joiners -------------------------------------------------------------------------------------


def test_late_devices_join_at_the_current_stage(fleet, slot_releases, ticks):
    fleet.enroll("d0", "d1")
    fleet.start_server()
    fleet.run("d0", "d1")
    plan = make_plan(stages="1dev,100%", bake="0.5s", min_calls=0)
    v1 = fleet.push([slot_releases.v1], plan)
    fleet.wait_state(v1, "completed")

    # after the rollout completed: a new device gets its release
    fleet.enroll("late-1")
    fleet.run("late-1")
    fleet.wait_versions("1.0.0", "d0", "d1", "late-1")
    wait_for(lambda: fleet.executions(v1).get("late-1") == "active", "late-1 to report 1.0.0 active")
    assert fleet.state(v1) == "completed" and rollout.summary(fleet.db, v1)["targeted"] == 3
    assert [d["action"] for d in fleet.decided(v1, "complete")] == ["start", "advance", "complete"]

    # during a rollout whose first stage is full: it waits (on the last completed release) for the next stage
    v2 = fleet.push([slot_releases.v2], plan)
    canary = wait_for(lambda: next(iter(fleet.executions(v2)), None), "the v2 canary to be assigned")
    rollout.act(fleet.db, v2, "pause", "hold the first stage while late-2 joins")
    assert fleet.row(v2)["stage"] == 0, "the rollout advanced before the pause"
    fleet.enroll("late-2")
    fleet.run("late-2")
    wait_for(lambda: fleet.executions(v1).get("late-2") == "active", "late-2 to get the completed 1.0.0")
    ticks.wait(3)
    assert list(fleet.executions(v2)) == [canary] and fleet.row(v2)["stage"] == 0
    rollout.act(fleet.db, v2, "resume")
    fleet.wait_state(v2, "completed")
    everyone = ["d0", "d1", "late-1", "late-2"]
    assert fleet.executions(v2).keys() == set(everyone)
    assert fleet.decided(v2, "complete")[-1]["reason"].startswith("every targeted device reached: install success 4/4 ok")
    fleet.wait_versions("1.1.0", *everyone)


# --- operators: pause, resume, abort ------------------------------------------------------------------


def test_pause_holds_assignments_and_resume_completes(fleet, slot_releases, ticks):
    devices = ["d0", "d1", "d2"]
    fleet.enroll(*devices)
    fleet.start_server()
    fleet.run(*devices)
    release = fleet.push([slot_releases.v1], make_plan(stages="1dev,50%,100%", bake="0.5s", min_calls=0))
    # paused as soon as the canary is assigned: it has yet to install, settle and bake before any advance
    canary = wait_for(lambda: next(iter(fleet.executions(release)), None), "the canary to be assigned")
    paused = rollout.act(fleet.db, release, "pause", "support ticket 1234")
    assert paused["state"] == "paused" and paused["next"] == f"paused: `edgeops rollout resume {release}` continues it"
    assert fleet.row(release)["stage"] == 0, "the rollout advanced before the pause"

    wait_for(lambda: fleet.executions(release) == {canary: "active"}, "the canary to install and report")
    active_at, rounds = time.time(), ticks.count
    # well past the 0.5 s bake, over several engine rounds: a running rollout would have advanced by now
    wait_for(lambda: time.time() - active_at > 3 * 0.5 and ticks.count >= rounds + 4, "time to pass while paused")
    assert fleet.state(release) == "paused" and fleet.row(release)["stage"] == 0
    assert fleet.executions(release) == {canary: "active"}
    assert [fleet.version(d) for d in devices if d != canary] == [None, None]

    resumed = rollout.act(fleet.db, release, "resume")
    assert resumed["state"] == "running"
    fleet.wait_state(release, "completed")
    fleet.decided(release, "complete")
    assert fleet.actions(release) == [("operator", "start"), ("operator", "pause"), ("operator", "resume"),
                                      ("engine", "advance"), ("engine", "advance"), ("engine", "complete")]
    assert fleet.decisions(release)[1]["reason"] == "support ticket 1234"
    assert fleet.decisions(release)[2]["reason"] == "requested by the operator"
    fleet.wait_versions("1.0.0", *devices)


def test_abort_cancels_queued_devices_and_assigns_no_more(fleet, slot_releases, ticks):
    fleet.enroll("a-frozen", "b", "c")
    fleet.start_server()
    fleet.freeze("a-frozen")
    fleet.run("b", "c")
    release = fleet.push([slot_releases.v1], make_plan(stages="2dev,100%", bake="0.5s", min_calls=0))
    # the first stage: a-frozen (queued for good) and b (installs)
    wait_for(lambda: fleet.executions(release) == {"a-frozen": "queued", "b": "active"}, "the first stage to hold a-frozen and b")

    aborted = rollout.act(fleet.db, release, "abort", "bad batch")
    assert aborted["state"] == "aborted" and aborted["next"] == "aborted"
    assert fleet.executions(release) == {"a-frozen": "cancelled", "b": "active"}
    assert fleet.desired("a-frozen") is None  # it had nothing before: no release named any more
    assert fleet.desired("b") == release  # devices that have it keep it
    ticks.wait(3)
    assert fleet.executions(release) == {"a-frozen": "cancelled", "b": "active"}  # c was never assigned
    assert fleet.desired("c") is None and fleet.version("c") is None
    assert fleet.actions(release) == [("operator", "start"), ("operator", "abort")]
    assert fleet.decisions(release)[-1]["reason"].startswith("bad batch")
    assert fleet.version("b") == "1.0.0"

    for action in ("pause", "resume", "abort"):  # an ended rollout takes no more of these
        with pytest.raises(EdgeopsError) as refused:
            rollout.act(fleet.db, release, action)
        assert "\n" not in str(refused.value)
        assert str(refused.value).startswith(f"rollout {release} is aborted; {action} applies to ")
    assert len(fleet.decisions(release)) == 2


def test_operator_actions_the_state_does_not_allow_are_refused(slot_releases, tmp_path):
    home = init_fleet(tmp_path / "fleet", "mqtts://127.0.0.1:1")  # no broker, no server: actions are registry writes
    db = registry.open_db(home.db_path)
    release = push(home, [slot_releases.v1], {}, plan=make_plan(stages="1dev,100%"))

    def refused(action: str, rollout_id: int = release) -> str:
        before = len(rollout.decisions(db, rollout_id)) if rollout_id == release else 0
        with pytest.raises(EdgeopsError) as caught:
            rollout.act(db, rollout_id, action)
        message = str(caught.value)
        assert message and "\n" not in message
        if rollout_id == release:
            assert len(rollout.decisions(db, release)) == before  # nothing recorded for a refused action
        return message

    assert refused("resume") == f"rollout {release} is running; resume applies to paused rollouts"
    assert rollout.act(db, release, "pause")["state"] == "paused"
    assert refused("pause") == f"rollout {release} is paused; pause applies to running rollouts"
    assert refused("restart") == "unknown action 'restart'; one of pause, resume, abort, rollback"
    assert refused("pause", 999) == "no rollout 999; `edgeops status` lists them"
    assert rollout.act(db, release, "rollback")["state"] == "rolled-back"
    again = rollout.act(db, release, "rollback")  # done already: nothing to do, nothing recorded
    assert again["state"] == "rolled-back" and len(again["decisions"]) == 3
    assert refused("resume").startswith(f"rollout {release} is rolled-back; resume applies to paused")
    assert refused("abort") == f"rollout {release} is rolled-back; abort applies to running or paused rollouts"
    assert [d["action"] for d in reversed(rollout.decisions(db, release))] == ["start", "pause", "rollback"]


# --- a fleet server restart ---------------------------------------------------------------------------


def test_a_restarted_fleet_server_continues_the_rollout(fleet, slot_releases):
    devices = ["d0", "d1", "d2", "d3"]
    fleet.enroll(*devices)
    fleet.start_server()
    fleet.run(*devices)
    plan = make_plan(stages="1dev,50%,100%", bake="2s", min_calls=0)
    release = fleet.push([slot_releases.v1], plan)

    # stop it while the second stage bakes
    wait_for(lambda: (row := fleet.row(release))["stage"] == 1 and row["stage_settled_at"] is not None,
             "the second stage to bake", ROLLOUT_S)
    stopping_at = time.time()  # from here the server runs no new engine round
    fleet.stop_server()
    stopped = fleet.row(release)
    assert stopping_at - stopped["stage_settled_at"] < plan.bake_s, "stopped after the bake; make it longer"
    assert stopped["stage"] == 1 and stopped["state"] == "running", "the stage ended before the server stopped"
    assert [d["action"] for d in fleet.decisions(release)] == ["start", "advance"]

    fleet.start_server()  # a new server on the same fleet directory
    fleet.wait_state(release, "completed")
    decisions = fleet.decided(release, "complete")
    assert [(d["actor"], d["action"]) for d in decisions] == \
        [("operator", "start"), ("engine", "advance"), ("engine", "advance"), ("engine", "complete")]
    assert decisions[2]["reason"].startswith("stage 50% -> 100%: install success 2/2 ok")
    assert decisions[2]["t"] - stopped["stage_settled_at"] >= plan.bake_s  # the bake begun before the restart counted
    fleet.wait_versions("1.0.0", *devices)
    wait_for(lambda: fleet.executions(release) == dict.fromkeys(devices, "active"), "every device reported active")
    assert fleet.db.execute("select count(*) from executions").fetchone()[0] == len(devices)


# --- one release, two profiles ------------------------------------------------------------------------


def test_each_device_installs_the_bundle_of_its_profile(fleet, releases):
    profiles = {"x-1": "x86-vnni", "x-2": "x86-vnni", "r-1": "rpi4", "r-2": "rpi4"}
    for device_id, profile in profiles.items():
        fleet.enroll(device_id, profile=profile)
    fleet.start_server()
    fleet.run(*profiles)
    release = fleet.push([releases[("1.0.0", p)] for p in PROFILES], make_plan(stages="2dev,100%", bake="0.5s", min_calls=0))
    first_stage: set[str] = set()

    def progress() -> bool:
        rows = fleet.db.execute("select o.stage, e.device from rollouts o left join executions e "
                                "on e.release_id = o.id where o.id = ?", [release]).fetchall()
        first_stage.update(device for stage, device in rows if stage == 0 and device is not None)
        return fleet.state(release) == "completed"

    wait_for(progress, "the rollout to complete", ROLLOUT_S)
    assert len(first_stage) == 2 and {profiles[d] for d in first_stage} == set(PROFILES), first_stage
    fleet.wait_versions("1.0.0", *profiles)
    for device_id, agent in fleet.agents.items():
        assert agent.installed()["target"] == releases[("1.0.0", profiles[device_id])].name
        assert read_bundle(agent.slots.active().path).manifest["profile"] == profiles[device_id]
    summary = rollout.summary(fleet.db, release)
    assert summary["profiles"] == sorted(PROFILES) and summary["targeted"] == 4


# --- the error-rate gate rolls a bad model back -------------------------------------------------------


def test_a_failing_error_rate_gate_rolls_the_canary_back(fleet, releases, thumbnail_v2, digits):
    devices = ["d0", "d1", "d2"]
    fleet.enroll(*devices)
    fleet.start_server()
    fleet.run(*devices)
    v1 = rolled_out_v1(fleet, releases[("1.0.0", PROFILE)], devices)  # digits 1.0.0, the 8x8 model
    calls = {"ok": 0, "invalid": 0}
    versions_seen = {d: set() for d in devices}

    def traffic() -> None:
        """One real 8x8 digit per device, as apps send them."""
        for i, device_id in enumerate(devices):
            sample = digits[(calls["ok"] + calls["invalid"] + i) % len(digits)][None]
            versions_seen[device_id].add(fleet.version(device_id))
            try:
                fleet.agents[device_id].infer({"pixels": sample})
                calls["ok"] += 1
            except InvalidInput:
                calls["invalid"] += 1

    for _ in range(5):  # the previous version's baseline, on the same devices
        traffic()
    release = fleet.push([thumbnail_v2], make_plan(stages="1dev,100%", bake="0.5s", min_calls=5))

    def rolled_back() -> bool:
        traffic()
        return fleet.state(release) == "rolled-back"

    wait_for(rolled_back, "the engine to roll 2.0.0 back", ROLLOUT_S)
    executions = fleet.executions(release)
    assert list(executions.values()) == ["rolled-back"], executions  # the canary, and no one else
    canary = next(iter(executions))
    assert calls["invalid"] >= 5  # the canary ran 2.0.0, and apps got InvalidInput from it

    decisions = fleet.decided(release, "rollback")
    assert [(d["actor"], d["action"]) for d in decisions][:2] == [("operator", "start"), ("engine", "rollback")]
    reason = decisions[1]["reason"]
    assert reason.startswith("health gate failed: error rate 100.0%, limit <= 1.0% (previous 0.0%)"), reason
    assert reason.endswith("; 1 device(s) return to their previous release")
    row = fleet.row(release)
    assert row["stage"] == 0  # it never advanced past the first stage

    assert fleet.desired(canary) == v1
    assert_withdrawn(fleet, release, thumbnail_v2.name, keeps=releases[("1.0.0", PROFILE)].name)
    fleet.wait_versions("1.0.0", canary)
    serving = fleet.agents[canary].serving  # it switches what it serves right after the install
    wait_for(lambda: serving.served.version == "1.0.0", "the canary to serve 1.0.0 again")
    assert fleet.agents[canary].infer({"pixels": digits[:3]})["label"].shape == (3,)
    for device_id in devices:
        if device_id != canary:
            assert versions_seen[device_id] == {"1.0.0"}, versions_seen  # never assigned, never changed
            assert fleet.desired(device_id) == v1
    wait_for(lambda: fleet.executions(v1)[canary] == "active", "the canary to report 1.0.0 active again")
    assert fleet.executions(v1) == dict.fromkeys(devices, "active")


# --- the CLI ------------------------------------------------------------------------------------------


def test_cli_push_with_a_plan_and_steer_the_rollout(slot_releases, tmp_path, cli_ok, cli_error):
    home = init_fleet(tmp_path / "fleet", "mqtts://127.0.0.1:1")
    fleet_dir = str(home.path)
    model = read_bundle(slot_releases.v1).manifest["name"]
    db = registry.open_db(home.db_path)

    pushed = json.loads(cli_ok("push", slot_releases.v1, "--fleet", fleet_dir, "--stages", "1dev,100%", "--bake", "1s",
                               "--min-calls", "0", "--json").stdout)
    first = pushed["rollout"]
    assert pushed["release"] == first
    assert pushed["plan"] == make_plan(stages="1dev,100%", bake="1s", min_calls=0).to_dict()
    assert rollout.summary(db, first)["plan"] == pushed["plan"]
    assert rollout.summary(db, first)["state"] == "running"
    assert cli_error("rollout", "resume", first, "--fleet", fleet_dir) == \
        f"Error: rollout {first} is running; resume applies to paused rollouts"

    plan_file = tmp_path / "rollout.toml"
    plan_file.write_text('[rollout]\nstages = "1dev,50%,100%"\nbake = "2m"\nabort = "failed>10%,min=2"\n'
                         'on_failure = "pause"\n\n[rollout.deadlines]\ndownloading = "1h"\n')
    pushed = json.loads(cli_ok("push", slot_releases.v2, "--fleet", fleet_dir, "--plan", plan_file, "--min-calls", "7",
                               "--json").stdout)
    second = pushed["rollout"]
    expected = make_plan(stages="1dev,50%,100%", bake="2m", abort="failed>10%,min=2", on_failure="pause",
                         deadlines={"downloading": "1h"}, min_calls=7)  # the option overrides the file
    assert pushed["plan"] == expected.to_dict()
    assert rollout.summary(db, first)["state"] == "superseded"  # one open rollout per model

    shown = json.loads(cli_ok("rollout", "show", second, "--fleet", fleet_dir, "--json").stdout)
    assert (shown["id"], shown["version"], shown["state"], shown["plan"]) == (second, "1.1.0", "running", expected.to_dict())
    assert [d["action"] for d in shown["decisions"]] == ["start"]
    assert "1dev" in cli_ok("rollout", "show", second, "--fleet", fleet_dir).stdout

    paused = json.loads(cli_ok("rollout", "pause", second, "--fleet", fleet_dir, "--reason", "ticket 7", "--json").stdout)
    assert paused["state"] == "paused" and paused["decisions"][0]["reason"] == "ticket 7"
    assert cli_error("rollout", "pause", second, "--fleet", fleet_dir) == \
        f"Error: rollout {second} is paused; pause applies to running rollouts"
    assert cli_ok("rollout", "resume", second, "--fleet", fleet_dir).stdout.startswith(
        f"rollout {second} ({model} 1.1.0) is running: ")
    assert cli_ok("rollout", "abort", second, "--fleet", fleet_dir).stdout.startswith(
        f"rollout {second} ({model} 1.1.0) is aborted")
    shown = json.loads(cli_ok("rollout", "show", second, "--fleet", fleet_dir, "--json").stdout)
    assert [(d["actor"], d["action"]) for d in reversed(shown["decisions"])] == \
        [("operator", "start"), ("operator", "pause"), ("operator", "resume"), ("operator", "abort")]

    # bad input: one clear line, and nothing pushed
    releases_before = len(registry.releases(db))
    bad_plan = tmp_path / "bad.toml"
    bad_plan.write_text('[rollout]\nstages = "1dev,100%"\nretries = 3\n')
    push_args = ["push", slot_releases.v2, "--fleet", fleet_dir]
    assert cli_error(*push_args, "--stages", "50%,10%") == \
        "Error: the last stage must be 100% (every targeted device), not 10%"
    assert cli_error(*push_args, "--stages", "50%,10%,100%") == "Error: stages must grow: 10% after 50%"
    assert cli_error(*push_args, "--abort", "nonsense") == \
        "Error: abort criteria 'nonsense' must look like failed>5%,min=5"
    assert cli_error(*push_args, "--bake", "soon") == "Error: bake 'soon' is not a duration; write e.g. 30s, 10m, 2h"
    assert cli_error(*push_args, "--plan", bad_plan) == \
        f"Error: plan {bad_plan}: unknown key(s) retries; known: stages, bake, min_calls, abort, on_failure, deadline, gates, deadlines"
    assert cli_error(*push_args, "--plan", tmp_path / "missing.toml").startswith(
        f"Error: cannot read plan {tmp_path / 'missing.toml'}")
    assert len(registry.releases(db)) == releases_before
    assert cli_error("rollout", "show", "999", "--fleet", fleet_dir) == "Error: no rollout 999; `edgeops status` lists them"
    assert cli_error("rollout", "resume", "999", "--fleet", fleet_dir) == "Error: no rollout 999; `edgeops status` lists them"


# --- the engine's transactions -----------------------------------------------------------------------

def test_engine_rounds_and_operator_actions_are_one_transaction(slot_releases, tmp_path):
    home = init_fleet(tmp_path / "fleet", "mqtts://127.0.0.1:1")
    db = registry.open_db(home.db_path)
    enroll_device(home, "d0", PROFILE, {}, tmp_path / "d0")
    registry.record_reports(db, [("d0", {"online": True})])  # what the fleet server stores when d0 comes online
    release = push(home, [slot_releases.v1], {}, plan=make_plan(stages="100%", bake=0, min_calls=0))
    statements: list[str] = []
    db.conn.set_trace_callback(statements.append)

    rollout.tick(db)  # assigns d0: an execution row and its desired release
    assert fleet_desired(db, "d0") == release and rollout.summary(db, release)["counts"]["queued"] == 1
    assert [s.strip().upper() for s in statements].count("COMMIT") == 1, statements
    statements.clear()
    rollout.act(db, release, "pause", "one transaction")  # the state and the decision together
    assert [s.strip().upper() for s in statements].count("COMMIT") == 1, statements


def fleet_desired(db, device_id: str) -> int | None:
    return (registry.desired(db, device_id) or {}).get("release_id")


def test_a_device_rolled_back_with_nothing_to_return_to_is_not_sent_to_an_older_release(slot_releases, tmp_path):
    """B joined at 1.1.0 and never ran 1.0.0: rolling 1.1.0 back leaves it on 1.1.0 (it keeps serving),
    rather than naming 1.0.0, an older version it would have to refuse."""
    home = init_fleet(tmp_path / "fleet", "mqtts://127.0.0.1:1")
    db = registry.open_db(home.db_path)
    for device_id in ("A", "B"):
        enroll_device(home, device_id, PROFILE, {}, tmp_path / device_id)

    def report(device_id, release=None, state=None, online=True, version=None):
        registry.record_reports(db, [(device_id, {
            "online": online, "installed": {"model": "digits", "version": version} if version else None,
            "execution": {"release": release, "state": state} if release else None})])

    report("A")
    report("B", online=False)
    at_once = make_plan(stages="100%", bake=0, min_calls=0)
    r1 = push(home, [slot_releases.v1], {}, plan=at_once)
    rollout.tick(db)
    report("A", r1, "active", version="1.0.0")
    r2 = push(home, [slot_releases.v2], {}, plan=at_once)
    report("B")  # B comes online now: 1.1.0 is the only release it gets
    rollout.tick(db)
    report("A", r2, "active", version="1.1.0")
    report("B", r2, "active", version="1.1.0")
    rollout.tick(db)
    decision = rollout.act(db, r2, "rollback", "bad")["decisions"][0]
    assert "1 device(s) return to their previous release" in decision["reason"]
    assert "1 device(s) have no earlier release and keep 1.1.0" in decision["reason"]
    for _ in range(3):
        rollout.tick(db)
    assert (fleet_desired(db, "A"), fleet_desired(db, "B")) == (r1, None)
    assert "B" not in dict(db.execute("select device, state from executions where release_id = ?", [r1]).fetchall())
