"""TLS benchmark: the fleet's mutual-TLS Mosquitto against the same Mosquitto configuration with a
plaintext loopback listener, in the same run.

    python bench/tls_bench.py [--agents 100] [--procs 4] [--model cnn|mlp] [--bundle PATH]
                              [--devices 100] [--records 1000] [--batches 500,5] [--json out.json]

Two fleets, each with its own Mosquitto, both running for the whole run:
- **tls**: a fleet on `mqtts://127.0.0.1:P`, its broker on the files `edgeops fleet mosquitto-config
  --ingest-workers 4` writes (mutual TLS with the fleet CA, CRL, identities from certificates, ACL),
  every client with a certificate of the fleet CA, as in production;
- **plain**: a fleet on `mqtt://127.0.0.1:Q`, its broker on the same configuration file with the TLS
  lines taken out (cafile, certfile, keyfile, crlfile, tls_version, require_certificate,
  use_identity_as_username, use_username_as_clientid), `allow_anonymous true`, the listener on
  127.0.0.1 only, and the same ACL file with one line for anonymous clients in front
  (`topic readwrite edgeops/#`), so Mosquitto still checks the ACL on every message. Bench-only.

Measured, tls against plain (ratios tls/plain):
- per call: MQTT connection set-up (TCP + TLS handshake + CONNECT/CONNACK) and its CPU, the round
  trip of a telemetry message (device publishes, a fleet-side client answers on the device's
  `acks`, as ingest does) for a one-record batch and a 128 KiB message, alternated call by call;
- per byte and per message: one device streaming QoS 1 messages to one fleet-side subscriber, 128
  KiB (MB/s, CPU of the clients and the broker per MB) and one-record telemetry batches (messages/s,
  CPU per 1,000 messages);
- fan-out (fanout_bench.py's phases): raw Mosquitto fan-out of the bundle's bytes to N
  subscribers, and a real release to N `Agent`s until all `active`;
- ingest (ingest_bench.py's phases), per batch size: raw records/s to one subscriber, and
  `edgeops fleet serve` committing them (1 worker), with CPU per 1,000 records;
- agent: RSS of an `edgeops agent run` serving the bundle's model, connected to its broker.

The cheap measures alternate tls/plain within the phase; the fan-out phases run tls then plain
(once: the agents are enrolled devices), the ingest phases tls then plain, and again plain then tls
with `--rounds 2`.
"""

from __future__ import annotations

import argparse
import atexit
import json
import multiprocessing as mp
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))
import agent_bench
import fanout_bench
import ingest_bench

TLS_KEYS = ("cafile", "certfile", "keyfile", "crlfile", "tls_version", "require_certificate",
            "use_identity_as_username", "use_username_as_clientid", "allow_anonymous")
ANONYMOUS_ACL = "# tls_bench.py's plaintext baseline: anonymous clients (no certificate, no username).\n" \
                "topic readwrite edgeops/#\n"


@dataclass
class Transport:
    name: str
    home: object
    url: str
    work: Path
    broker: object  # subprocess.Popen
    creds: list  # (device id, TlsFiles) of the ingest devices
    next_seq: int = 1_000_001

    @property
    def log(self) -> Path:
        return self.work / "broker" / "mosquitto.log"


def plaintext_config(tls_conf: Path, port: int, out: Path) -> Path:
    """The TLS configuration `tls_conf` with a plaintext loopback listener on `port` instead (see the docstring)."""
    out.mkdir(parents=True, exist_ok=True)
    lines = []
    for line in tls_conf.read_text().splitlines():
        key = line.split(" ", 1)[0]
        if key in TLS_KEYS:
            continue
        if key == "listener":
            line = f"listener {port} 127.0.0.1"
        elif key == "log_dest":
            line = f"log_dest file {out / 'mosquitto.log'}"
        elif key == "acl_file":
            acl = Path(line.split(" ", 1)[1])
            (out / "acl").write_text(ANONYMOUS_ACL + acl.read_text())
            line = f"acl_file {out / 'acl'}"
        lines.append(line)
    lines.append("allow_anonymous true")
    (out / "mosquitto.conf").write_text("\n".join(lines) + "\n")
    return out / "mosquitto.conf"


