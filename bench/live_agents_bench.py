"""Live-connection benchmark: 1,000 simulated agents connected at once through Mosquitto, and a staged
rollout across all of them; reports time per stage and the fleet server's memory and CPU.

    python bench/live_agents_bench.py [--agents 1000] [--procs 4] [--stages 1dev,10%,50%,100%] [--bake 5s]
                                      [--bundle PATH] [--telemetry-s 5] [--json out.json]

Real parts: a fleet directory with `--agents` enrolled devices, Mosquitto started from the files
`edgeops fleet mosquitto-config` writes (each device connects with its own certificate from the
fleet CA, confined by the ACL), `edgeops fleet serve` as a process, and `edgeops push --stages ... --bake ...` of a
real signed bundle (the digits MLP built for x86-vnni, or `--bundle`).

Each simulated agent is a paho client (many per process, `--procs` processes) speaking the
protocol (docs/protocol.md): persistent session, last will on its retained `state`, a retained
state report on connecting and at every execution step, the retained `desired` release, telemetry
batches (one inference record every `--telemetry-s`, acknowledged by the fleet, so the health
gates see real calls), and the bundle fetched for real from its target stream (subscribe, `want`
bitmap, blocks, re-request after 2 s of silence), its length and sha256 checked against `desired`.
What is simulated, and said so: the TUF metadata chain is not walked, and installing,
self-test and the A/B switch are reported at once after the download checked out (no onnxruntime).

Prints the time of each stage (from the push, or the previous stage's advance, to the engine's
next decision), whether every agent converged (active in the registry, reporting the new version),
and, from /proc, the fleet server's and the broker's peak RSS and CPU seconds over the rollout.
"""

from __future__ import annotations

import argparse
import atexit
import hashlib
import json
import multiprocessing as mp
import os
import resource
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fanout_bench import Workers, _split, _wait, build_bundle, cpu_seconds  # noqa: E402
from ingest_bench import FleetProcess, enroll_many, start_mosquitto  # noqa: E402

STREAM_QUIET_S = 2.0
MAX_PER_PROCESS = 300  # each paho client holds ~3 descriptors (socket, wake-up pair), all below 1024
PROFILE = "x86-vnni"


