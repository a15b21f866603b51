"""Ingest benchmark: telemetry records/s committed to the fleet registry, with 1 and 2 ingest workers,
against raw Mosquitto throughput of the same messages to a plain subscriber, measured in the same run.

    python bench/ingest_bench.py [--devices 200] [--records 1000] [--batch 500] [--procs 2] [--json out.json]

Everything is real: a fleet directory with `--devices` enrolled devices, Mosquitto started from the
files `edgeops fleet mosquitto-config` writes (mutual TLS with the fleet CA, ACL, one connection per
device with its own certificate), and the fleet as subprocesses (`edgeops fleet serve`, plus `edgeops fleet ingest`
for the second worker, both on the shared subscription `$share/bench/...`).

Each simulated device forwards `--records` telemetry records exactly as agent/telemetry.py does:
batches of at most `--batch` records (the agent's BATCH_RECORDS is 500: a device catching up on a
backlog; a device forwarding as it infers sends a few records per batch) in `wire.telemetry_batch`
payloads, at most IN_FLIGHT batches unacknowledged, the next one sent when the fleet's `acks`
message for a batch arrives, and a batch sent again if unacknowledged after ACK_TIMEOUT_S.

Phases, each with fresh device processes and new seqs:
- **raw**: the devices publish all their batches (QoS 1, no waiting for the fleet) to one plain paho
  subscriber with ingest worker 1's certificate, which only counts records; timed until it has them all;
- **edgeops, N workers**: timed from the start signal until `sum(received)` over `telemetry_devices`
  in the registry grew by every record (each record committed once, then acknowledged).

Prints records/s for each phase, their ratio to raw, and CPU seconds of the fleet processes, the
broker and the devices. Every wait has a deadline; everything started here is stopped on exit.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import multiprocessing as mp
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fanout_bench import Workers, _split, _wait, cpu_seconds  # noqa: E402

SHARE = "bench"
MAX_WORKERS = 4  # ingest worker certificates in the broker configuration
BODY = '{"model":"digits","version":"1.0.0","latency_ms":%.4f,"ok":true,"samples":1,"classes":[%d],"confidences":[0.%04d]}'


# ---- simulated devices (run in child processes; spawn context, so everything here must be importable) ----


class SimDevice:
    """One device's telemetry forwarder: agent/telemetry.py's flow control over pre-made batches."""

    def __init__(self, device_id: str, tls, url: str, payloads: list[tuple[int, int, bytes]], wait_acks: bool):
        from edgeops.protocol import mqtt as mqttlib
        from edgeops.protocol import wire

        self.device_id, self.payloads, self.wait_acks = device_id, payloads, wait_acks
        self.next, self.acked, self.resent, self.started = 0, 0, 0, False
        self.in_flight: dict[tuple[int, int], tuple[bytes, float]] = {}
        self.lock = threading.Lock()
        self.subscribed = threading.Event()
        self.client = mqttlib.client(f"edgeops-agent-{device_id}", url, tls,
                                     will=(wire.topic(device_id, "state"), wire.encode({"device": device_id, "online": False})))
        self.client.on_connect = lambda c, *a: c.subscribe(wire.topic(device_id, "acks"), 1)
        self.client.on_subscribe = lambda *a: self.subscribed.set()
        self.client.on_message = self._on_ack
        self.client.loop_start()

    def start(self) -> None:
        if not self.wait_acks:  # raw: everything at once, paho keeps 100 in flight
            for _, _, payload in self.payloads:
                self.client.publish(self._topic(), payload, qos=1)
            return
        with self.lock:
            self.started = True
            self._pump()

    def _topic(self) -> str:
        from edgeops.protocol import wire

        return wire.topic(self.device_id, "telemetry")

    def _pump(self) -> None:
        from edgeops.agent.telemetry import IN_FLIGHT

        while len(self.in_flight) < IN_FLIGHT and self.next < len(self.payloads):
            first, last, payload = self.payloads[self.next]
            self.client.publish(self._topic(), payload, qos=1)
            self.in_flight[(first, last)] = (payload, time.monotonic())
            self.next += 1

    def _on_ack(self, client, userdata, message) -> None:
        from edgeops.protocol import wire

        seqs = wire.parse_telemetry_ack(message.payload)
        with self.lock:  # acks of a previous phase may arrive first, from the persistent session
            if self.in_flight.pop((min(seqs), max(seqs)), None) is not None:
                self.acked += 1
            if self.started:
                self._pump()

    def resend_stale(self) -> None:
        """Like the agent after ACK_TIMEOUT_S without an ack: send the unacknowledged batches again."""
        from edgeops.agent.telemetry import ACK_TIMEOUT_S

        now = time.monotonic()
        with self.lock:
            for key, (payload, sent) in list(self.in_flight.items()):
                if now - sent > ACK_TIMEOUT_S:
                    self.client.publish(self._topic(), payload, qos=1)
                    self.in_flight[key] = (payload, now)
                    self.resent += 1

    def done(self) -> bool:
        return self.acked == len(self.payloads)


def make_payloads(device_id: str, first_seq: int, records: int, batch: int) -> list[tuple[int, int, bytes]]:
    """`records` inference records from `first_seq` on, as the agent's batches of at most `batch` (and 128 KiB)."""
    from edgeops.agent.telemetry import BATCH_BYTES
    from edgeops.protocol import wire

    rows = [(seq, "inference", 1.8e9 + seq / 100, BODY % (seq % 97 / 10, seq % 10, seq % 10000))
            for seq in range(first_seq, first_seq + records)]
    per_batch = max(1, min(batch, BATCH_BYTES // (len(rows[0][3]) + 60)))
    return [(chunk[0][0], chunk[-1][0], wire.telemetry_batch(device_id, chunk, 0))
            for chunk in (rows[i : i + per_batch] for i in range(0, len(rows), per_batch))]


def _device_worker(url: str, creds: list[tuple], first_seq: int, records: int, batch: int, wait_acks: bool,
                   go, ready: mp.Queue, stop) -> None:
    import logging

    logging.basicConfig(level=logging.ERROR)
    devices = [SimDevice(d, tls, url, make_payloads(d, first_seq, records, batch), wait_acks) for d, tls in creds]
    deadline = time.monotonic() + 60
    for device in devices:
        device.subscribed.wait(max(0.0, deadline - time.monotonic()))
    ready.put(sum(d.subscribed.is_set() for d in devices))
    go.wait()
    for device in devices:
        device.start()
    while not stop.wait(1.0):
        if wait_acks:
            for device in devices:
                device.resend_stale()
    ready.put(sum(d.resent for d in devices))
    for device in devices:  # all at once: each loop thread may otherwise take a second to notice
        device.client.disconnect()
    for device in devices:
        device.client.loop_stop()


# ---- the broker and the fleet ----


def broker_files(home, work: Path, extra: tuple[str, ...] = ()) -> dict[str, Path]:
    """The files `edgeops fleet mosquitto-config --ingest-workers 4` writes (in `work/broker`), plus `extra` lines."""
    import getpass

    from edgeops.fleet.mosquitto import write_config

    lines = ["persistence false", f"log_dest file {work / 'broker' / 'mosquitto.log'}",
             f"user {getpass.getuser()}",  # as root Mosquitto would switch to user `mosquitto`, who cannot read the keys
             *extra]
    return write_config(home, work / "broker", "127.0.0.1", ingest_workers=MAX_WORKERS, extra=lines)


def run_mosquitto(conf: Path, port: int, log: Path) -> subprocess.Popen:
    """Mosquitto on `conf` (which logs to `log`), once it listens on `port`; stopped on exit."""
    from edgeops.fleet.broker import mosquitto_binary

    proc = subprocess.Popen([mosquitto_binary(), "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    atexit.register(stop_process, proc)

    def listening() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"mosquitto exited: {log.read_text()[-2000:] if log.exists() else ''}")
        return log.exists() and f"listen socket on port {port}" in log.read_text()

    _wait(listening, "mosquitto to listen", 10)
    return proc


def start_mosquitto(home, work: Path, extra: tuple[str, ...] = ()) -> subprocess.Popen:
    """Mosquitto with the files `edgeops fleet mosquitto-config` writes, plus `extra` lines."""
    from edgeops.protocol.mqtt import BrokerAddress

    files = broker_files(home, work, extra)
    return run_mosquitto(files["conf"], BrokerAddress.parse(home.broker_url).port, work / "broker" / "mosquitto.log")


def stop_process(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def enroll_many(home, n: int, labels: dict[str, str]) -> list[tuple]:
    """Enroll `n` devices (profile x86-vnni) in one registry connection, each with a certificate from
    the fleet CA (in `devices/ID/` next to the fleet); their (id, TlsFiles)."""
    from edgeops.fleet import ca, registry
    from edgeops.protocol.mqtt import TlsFiles

    db = registry.open_db(home.db_path)
    creds = []
    for i in range(n):
        device_id = f"dev-{i:05d}"
        folder = home.path.parent / "devices" / device_id
        folder.mkdir(parents=True)
        issued = ca.issue(home.pki, device_id)
        ca.write_issued(issued, folder / "device.pem", folder / "device.key")
        registry.enroll(db, device_id, "x86-vnni", labels, issued.cert)
        creds.append((device_id, TlsFiles(home.pki / "ca.pem", folder / "device.pem", folder / "device.key")))
    db.conn.close()
    return creds


class FleetProcess:
    """`python -m edgeops -v fleet ARGS...` with its log in `log`; ready once it logged its subscription."""

    def __init__(self, args: list[str], log: Path):
        self.log = log
        with open(log, "w") as fh:
            self.proc = subprocess.Popen([sys.executable, "-m", "edgeops", "-v", "fleet", *args], stdout=fh,
                                         stderr=subprocess.STDOUT)
        atexit.register(stop_process, self.proc)

    def wait_subscribed(self, timeout: float = 60) -> None:
        def subscribed() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"fleet process exited: {self.log.read_text()[-2000:]}")
            return "subscribed to" in self.log.read_text()

        _wait(subscribed, f"{self.log.stem} to subscribe", timeout, 0.1)

    def stop(self) -> None:
        stop_process(self.proc)


def start_fleet(home, url: str, workers: int, work: Path) -> list[FleetProcess]:
    """The fleet server, alone (1 worker) or with `workers - 1` ingest workers on one shared subscription."""
    from edgeops.fleet.broker import free_port

    share = ["--share", SHARE] if workers > 1 else []
    procs = [FleetProcess(["serve", str(home.path), "--broker", url, "--http", f"127.0.0.1:{free_port()}", *share],
                          work / "fleet-serve.log")]
    for n in range(2, workers + 1):
        procs.append(FleetProcess(["ingest", str(home.path), "--broker", url, "--worker", str(n), *share],
                                  work / f"fleet-ingest-{n}.log"))
    for p in procs:
        p.wait_subscribed()
    return procs


# ---- phases ----


class Devices:
    """Device processes connected and subscribed, waiting for `go()`."""

    def __init__(self, ctx, url: str, creds: list[tuple], procs: int, first_seq: int, records: int,
                 batch: int, wait_acks: bool):
        self.ready, self.go_event = ctx.Queue(), ctx.Event()
        groups = _split(creds, procs)
        self.workers = Workers(ctx, _device_worker, [(url, g, first_seq, records, batch, wait_acks, self.go_event)
                                                     for g in groups], self.ready)
        connected = sum(self.ready.get(timeout=120) for _ in groups)
        if connected != len(creds):
            raise RuntimeError(f"only {connected} of {len(creds)} devices connected")

    def go(self) -> float:
        t0 = time.monotonic()
        self.go_event.set()
        return t0

    def pids(self) -> list[int]:
        return [p.pid for p in self.workers.procs]

    def close(self) -> int:
        """Stop the devices; how many batches they sent again for want of an ack."""
        self.workers.stop.set()
        resent = 0
        for _ in self.workers.procs:
            try:
                resent += self.ready.get(timeout=20)
            except Exception:
                break
        self.workers.close()
        return resent


def registry_count(path: Path, sql: str) -> int:
    """One number from the registry, read on a connection of its own (so never from an old snapshot)."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        return db.execute(sql).fetchall()[0][0]


def _cpu(pids: list[int]) -> float:
    return sum(cpu_seconds(p) for p in pids)


def raw_phase(ctx, home, url: str, creds, args, total: int, broker_pid: int) -> dict[str, float]:
    import paho.mqtt.client as mqtt

    from edgeops.fleet.mosquitto import worker_name
    from edgeops.protocol import wire
    from edgeops.protocol.mqtt import BrokerAddress

    count, lock, subscribed = [0], threading.Lock(), threading.Event()

    def on_message(client, userdata, message: mqtt.MQTTMessage) -> None:
        n = message.payload.count(b'"seq":')
        with lock:
            count[0] += n

    # Ingest worker 1's certificate (its client id is the certificate's name); a clean session, so
    # the broker keeps nothing for it once the phase ends.
    sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="raw-subscriber", clean_session=True,
                      protocol=mqtt.MQTTv311)
    address = BrokerAddress.parse(url)
    if address.tls:  # else a plaintext loopback baseline (tls_bench.py)
        sub.tls_set_context(home.client_tls(worker_name(1)).context())
    sub.connect_async(address.host, address.port)
    sub.on_connect = lambda c, *a: c.subscribe(f"{wire.PREFIX}/+/telemetry", 1)
    sub.on_subscribe = lambda *a: subscribed.set()
    sub.on_message = on_message
    sub.loop_start()
    devices = Devices(ctx, url, creds, args.procs, 1, args.records, args.batch, wait_acks=False)
    try:
        _wait(subscribed.is_set, "the raw subscriber to subscribe", 30)
        cpu0 = {"broker": _cpu([broker_pid]), "devices": _cpu(devices.pids()), "subscriber": time.process_time()}
        t0 = devices.go()
        _wait(lambda: count[0] >= total, f"{total} records at the raw subscriber", args.timeout, 0.01)
        elapsed = time.monotonic() - t0
        cpu = {"broker": _cpu([broker_pid]), "devices": _cpu(devices.pids()), "subscriber": time.process_time()}
        return {"seconds": elapsed, "records_per_s": total / elapsed, **{f"{k}_cpu_s": cpu[k] - cpu0[k] for k in cpu}}
    finally:
        devices.close()
        sub.loop_stop()
        sub.disconnect()


def edgeops_phase(ctx, home, url: str, creds, args, total: int, first_seq: int, workers: int, broker_pid: int,
                  work: Path) -> dict[str, float]:
    received = lambda: registry_count(home.db_path, "select coalesce(sum(received), 0) from telemetry_devices")  # noqa: E731
    this_phase = lambda: registry_count(home.db_path, f"select count(*) from telemetry where seq >= {first_seq}")  # noqa: E731
    fleet = start_fleet(home, url, workers, work)
    devices = Devices(ctx, url, creds, args.procs, first_seq, args.records, args.batch, wait_acks=True)
    try:
        early = this_phase()  # should be 0: devices publish only after the start signal
        fleet_pids = [p.proc.pid for p in fleet]
        cpu0 = {"broker": _cpu([broker_pid]), "devices": _cpu(devices.pids()), "fleet": _cpu(fleet_pids)}
        t0 = devices.go()
        _wait(lambda: this_phase() >= total, f"{total} records committed", args.timeout, 0.05)
        elapsed = time.monotonic() - t0
        cpu = {"broker": _cpu([broker_pid]), "devices": _cpu(devices.pids()), "fleet": _cpu(fleet_pids)}
        rss = sum(int(Path(f"/proc/{pid}/status").read_text().split("VmHWM:")[1].split()[0]) for pid in fleet_pids)
        result = {"seconds": elapsed, "records_per_s": (total - early) / elapsed, "fleet_peak_rss_mb": rss / 1024,
                  "stored_before_start": early,
                  **{f"{k}_cpu_s": cpu[k] - cpu0[k] for k in cpu}}
    finally:
        result_resent = devices.close()
        for p in fleet:
            p.stop()
    phase, stored, counted = this_phase(), registry_count(home.db_path, "select count(*) from telemetry"), received()
    if phase != total or counted != stored:
        raise RuntimeError(f"the registry holds {phase} records of this phase (expected {total}), "
                           f"and counted {counted} of {stored} in all")
    return {**result, "batches_resent": result_resent}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--devices", type=int, default=200)
    ap.add_argument("--records", type=int, default=1000, help="records each device forwards per phase")
    ap.add_argument("--batch", type=int, default=500, help="records per telemetry message at most (agent: 500)")
    ap.add_argument("--procs", type=int, default=2, help="processes the simulated devices are spread over")
    ap.add_argument("--workers", default="1,2", help="ingest worker counts to measure, e.g. 1,2")
    ap.add_argument("--timeout", type=float, default=300, help="seconds allowed per phase")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    from edgeops.fleet.broker import free_port
    from edgeops.fleet.home import init_fleet

    work = Path(tempfile.mkdtemp(prefix="edgeops-ingest-"))
    atexit.register(shutil.rmtree, work, True)  # registered first, so it runs after everything else stopped
    home = init_fleet(work / "fleet", f"mqtts://127.0.0.1:{free_port()}")
    creds = enroll_many(home, args.devices, {"bench": "ingest"})
    broker = start_mosquitto(home, work)
    ctx = mp.get_context("spawn")
    total = args.devices * args.records
    print(f"{args.devices} devices x {args.records} records, batches of <= {args.batch}, devices in {args.procs} "
          f"processes; Mosquitto {home.broker_url}; {os.cpu_count()} cores", flush=True)

    results = {"raw": raw_phase(ctx, home, home.broker_url, creds, args, total, broker.pid)}
    raw = results["raw"]["records_per_s"]
    print(f"raw Mosquitto -> plain subscriber: {raw:,.0f} records/s ({results['raw']['seconds']:.1f} s; CPU broker "
          f"{results['raw']['broker_cpu_s']:.1f} s, subscriber {results['raw']['subscriber_cpu_s']:.1f} s)", flush=True)
    for n, workers in enumerate(int(w) for w in args.workers.split(",")):
        r = edgeops_phase(ctx, home, home.broker_url, creds, args, total, 1 + (n + 1) * args.records, workers,
                          broker.pid, work)
        results[f"workers_{workers}"] = r
        print(f"edgeops ingest, {workers} worker(s): {r['records_per_s']:,.0f} records/s committed "
              f"({r['records_per_s'] / raw:.2f}x raw; {r['seconds']:.1f} s; CPU fleet {r['fleet_cpu_s']:.1f} s, "
              f"broker {r['broker_cpu_s']:.1f} s, devices {r['devices_cpu_s']:.1f} s; fleet peak RSS "
              f"{r['fleet_peak_rss_mb']:.0f} MB; {r['batches_resent']} batches resent"
              + (f"; {r['stored_before_start']} stored before the start, not counted" if r["stored_before_start"] else "")
              + ")", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"devices": args.devices, "records": args.records, "batch": args.batch,
                                         **results}, indent=2))


if __name__ == "__main__":
    main()