def setup(work: Path, devices: int) -> tuple[Transport, Transport]:
    from edgeops.fleet.broker import free_port
    from edgeops.fleet.home import init_fleet

    transports = []
    tls_conf = None
    for name in ("tls", "plain"):
        port = free_port()
        home = init_fleet(work / name / "fleet", f"{'mqtts' if name == 'tls' else 'mqtt'}://127.0.0.1:{port}")
        creds = ingest_bench.enroll_many(home, devices, {"bench": "ingest"})
        if name == "tls":
            tls_conf = ingest_bench.broker_files(home, work / name)["conf"]
            conf = tls_conf
        else:
            conf = plaintext_config(tls_conf, port, work / name / "broker")
        broker = ingest_bench.run_mosquitto(conf, port, work / name / "broker" / "mosquitto.log")
        transports.append(Transport(name, home, home.broker_url, work / name, broker, creds))
    return transports[0], transports[1]


def _cpu(pid: int) -> float:
    return fanout_bench.cpu_seconds(pid)


def _connected(t: Transport, device_id: str, cid: str, will=None):
    """A product client (protocol/mqtt.py) of `device_id` on `t`, connected; (client, seconds to CONNACK)."""
    from edgeops.protocol import mqtt as mqttlib

    tls = dict(t.creds)[device_id] if device_id in dict(t.creds) else t.home.client_tls()
    up = threading.Event()
    c = mqttlib.client(cid, t.url, tls, will=will)
    c.on_connect = lambda *a: up.set()
    t0 = time.perf_counter()
    c.loop_start()
    if not up.wait(10):
        raise TimeoutError(f"{cid} did not connect to {t.url}")
    return c, time.perf_counter() - t0


def _close(c, subscribed: str | None = None) -> None:
    """Disconnect; first drop `subscribed` from the client's persistent session, so the broker queues
    nothing for it afterwards (a later fleet client with the same certificate inherits the session)."""
    if subscribed:
        gone = threading.Event()
        c.on_unsubscribe = lambda *a: gone.set()
        c.unsubscribe(subscribed)
        gone.wait(10)
    c.disconnect()
    c.loop_stop()