def raise_fd_limit() -> int:
    """Soft limit of open files up to the hard one (each connection is a descriptor here and in the broker)."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


# ---- simulated agents (run in child processes; spawn context, so everything here must be importable) ----


class SimAgent:
    """One device's side of the protocol, event-driven on paho's thread; `tick()` from a timer thread."""

    def __init__(self, device_id: str, tls, url: str, telemetry_s: float):
        from edgeops.protocol import mqtt as mqttlib
        from edgeops.protocol import wire

        self.id, self.telemetry_s = device_id, telemetry_s
        self.installed: dict | None = None
        self.installed_release: int | None = None
        self.execution: dict | None = None
        self.download: dict | None = None  # the release being fetched: desired fields, blocks, last block time
        self.seq, self.next_telemetry = 0, time.monotonic() + telemetry_s * (hash(device_id) % 100) / 100
        self.lock = threading.Lock()
        self.ready = threading.Event()
        self.client = mqttlib.client(f"edgeops-agent-{device_id}", url, tls,
                                     will=(wire.topic(device_id, "state"), wire.encode({"device": device_id, "online": False})))
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        self.client.loop_start()

    def _topic(self, leaf: str) -> str:
        from edgeops.protocol import wire

        return wire.topic(self.id, leaf)

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            return
        client.subscribe([(self._topic(leaf), 1) for leaf in ("desired", "blocks", "acks")])
        with self.lock:
            self._report()
            if self.download is not None:  # a new connection: ask again for what is missing
                self._subscribe_stream()

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        with self.lock:
            if self.download is not None and self.download.get("suback") == mid:
                self._request()
            else:
                self.ready.set()

    def _report(self) -> None:
        from edgeops.protocol import wire

        self.client.publish(self._topic("state"), wire.encode({
            "device": self.id, "online": True, "profile": PROFILE, "installed": self.installed,
            "execution": self.execution}), qos=1, retain=True)

    def _step(self, state: str, reason: str = "") -> None:
        self.execution = {"release": self.download["release_id"], "state": state, "reason": reason}
        self._report()

    def _on_message(self, client, userdata, message) -> None:
        from edgeops.protocol import wire

        try:
            if message.topic.startswith(wire.STREAMS):
                self._on_block(*wire.parse_stream_block(message.payload))
            elif message.topic.endswith("/desired"):
                self._on_desired(wire.decode(message.payload, {}))
        except wire.WireError:
            pass

    def _on_desired(self, desired: dict) -> None:
        with self.lock:
            release = desired.get("release_id")
            if release is None or self.installed_release == release \
                    or (self.download or {}).get("release_id") == release:
                return
            self.download = {**desired, "blocks": {}, "last": time.monotonic(),
                             "path": f"targets/{desired['sha256']}.{desired['target']}"}
            self._step("downloading")
            self._subscribe_stream()

    def _subscribe_stream(self) -> None:
        from edgeops.protocol import wire

        _, mid = self.client.subscribe(wire.stream_topic(self.download["path"]), 1)
        self.download["suback"] = mid

    def _request(self) -> None:
        from edgeops.protocol import wire

        d = self.download
        count = -(-d["length"] // wire.MAX_BLOCK)
        missing = [i for i in range(count) if i not in d["blocks"]]
        self.client.publish(self._topic("fetch"), wire.stream_request(int(time.time() * 1000) % 2**31, d["path"], missing), qos=1)
        d["last"] = time.monotonic()

    def _on_block(self, header: dict, data: bytes) -> None:
        from edgeops.protocol import wire

        with self.lock:
            d = self.download
            if d is None or header["path"] != d["path"] or header["total"] != d["length"]:
                return
            d["blocks"][header["offset"] // wire.MAX_BLOCK] = data
            d["last"] = time.monotonic()
            if sum(map(len, d["blocks"].values())) < d["length"]:
                return
            body = b"".join(d["blocks"][i] for i in sorted(d["blocks"]))
            self.client.unsubscribe(wire.stream_topic(d["path"]))
            if len(body) != d["length"] or hashlib.sha256(body).hexdigest() != d["sha256"]:
                self._step("rejected", "hash-mismatch: the streamed bundle does not match the desired sha256")
            else:
                for state in ("verifying", "installing", "self-test"):  # simulated: reported, not performed
                    self._step(state)
                self.installed = {"model": d["model"], "version": d["version"], "target": d["target"],
                                  "slot": "b" if (self.installed or {}).get("slot") == "a" else "a"}
                self.installed_release = d["release_id"]
                self._step("active")
            self.download = None

    def tick(self, now: float) -> None:
        """Re-request a stalled download; send a telemetry record when due."""
        from edgeops.protocol import wire

        with self.lock:
            if self.download is not None and now - self.download["last"] > STREAM_QUIET_S:
                self._request()
            if now < self.next_telemetry or not self.installed:
                return
            self.next_telemetry = now + self.telemetry_s
            self.seq += 1
            body = json.dumps({"model": self.installed["model"], "version": self.installed["version"],
                               "latency_ms": 0.4 + (self.seq % 7) / 10, "ok": True}, separators=(",", ":"))
            self.client.publish(self._topic("telemetry"), wire.telemetry_batch(self.id, [(self.seq, "inference", time.time(), body)], 0), qos=1)


def _agent_worker(url: str, creds: list[tuple], telemetry_s: float, ready: mp.Queue, stop) -> None:
    import logging

    logging.basicConfig(level=logging.ERROR)
    raise_fd_limit()
    agents = []
    for device_id, tls in creds:
        agents.append(SimAgent(device_id, tls, url, telemetry_s))
        time.sleep(0.002)  # a gentle ramp: 1,000 CONNECTs in the same millisecond is a reconnect storm, not a fleet
    deadline = time.monotonic() + 120
    for agent in agents:
        agent.ready.wait(max(0.0, deadline - time.monotonic()))
    ready.put(sum(a.ready.is_set() for a in agents))
    while not stop.wait(0.5):
        now = time.monotonic()
        for agent in agents:
            agent.tick(now)
    for agent in agents:  # all at once: each loop thread may otherwise take a second to notice
        agent.client.disconnect()
    for agent in agents:
        agent.client.loop_stop()


# ---- the fleet ----


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    return int(Path(f"/proc/{pid}/status").read_text().split(f"{field}:")[1].split()[0]) / 1024


class Sampler:
    """Peak RSS of some processes, sampled every 0.2 s on a thread until `stop()`."""

    def __init__(self, pids: dict[str, int]):
        self.pids, self.peak = pids, dict.fromkeys(pids, 0.0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            for name, pid in self.pids.items():
                self.peak[name] = max(self.peak[name], rss_mb(pid))

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        return self.peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--agents", type=int, default=1000)
    ap.add_argument("--procs", type=int, default=4, help=f"processes the simulated agents are spread over (<= {MAX_PER_PROCESS} each)")
    ap.add_argument("--stages", default="1dev,10%,50%,100%")
    ap.add_argument("--bake", default="5s")
    ap.add_argument("--telemetry-s", type=float, default=5.0, help="seconds between an agent's inference records")
    ap.add_argument("--bundle", type=Path, help=f"an existing {PROFILE} .edgeops bundle instead of building the digits MLP")
    ap.add_argument("--timeout", type=float, default=600, help="seconds allowed for the rollout")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.agents > MAX_PER_PROCESS * args.procs:
        ap.error(f"at most {MAX_PER_PROCESS} agents per process (paho waits with select(), which takes no "
                 f"descriptor above 1023): use --procs {-(-args.agents // MAX_PER_PROCESS)}")

    from edgeops.fleet import rollout
    from edgeops.fleet.broker import free_port
    from edgeops.fleet.home import init_fleet

    fds = raise_fd_limit()  # inherited by Mosquitto and the agents' processes
    work = Path(tempfile.mkdtemp(prefix="edgeops-live-"))
    atexit.register(shutil.rmtree, work, True)
    bundle = args.bundle or build_bundle("mlp", work)
    home = init_fleet(work / "fleet", f"mqtts://127.0.0.1:{free_port()}")
    t = time.monotonic()
    creds = enroll_many(home, args.agents, {"bench": "live"})
    enroll_s = time.monotonic() - t
    broker = start_mosquitto(home, work)
    url = home.broker_url
    fleet = FleetProcess(["serve", str(home.path), "--broker", url, "--http", f"127.0.0.1:{free_port()}"], work / "fleet-serve.log")
    fleet.wait_subscribed()
    print(f"{args.agents} agents in {args.procs} processes; bundle {bundle.name} ({bundle.stat().st_size:,} bytes); "
          f"open-file limit {fds}; {os.cpu_count()} cores; enrolled in {enroll_s:.1f} s", flush=True)

    ctx = mp.get_context("spawn")
    ready = ctx.Queue()
    t = time.monotonic()
    groups = _split(creds, args.procs)
    agents = Workers(ctx, _agent_worker, [(url, g, args.telemetry_s) for g in groups], ready)
    connected = sum(ready.get(timeout=300) for _ in groups)
    db = sqlite3.connect(home.db_path)
    count = lambda sql, *a: db.execute(sql, a).fetchone()[0]  # noqa: E731
    _wait(lambda: count("select count(*) from devices where online = 1") == args.agents, "every agent online", 120, 0.5)
    connect_s = time.monotonic() - t
    sockets = sum(1 for line in Path("/proc/net/tcp").read_text().splitlines()[1:]
                  if int(line.split()[2].rsplit(":", 1)[1], 16) == int(url.rsplit(":", 1)[1]) and line.split()[3] == "01")
    print(f"{connected} agents connected and subscribed, {args.agents} online in the registry after {connect_s:.1f} s "
          f"({sockets} established connections to the broker); fleet server RSS {rss_mb(fleet.proc.pid):.0f} MB, "
          f"broker RSS {rss_mb(broker.pid):.0f} MB", flush=True)

    pids = {"fleet": fleet.proc.pid, "broker": broker.pid}
    cpu0 = {name: cpu_seconds(pid) for name, pid in pids.items()} | {"agents": sum(cpu_seconds(p.pid) for p in agents.procs)}
    sampler = Sampler(pids)
    t0, wall0 = time.monotonic(), time.time()
    push = subprocess.run([sys.executable, "-m", "edgeops", "push", str(bundle), "--fleet", str(home.path), "--select",
                           "bench=live", "--stages", args.stages, "--bake", args.bake, "--min-calls", "0", "--json"],
                          capture_output=True, text=True, check=False)
    if push.returncode:
        raise RuntimeError(f"edgeops push failed: {push.stderr}")
    release = json.loads(push.stdout)["rollout"]
    print(f"edgeops push (sign + register): {time.monotonic() - t0:.1f} s; rollout {release}: {args.stages}, bake {args.bake}",
          flush=True)

    def converged() -> bool:
        state = count("select state from rollouts where id = ?", release)
        if state in ("rolled-back", "paused", "aborted", "cancelled"):
            raise RuntimeError(f"rollout {release} {state}: {rollout.decisions(sqlite_db(), release, 3)}")
        return state == "completed" and count("select count(*) from executions where release_id = ? and state = 'active'",
                                              release) == args.agents

    def sqlite_db():
        from edgeops.fleet import registry

        return registry.open_db(home.db_path)

    _wait(converged, "the rollout to complete with every agent active", args.timeout, 0.2)
    total_s = time.monotonic() - t0
    peaks = sampler.stop()
    cpu = {name: cpu_seconds(pid) - cpu0[name] for name, pid in pids.items()}
    cpu["agents"] = sum(cpu_seconds(p.pid) for p in agents.procs) - cpu0["agents"]
    version = count("select version from releases where id = ?", release)
    reporting = count("select count(*) from devices where installed_version = ? and online = 1", version)
    decisions = sorted(rollout.decisions(sqlite_db(), release, 100), key=lambda d: d["id"])
    stages, previous = [], wall0
    for d in decisions:
        if d["action"] in ("advance", "complete"):
            stages.append({"stage": d["reason"].split(":")[0], "seconds": d["t"] - previous})
            previous = d["t"]
    for s in stages:
        print(f"  {s['stage']:<40} {s['seconds']:6.1f} s", flush=True)
    print(f"rollout to {args.agents} agents: {total_s:.1f} s; converged: {reporting == args.agents} "
          f"({reporting}/{args.agents} report {version} and are active)", flush=True)
    hwm = rss_mb(fleet.proc.pid, "VmHWM")
    print(f"fleet server: peak RSS {max(peaks['fleet'], hwm):.0f} MB, CPU {cpu['fleet']:.1f} s over the rollout; broker: "
          f"peak RSS {peaks['broker']:.0f} MB, CPU {cpu['broker']:.1f} s; agents: CPU {cpu['agents']:.1f} s "
          f"({1000 * cpu['agents'] / args.agents:.0f} ms each)", flush=True)
    telemetry = count("select count(*) from telemetry")
    print(f"telemetry stored meanwhile: {telemetry:,} records", flush=True)
    agents.close()
    fleet.stop()
    if args.json:
        args.json.write_text(json.dumps({"agents": args.agents, "connect_s": connect_s, "rollout_s": total_s,
                                         "stages": stages, "converged": reporting == args.agents,
                                         "fleet_peak_rss_mb": max(peaks["fleet"], hwm), "fleet_cpu_s": cpu["fleet"],
                                         "broker_peak_rss_mb": peaks["broker"], "broker_cpu_s": cpu["broker"],
                                         "agents_cpu_s": cpu["agents"], "telemetry_records": telemetry}, indent=2))


if __name__ == "__main__":
    main()
