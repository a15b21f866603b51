"""Fan-out benchmark: one release to N agents through Mosquitto vs raw broker fan-out of the same bytes.

    python bench/fanout_bench.py [--agents 200] [--procs 4] [--model cnn|mlp] [--bundle PATH] [--timeout 120]

Both phases run in the same run, against the same Mosquitto (started here on a free port with the
files `edgeops fleet mosquitto-config` writes: mutual TLS with the fleet CA, the fleet's ACL; plus no
persistence, no queue limits), with the same process layout: N clients as threads spread over
`--procs` worker processes, and the sender (fleet server / raw publisher) in this process.

- **edgeops**: a real bundle (the digits CNN from tests/zoo.py built for x86-vnni, ~1.2 MB; `--model
  mlp` for the small demo MLP) is pushed to N enrolled `edgeops.agent.service.Agent`s, each with its
  own device directory. Timed from just before `push()` (signing included) to every execution of
  the release being `active` in the registry (download, verify, A/B install, self-test, report).
- **raw**: one paho publisher (the fleet's certificate) sends the same number of bytes in 128 KiB QoS 1
  messages to one target-stream topic that N bare paho subscribers (QoS 1, each with its own
  certificate from the fleet CA) subscribe to; timed until every subscriber has all bytes.

Prints both times and the ratio edgeops / raw. Every wait has a deadline; Mosquitto and the workers
are stopped on exit.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import multiprocessing as mp
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

RAW_TOPIC = "edgeops/v1/streams/" + "0" * 64  # a target stream: the fleet writes it, every client may read it
CHUNK = 128 * 1024


# ---- workers (run in child processes; spawn context, so everything here must be importable) ----


def _agent_worker(device_dirs: list[str], ready: mp.Queue, stop: mp.Event) -> None:
    import logging

    logging.basicConfig(level=logging.ERROR)
    from edgeops.agent.service import Agent

    halt = threading.Event()
    agents = [Agent(d) for d in device_dirs]
    threads = [threading.Thread(target=a.run, args=(halt,), daemon=True) for a in agents]
    for t in threads:
        t.start()
    for a in agents:
        a.link.connected.wait(timeout=60)
    ready.put(sum(a.link.connected.is_set() for a in agents))
    stop.wait()
    halt.set()
    for t in threads:
        t.join(timeout=5)


def _raw_worker(url: str, ids: list[tuple], total: int, done: mp.Queue, ready: mp.Queue, stop: mp.Event) -> None:
    import paho.mqtt.client as mqtt

    from edgeops.protocol.mqtt import BrokerAddress

    address = BrokerAddress.parse(url)
    subscribed = threading.Semaphore(0)
    clients = []
    for cid, tls in ids:
        got = [0]
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=cid, clean_session=True, protocol=mqtt.MQTTv311)
        if tls is not None:  # None: a plaintext loopback broker (tls_bench.py's baseline)
            c.tls_set_context(tls.context())
        c.max_inflight_messages_set(100)

        def on_message(client, userdata, message, got=got, cid=cid):
            got[0] += len(message.payload)
            if got[0] >= total and got[0] - len(message.payload) < total:
                done.put((cid, time.monotonic()))

        c.on_connect = lambda client, *a: client.subscribe(RAW_TOPIC, 1)
        c.on_subscribe = lambda *a: subscribed.release()
        c.on_message = on_message
        c.connect_async(address.host, address.port, keepalive=30)
        c.loop_start()
        clients.append(c)
    n = 0
    deadline = time.monotonic() + 60
    while n < len(ids) and subscribed.acquire(timeout=max(0.0, deadline - time.monotonic())):
        n += 1
    ready.put(n)
    stop.wait()
    for c in clients:
        c.loop_stop()
        c.disconnect()


# ---- main process ----


def _wait(condition, what: str, timeout: float, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


def start_mosquitto(home, work: Path) -> tuple[str, subprocess.Popen]:
    """The fleet's Mosquitto configuration (TLS, ACL), without persistence and queue limits."""
    import getpass

    from edgeops.fleet.broker import mosquitto_binary
    from edgeops.fleet.mosquitto import write_config
    from edgeops.protocol.mqtt import BrokerAddress

    binary = mosquitto_binary()
    port = BrokerAddress.parse(home.broker_url).port
    conf = write_config(home, work / "broker", "127.0.0.1", extra=[
        "persistence false", "max_queued_messages 0", "max_queued_bytes 0", "max_inflight_messages 0",
        "max_inflight_bytes 0", "message_size_limit 0", "max_connections -1", f"log_dest file {work / 'mosquitto.log'}",
        f"user {getpass.getuser()}"])["conf"]  # as root Mosquitto would switch to user mosquitto, who cannot read the keys
    proc = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    atexit.register(lambda: (proc.terminate(), proc.wait(timeout=10)) if proc.poll() is None else None)

    def listening():
        if proc.poll() is not None:
            raise RuntimeError(f"mosquitto exited: {(work / 'mosquitto.log').read_text()[-2000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return True
        except OSError:
            return False

    _wait(listening, "mosquitto to listen", 10)
    return home.broker_url, proc


def build_bundle(model: str, work: Path) -> Path:
    from edgeops.compiler.build import BuildRequest, build

    if model == "cnn":
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        import zoo  # tests/zoo.py: cached, trained on real data

        m = zoo.digits_cnn(work / "model")
    else:
        from edgeops.examples import train_digits_mlp

        m = train_digits_mlp(work / "model")
    report = build(BuildRequest(m.onnx, "x86-vnni", m.calib, m.eval, name="digits", version="1.0.0",
                                outdir=work / "release"))
    return Path(report["bundle"])


class Workers:
    """`procs` spawned worker processes; stopped (then killed) on exit, whatever happens."""

    def __init__(self, ctx, target, per_proc_args: list[tuple], ready: mp.Queue):
        self.stop = ctx.Event()
        self.procs = [ctx.Process(target=target, args=(*args, ready, self.stop), daemon=True) for args in per_proc_args]
        atexit.register(self.close)
        for p in self.procs:
            p.start()

    def close(self) -> None:
        self.stop.set()
        for p in self.procs:
            p.join(timeout=15)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _collect_ready(ready: mp.Queue, procs: int, expected: int, timeout: float) -> None:
    deadline, n = time.monotonic() + timeout, 0
    for _ in range(procs):
        n += ready.get(timeout=max(0.1, deadline - time.monotonic()))
    if n != expected:
        raise RuntimeError(f"only {n} of {expected} clients connected/subscribed")


def _split(items: list, procs: int) -> list[list]:
    return [items[i::procs] for i in range(procs) if items[i::procs]]


def raw_phase(ctx, home, work: Path, payload: bytes, n: int, procs: int, timeout: float) -> float:
    """Seconds until N subscribers have `payload`, on the fleet's broker URL (mqtts://, or a plaintext
    mqtt:// loopback baseline, where the clients use no certificates)."""
    import paho.mqtt.client as mqtt

    from edgeops.fleet import ca
    from edgeops.protocol.mqtt import BrokerAddress, TlsFiles

    url = home.broker_url
    address = BrokerAddress.parse(url)
    (work / "raw").mkdir(parents=True, exist_ok=True)
    subscribers = []
    for i in range(n):  # each subscriber with a certificate of its own, as each agent has
        cid = f"raw-{i}"
        if not address.tls:
            subscribers.append((cid, None))
            continue
        cert, key = work / "raw" / f"{cid}.pem", work / "raw" / f"{cid}.key"
        ca.write_issued(ca.issue(home.pki, cid), cert, key)
        subscribers.append((cid, TlsFiles(home.pki / "ca.pem", cert, key)))
    ready, done = ctx.Queue(), ctx.Queue()
    groups = _split(subscribers, procs)
    workers = Workers(ctx, _raw_worker, [(url, ids, len(payload), done) for ids in groups], ready)
    try:
        _collect_ready(ready, len(groups), n, 90)
        pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="raw-pub", protocol=mqtt.MQTTv311)
        if address.tls:
            pub.tls_set_context(home.client_tls().context())  # the fleet's certificate: it may write target streams
        pub.max_inflight_messages_set(100)
        pub.connect(address.host, address.port, keepalive=30)
        pub.loop_start()
        t0 = time.monotonic()
        infos = [pub.publish(RAW_TOPIC, payload[o : o + CHUNK], qos=1) for o in range(0, len(payload), CHUNK)]
        last, seen = t0, set()
        deadline = t0 + timeout
        while len(seen) < n:
            cid, t = done.get(timeout=max(0.1, deadline - time.monotonic()))
            seen.add(cid)
            last = max(last, t)
        for info in infos:
            info.wait_for_publish(timeout=5)
        pub.loop_stop()
        pub.disconnect()
        return last - t0
    finally:
        workers.close()