def connections(ts: tuple[Transport, Transport], n: int, blocks: int = 4) -> dict:
    """Connection set-up, wall and CPU (this process, the broker) per connection, in alternating blocks."""
    out = {t.name: {"wall": [], "client_cpu": 0.0, "broker_cpu": 0.0, "n": 0} for t in ts}
    for b in range(blocks):
        for t in (ts if b % 2 == 0 else ts[::-1]):
            device_id = t.creds[0][0]
            c0, b0 = time.process_time(), _cpu(t.broker.pid)
            for _ in range(n // blocks):
                c, seconds = _connected(t, device_id, f"edgeops-agent-{device_id}")
                _close(c)
                out[t.name]["wall"].append(seconds)
            out[t.name]["client_cpu"] += time.process_time() - c0
            out[t.name]["broker_cpu"] += _cpu(t.broker.pid) - b0
            out[t.name]["n"] += n // blocks
    return {name: {"p50_ms": 1e3 * statistics.median(r["wall"]), "client_cpu_ms": 1e3 * r["client_cpu"] / r["n"],
                   "broker_cpu_ms": 1e3 * r["broker_cpu"] / r["n"]} for name, r in out.items()}


class Echo:
    """A device client and a fleet-side client on one transport: the device publishes on its
    telemetry topic, the fleet side answers on the device's acks, the device waits for the answer."""

    def __init__(self, t: Transport):
        from edgeops.protocol import wire

        self.t = t
        self.device_id = t.creds[1][0]
        self.got = threading.Event()
        self.subs = threading.Semaphore(0)
        self.topic = wire.topic(self.device_id, "telemetry")
        self.filter = f"{wire.PREFIX}/+/telemetry"
        self.fleet, _ = _connected(t, "", "bench-echo")
        self.fleet.on_message = lambda c, u, m: c.publish(m.topic.rsplit("/", 1)[0] + "/acks", b"1", qos=1)
        self.fleet.on_subscribe = lambda *a: self.subs.release()
        self.fleet.subscribe(self.filter, 1)
        self.device, _ = _connected(t, self.device_id, f"edgeops-agent-{self.device_id}")
        self.device.on_message = lambda *a: self.got.set()
        self.device.on_subscribe = lambda *a: self.subs.release()
        self.device.subscribe(wire.topic(self.device_id, "acks"), 1)
        for _ in range(2):
            if not self.subs.acquire(timeout=10):
                raise TimeoutError("subscriptions not granted")

    def once(self, payload: bytes) -> float:
        self.got.clear()
        t0 = time.perf_counter()
        self.device.publish(self.topic, payload, qos=1)
        if not self.got.wait(10):
            raise TimeoutError(f"no answer on {self.t.name}")
        return time.perf_counter() - t0

    def close(self) -> None:
        _close(self.device)
        _close(self.fleet, self.filter)


def round_trips(ts: tuple[Transport, Transport], n: int) -> dict:
    """Telemetry -> ack round trips, alternated call by call between the transports; p50 per payload size."""
    echoes = [Echo(t) for t in ts]
    small = ingest_bench.make_payloads(ts[0].creds[1][0], 1, 1, 1)[0][2]  # one inference record, as forwarded
    sizes = {"1 record": small, "128 KiB": os.urandom(128 * 1024)}
    try:
        out = {}
        for label, payload in sizes.items():
            times = {t.name: [] for t in ts}
            for _ in range(20):  # warm
                for e in echoes:
                    e.once(payload)
            for i in range(n if label == "1 record" else n // 4):
                for e in (echoes if i % 2 == 0 else echoes[::-1]):
                    times[e.t.name].append(e.once(payload))
            out[label] = {name: {"p50_ms": 1e3 * statistics.median(v), "bytes": len(payload)} for name, v in times.items()}
        return out
    finally:
        for e in echoes:
            e.close()


def stream(ts: tuple[Transport, Transport], count: int, size: int = 128 * 1024, rounds: int = 2) -> dict:
    """One device streams `count` QoS 1 messages of `size` bytes to one fleet-side subscriber: MB/s,
    messages/s, and CPU (this process: both clients; the broker) per MB and per 1,000 messages."""
    from edgeops.protocol import wire

    out = {t.name: {"s": 0.0, "client_cpu": 0.0, "broker_cpu": 0.0} for t in ts}
    chunk = os.urandom(size)
    for r in range(rounds):
        for t in (ts if r % 2 == 0 else ts[::-1]):
            received, lock, done, subs = [0], threading.Lock(), threading.Event(), threading.Event()

            def on_message(c, u, m, received=received, lock=lock, done=done):
                with lock:
                    received[0] += len(m.payload)
                    if received[0] >= count * len(chunk):
                        done.set()

            sub, _ = _connected(t, "", "bench-stream-sub")
            sub.on_message = on_message
            sub.on_subscribe = lambda *a, subs=subs: subs.set()
            sub.subscribe(f"{wire.PREFIX}/+/telemetry", 1)
            subs.wait(10)
            device_id = t.creds[2][0]
            pub, _ = _connected(t, device_id, f"edgeops-agent-{device_id}")
            c0, b0, t0 = time.process_time(), _cpu(t.broker.pid), time.perf_counter()
            for _ in range(count):
                pub.publish(wire.topic(device_id, "telemetry"), chunk, qos=1)
            if not done.wait(120):
                raise TimeoutError(f"stream on {t.name}: {received[0]} of {count * len(chunk)} bytes")
            out[t.name]["s"] += time.perf_counter() - t0
            out[t.name]["client_cpu"] += time.process_time() - c0
            out[t.name]["broker_cpu"] += _cpu(t.broker.pid) - b0
            _close(pub)
            _close(sub, f"{wire.PREFIX}/+/telemetry")
    mb, k = rounds * count * len(chunk) / 1e6, rounds * count / 1e3
    return {name: {"mb_per_s": mb / r["s"], "messages_per_s": 1e3 * k / r["s"],
                   "client_cpu_ms_per_mb": 1e3 * r["client_cpu"] / mb, "broker_cpu_ms_per_mb": 1e3 * r["broker_cpu"] / mb,
                   "client_cpu_ms_per_1000": 1e3 * r["client_cpu"] / k, "broker_cpu_ms_per_1000": 1e3 * r["broker_cpu"] / k}
            for name, r in out.items()}


def fanout(ctx, t: Transport, bundle: Path, agents: int, procs: int, timeout: float, round_: int) -> dict:
    work = t.work / f"fanout-{round_}"
    raw = statistics.median(fanout_bench.raw_phase(ctx, t.home, work / f"raw-{i}", bundle.read_bytes(), agents, procs,
                                                   timeout) for i in range(3))
    broker0 = _cpu(t.broker.pid)
    edge = fanout_bench.edgeops_phase(ctx, t.home, bundle, agents, procs, work, timeout, t.broker.pid)
    return {"raw_s": raw, **edge, "broker_total_cpu_s": _cpu(t.broker.pid) - broker0}


def ingest(ctx, t: Transport, batch: int, records: int, procs: int, timeout: float) -> dict:
    args = SimpleNamespace(procs=procs, records=records, batch=batch, timeout=timeout)
    total = len(t.creds) * records
    raw = ingest_bench.raw_phase(ctx, t.home, t.url, t.creds, args, total, t.broker.pid)
    edge = ingest_bench.edgeops_phase(ctx, t.home, t.url, t.creds, args, total, t.next_seq, 1, t.broker.pid,
                                      t.work)
    t.next_seq += records
    return {"raw": raw, "edgeops": edge}


def agent_rss(t: Transport, bundle: Path) -> dict:
    agent_bench.device(t.work, bundle, t.home, "rss-dev")

    def connected(pid: int) -> bool:  # the broker logged the agent's connection (client id: CN, or given)
        return any("New client connected" in line and "rss-dev" in line for line in t.log.read_text().splitlines())

    return agent_bench.idle_memory(t.work / "rss-dev", connected)


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.3f}" if b else "-"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--agents", type=int, default=100, help="fan-out: agents (and raw subscribers)")
    ap.add_argument("--procs", type=int, default=4, help="processes the agents / simulated devices are spread over")
    ap.add_argument("--model", choices=("cnn", "mlp"), default="cnn")
    ap.add_argument("--bundle", type=Path)
    ap.add_argument("--devices", type=int, default=100, help="ingest: devices (one connection each)")
    ap.add_argument("--records", type=int, default=1000, help="ingest: records per device per phase")
    ap.add_argument("--batches", default="500,5", help="ingest: records per message, e.g. 500,5")
    ap.add_argument("--rounds", type=int, default=1, help="fan-out and ingest: 2 = tls,plain then plain,tls")
    ap.add_argument("--calls", type=int, default=400, help="round trips per transport (128 KiB: a quarter)")
    ap.add_argument("--stream-mib", type=int, default=32, help="MiB per 128 KiB stream, per transport and round")
    ap.add_argument("--small-messages", type=int, default=10000, help="one-record messages per small stream")
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: calls,stream,fanout,ingest,rss")
    ap.add_argument("--timeout", type=float, default=180)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))

    work = Path(tempfile.mkdtemp(prefix="edgeops-tls-bench-"))
    atexit.register(shutil.rmtree, work, True)  # registered first, so it runs after the brokers stop
    bundle = args.bundle or fanout_bench.build_bundle(args.model, work)
    ts = setup(work, max(args.devices, 3))
    ctx = mp.get_context("spawn")
    print(f"tls: {ts[0].url}; plain: {ts[1].url}; bundle {bundle.stat().st_size:,} bytes; {os.cpu_count()} cores; "
          f"load {os.getloadavg()[0]:.1f}", flush=True)
    results: dict = {}

    if "calls" not in skip:
        results["connect"] = c = connections(ts, 40)
        print(f"connect (TCP+TLS+CONNACK) p50: tls {c['tls']['p50_ms']:.2f} ms, plain {c['plain']['p50_ms']:.2f} ms; "
              f"CPU per connection: client {c['tls']['client_cpu_ms']:.2f} vs {c['plain']['client_cpu_ms']:.2f} ms, "
              f"broker {c['tls']['broker_cpu_ms']:.2f} vs {c['plain']['broker_cpu_ms']:.2f} ms", flush=True)
        results["round_trip"] = rt = round_trips(ts, args.calls)
        for label, r in rt.items():
            print(f"round trip telemetry -> ack, {label} ({r['tls']['bytes']:,} B) p50: tls {r['tls']['p50_ms']:.3f} ms, "
                  f"plain {r['plain']['p50_ms']:.3f} ms: {_ratio(r['tls']['p50_ms'], r['plain']['p50_ms'])}x "
                  f"(+{1e3 * (r['tls']['p50_ms'] - r['plain']['p50_ms']):.0f} us)", flush=True)
    if "stream" not in skip:
        results["stream"] = s = stream(ts, args.stream_mib * 8)
        print(f"stream 128 KiB QoS 1, 1 -> 1: tls {s['tls']['mb_per_s']:.0f} MB/s, plain {s['plain']['mb_per_s']:.0f} MB/s "
              f"({_ratio(s['plain']['mb_per_s'], s['tls']['mb_per_s'])}x time); CPU per MB: clients "
              f"{s['tls']['client_cpu_ms_per_mb']:.2f} vs {s['plain']['client_cpu_ms_per_mb']:.2f} ms, broker "
              f"{s['tls']['broker_cpu_ms_per_mb']:.2f} vs {s['plain']['broker_cpu_ms_per_mb']:.2f} ms", flush=True)
        small = len(ingest_bench.make_payloads(ts[0].creds[1][0], 1, 1, 1)[0][2])
        results["small_stream"] = s = stream(ts, args.small_messages, small)
        print(f"stream {small} B QoS 1 (one record), 1 -> 1: tls {s['tls']['messages_per_s']:,.0f}/s, plain "
              f"{s['plain']['messages_per_s']:,.0f}/s ({_ratio(s['plain']['messages_per_s'], s['tls']['messages_per_s'])}x "
              f"time); CPU per 1,000 messages: clients {s['tls']['client_cpu_ms_per_1000']:.1f} vs "
              f"{s['plain']['client_cpu_ms_per_1000']:.1f} ms, broker {s['tls']['broker_cpu_ms_per_1000']:.1f} vs "
              f"{s['plain']['broker_cpu_ms_per_1000']:.1f} ms", flush=True)
    orders = [ts if r % 2 == 0 else ts[::-1] for r in range(args.rounds)]
    if "fanout" not in skip:
        results["fanout"] = f = {"tls": [], "plain": []}
        for t in ts:  # once: a second round would enroll the same device ids again
            f[t.name].append(x := fanout(ctx, t, bundle, args.agents, args.procs, args.timeout, 0))
            print(f"fan-out {t.name} ({args.agents} agents): raw {x['raw_s']:.2f} s (median of 3); edgeops -> verified "
                  f"{x['delivered_s']:.2f} s, -> active {x['active_s']:.2f} s; CPU agents {x['agents_cpu_s']:.1f} s, "
                  f"fleet {x['fleet_cpu_s']:.1f} s, broker {x['broker_cpu_s']:.1f} s "
                  f"(incl. connections {x['broker_total_cpu_s']:.1f} s)", flush=True)
        m = {k: {n: statistics.mean(x[k] for x in f[n]) for n in f} for k in ("raw_s", "active_s", "agents_cpu_s")}
        print(f"fan-out tls/plain: raw {_ratio(m['raw_s']['tls'], m['raw_s']['plain'])}, edgeops -> active "
              f"{_ratio(m['active_s']['tls'], m['active_s']['plain'])}, agents' CPU "
              f"{_ratio(m['agents_cpu_s']['tls'], m['agents_cpu_s']['plain'])} (goal <= 1.15)", flush=True)
    if "ingest" not in skip:
        results["ingest"] = ing = {}
        for batch in (int(b) for b in args.batches.split(",")):
            records = args.records if batch >= 100 else max(50, args.records // 10)
            ing[batch] = {"tls": [], "plain": []}
            for order in orders:
                for t in order:
                    ing[batch][t.name].append(x := ingest(ctx, t, batch, records, args.procs, args.timeout))
                    e = x["edgeops"]
                    k = len(t.creds) * records / 1000
                    print(f"ingest {t.name}, {batch} records/message ({len(t.creds)} x {records}): raw "
                          f"{x['raw']['records_per_s']:,.0f} rec/s; edgeops {e['records_per_s']:,.0f} rec/s; CPU per 1,000 "
                          f"records: fleet {1e3 * e['fleet_cpu_s'] / k:.1f} ms, broker {1e3 * e['broker_cpu_s'] / k:.1f} ms, "
                          f"devices {1e3 * e['devices_cpu_s'] / k:.1f} ms; resent {e['batches_resent']}", flush=True)
            m = {k: {n: statistics.mean(x[k]["records_per_s"] for x in ing[batch][n]) for n in ("tls", "plain")}
                 for k in ("raw", "edgeops")}
            print(f"ingest {batch} records/message, time per record tls/plain: raw "
                  f"{_ratio(m['raw']['plain'], m['raw']['tls'])}, edgeops {_ratio(m['edgeops']['plain'], m['edgeops']['tls'])}"
                  f" (goal <= 1.15)", flush=True)
    if "rss" not in skip:
        results["agent_rss"] = a = {t.name: agent_rss(t, bundle) for t in ts}
        print(f"agent run, connected, model loaded: RSS tls {a['tls']['rss_mb']:.1f} MB, plain {a['plain']['rss_mb']:.1f} MB "
              f"(peak {a['tls']['peak_rss_mb']:.1f} / {a['plain']['peak_rss_mb']:.1f} MB)", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