DELIVERED = ("installing", "self-test", "active")  # execution states reached once the bytes are verified


def edgeops_phase(ctx, home, bundle: Path, n: int, procs: int, work: Path, timeout: float,
                  broker_pid: int) -> dict[str, float]:
    from edgeops.fleet import registry
    from edgeops.fleet.home import enroll_device, push
    from edgeops.fleet.plan import make_plan
    from edgeops.fleet.server import FleetServer

    url = home.broker_url
    dirs = []
    for i in range(n):
        d = work / "devices" / f"dev-{i:04d}"
        enroll_device(home, d.name, "x86-vnni", {"bench": "fanout"}, d)
        dirs.append(str(d))
    ready = ctx.Queue()
    groups = _split(dirs, procs)
    workers = Workers(ctx, _agent_worker, [(g,) for g in groups], ready)
    server = FleetServer(home, url).start()
    try:
        _collect_ready(ready, len(groups), n, 120)
        db = registry.open_db(home.db_path)
        _wait(lambda: db["devices"].count_where("online = 1") == n, "all devices to report online", 60, 0.2)
        pids = {"agents": [p.pid for p in workers.procs], "broker": [broker_pid]}
        cpu0 = {k: sum(map(cpu_seconds, v)) for k, v in pids.items()} | {"fleet": time.process_time()}
        t0 = time.monotonic()
        release = push(home, [bundle], {"bench": "fanout"}, plan=make_plan(stages="100%", bake=0, min_calls=0))
        result: dict[str, float] = {}

        def all_active():
            rows = list(db.query("select state, count(*) as c from executions where release_id = ? group by state", [release]))
            counts = {r["state"]: r["c"] for r in rows}
            if os.environ.get("FANOUT_TRACE"):
                print(f"{time.monotonic() - t0:6.2f} {counts} sent={server.streams.sent}", flush=True)
            bad = {s: c for s, c in counts.items() if s in ("failed", "rejected")}
            if bad:
                raise RuntimeError(f"executions failed: {bad}")
            if "delivered_s" not in result and sum(counts.get(s, 0) for s in DELIVERED) == n:
                result["delivered_s"] = time.monotonic() - t0
            return counts.get("active", 0) == n

        _wait(all_active, f"{n} executions active", timeout, 0.02)
        result["active_s"] = time.monotonic() - t0
        cpu = {k: sum(map(cpu_seconds, v)) - cpu0[k] for k, v in pids.items()}
        cpu["fleet"] = time.process_time() - cpu0["fleet"]
        result |= {f"{k}_cpu_s": v for k, v in cpu.items()}
        result["blocks_sent"] = server.streams.sent
        return result
    finally:
        workers.close()
        server.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--agents", type=int, default=200)
    ap.add_argument("--procs", type=int, default=4)
    ap.add_argument("--model", choices=("cnn", "mlp"), default="cnn", help="cnn: ~1.2 MB bundle; mlp: the small demo model")
    ap.add_argument("--bundle", type=Path, help="an existing x86-vnni .edgeops bundle instead of building one")
    ap.add_argument("--timeout", type=float, default=120, help="seconds allowed per phase")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="edgeops-fanout-"))
    atexit.register(shutil.rmtree, work, True)  # registered first, so it runs after the broker stops
    bundle = args.bundle or build_bundle(args.model, work)
    size = bundle.stat().st_size
    from edgeops.fleet.broker import free_port
    from edgeops.fleet.home import init_fleet

    home = init_fleet(work / "fleet", f"mqtts://127.0.0.1:{free_port()}")
    url, broker = start_mosquitto(home, work)
    ctx = mp.get_context("spawn")
    print(f"release: {bundle.name}, {size:,} bytes ({size / 2**20:.2f} MiB); {args.agents} clients in "
          f"{args.procs} processes; Mosquitto at {url}", flush=True)

    raw = raw_phase(ctx, home, work, bundle.read_bytes(), args.agents, args.procs, args.timeout)
    print(f"raw fan-out (128 KiB QoS 1 to {args.agents} subscribers): {raw:.2f} s", flush=True)
    edge = edgeops_phase(ctx, home, bundle, args.agents, args.procs, work, args.timeout, broker.pid)
    blocks = -(-size // CHUNK)
    print(f"edgeops push -> {args.agents} verified: {edge['delivered_s']:.2f} s ({edge['delivered_s'] / raw:.1f}x raw); "
          f"-> {args.agents} active: {edge['active_s']:.2f} s", flush=True)
    print(f"  {edge['blocks_sent']:.0f} blocks broadcast ({edge['blocks_sent'] / blocks:.1f} passes over the "
          f"{blocks} blocks); CPU: agents {edge['agents_cpu_s']:.1f} s ({1000 * edge['agents_cpu_s'] / args.agents:.0f} ms "
          f"per agent), fleet {edge['fleet_cpu_s']:.1f} s, broker {edge['broker_cpu_s']:.1f} s; {os.cpu_count()} cores", flush=True)
    print(f"ratio edgeops/raw: {edge['active_s'] / raw:.1f}x (goal <= 2x)", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"bundle_bytes": size, "agents": args.agents, "procs": args.procs,
                                         "raw_s": raw, **edge, "ratio": edge["active_s"] / raw}, indent=2))


if __name__ == "__main__":
    main()
