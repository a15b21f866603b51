"""Broker restarts and network partitions on the real thing: agent processes serving the digits bundle
and making telemetry through real inferences (their local HTTP API), a fleet server, and a secured,
persistent Mosquitto, while a new release goes out.

- Mosquitto stopped with SIGTERM (it saves its state) or SIGKILL (it loses what it had not saved:
  sessions, queued messages, retained `desired`) while the release streams out and the agents make
  telemetry, and started again.
- A network partition between one agent and the broker, longer than the agent's small outbox can hold
  and longer than the MQTT keepalive: packets to and from the broker port the agent uses are dropped
  on loopback (nftables), so neither side sees the connection close; each must notice the silence
  through the keepalive. The fleet server keeps its own connection, so it pushes a release meanwhile.

Afterwards every device runs the new release, and per device the fleet's counters account exactly for
what the agent made (the highest seq of its outbox): received + dropped == made, each record stored
once, and the dropped ones are old (at or below the outbox's drop watermark). Without the agent
dropping paho's copies of earlier connections' telemetry publishes (agent/transport.py), 46 to 119
records per run were counted twice. The partition is cut while the agent makes and sends records, and
it goes on making them while it catches up, so its outbox drops records the fleet stored but had not
acknowledged; before the drop watermark (docs/protocol.md) those were counted both received and
dropped (received + dropped exceeded made by 2 to 39).

Needs Mosquitto, and for the partition root and `nft` (Debian: nftables). About 35 s.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from edgeops.agent import api_client
from edgeops.agent.partial import PartialDownload
from edgeops.fleet import registry, telemetry
from edgeops.fleet.home import enroll_device, push
from edgeops.fleet.plan import make_plan
from edgeops.fleet.server import FleetServer
from edgeops.protocol.bundle import atomic_write, canonical_json

sys.path.insert(0, str(Path(__file__).parent))
from fleetkit import FleetBroker, free_port, new_fleet, wait_for  # noqa: E402
from realparts import missing  # noqa: E402
from test_fleet_faults import FetchSpy, release_bundle  # noqa: E402
from test_telemetry_faults import ApiAgent  # noqa: E402

# All at once and no health gates: the agents serve traffic during the rollout, and on a loaded machine
# the new version's p95 latency may well exceed 1.5x the old one's, which rolls it back (as it should).
AT_ONCE = make_plan(stages="100%", bake=0, min_calls=0, abort="failed>100%",
                    gates={"max_error_increase": 1.0, "max_latency_ratio": 1e9, "drift": False})
MARKER = 7  # samples in the producer's last call (the others have 4)
KEEPALIVE_S = 2  # the partitioned agent's MQTT keepalive (default 30 s): a silent link is noticed in 2-4 s


class Producer:
    """Inferences through each agent's HTTP API, one call at a time, round robin, until stopped: the
    agents make telemetry throughout, and every call must be answered (the partition or a broker
    outage must never stop inference)."""

    def __init__(self, fleet: SimpleNamespace, pixels: np.ndarray):
        self.fleet, self.pixels = fleet, pixels
        self.calls = dict.fromkeys(fleet.devices, 0)
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.markers = 0

    def _run(self) -> None:
        i = 0
        try:
            while not self._stop.is_set():
                for device_id in self.fleet.devices:
                    start = i * 7 % (len(self.pixels) - 4)
                    answer = api_client.infer(self.fleet.dirs[device_id], {"pixels": self.pixels[start : start + 4]})
                    assert answer["outputs"]["probabilities"].shape == (4, 10)
                    self.calls[device_id] += 1
                    i += 1
        except BaseException as exc:  # reported by stop()
            self.error = exc

    def __enter__(self) -> "Producer":
        self._thread.start()
        return self

    def __exit__(self, kind, *exc_info) -> None:
        """Stopped before anything else reports: pytest's error report parses source with `ast`,
        which is no more thread-safe than np.load's (see test_telemetry_faults.infer_many); then, if
        all went well, marked."""
        self._stop.set()
        self._thread.join(30)
        if kind is None and self.error is None:
            self.mark()

    def mark(self) -> None:
        """Once stopped: one call per agent with MARKER samples. Once its record is at the
        fleet, the agent has committed every record the calls before it made (see `settled`)."""
        for device_dir in self.fleet.dirs.values():
            api_client.infer(device_dir, {"pixels": self.pixels[:MARKER]})
        self.markers += 1

    def wait_calls(self, more: int) -> None:
        """Until each agent answered `more` further calls."""
        target = {d: n + more for d, n in self.calls.items()}
        wait_for(lambda: self.error is not None or all(self.calls[d] >= n for d, n in target.items()),
                 f"{more} more inferences on each agent")
        assert self.error is None, f"an inference failed: {self.error!r}"



class Partition:
    """Every packet to or from `port` on this host dropped (nftables, on the input hook, so senders get
    no error: their packets vanish, as on a cut link), until `heal()`; or, first, only the messages from it."""

    def __init__(self, port: int):
        self.port, self.table = port, f"edgeops_partition_{os.getpid()}_{port}"

    def cut_messages(self) -> None:
        """Only the packets from `port` that carry data dropped (longer than a bare TCP ACK, 52 bytes
        with timestamps): the client's TCP still sees its data acknowledged, so what it sends arrives,
        and nothing it is sent does (acks, PINGRESP: it gives the connection up after its keepalive)."""
        self._nft(f"table ip {self.table} {{\n chain input {{\n type filter hook input priority 0; policy accept;\n"
                  f" tcp sport {self.port} ip length > 80 drop\n }}\n}}\n")

    def cut(self) -> None:
        """Every packet to or from `port` dropped (after `cut_messages` or not)."""
        self._nft(f"table ip {self.table} {{\n chain input {{\n type filter hook input priority 0; policy accept;\n"
                  f" }}\n}}\nadd rule ip {self.table} input tcp dport {self.port} drop\n"
                  f"add rule ip {self.table} input tcp sport {self.port} drop\n")

    @staticmethod
    def _nft(script: str) -> None:
        subprocess.run(["nft", "-f", "-"], input=script.encode(), check=True, capture_output=True)

    def heal(self) -> None:
        subprocess.run(["nft", "delete", "table", "ip", self.table], capture_output=True)


ESTABLISHED = "01"  # TCP states in /proc/net/tcp


def connections_to(port: int) -> set[str]:
    """The TCP states of this host's client sockets connected (or connecting) to `port`."""
    return {fields[3] for line in Path("/proc/net/tcp").read_text().splitlines()[1:]
            if int((fields := line.split())[2].rsplit(":", 1)[1], 16) == port}


def _nft_usable() -> None:
    if os.geteuid() != 0:
        missing("a network partition needs root (nftables rules)")
    if shutil.which("nft") is None:
        missing("nft is not installed (apt-get install nftables)")
    probe = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True)
    if probe.returncode != 0:
        missing(f"nft cannot manage rules here: {probe.stderr.strip()}")


def configure(device_dir: Path, **changes) -> None:
    """Edit device.json as an operator would: top-level `changes`, with "agent" options merged."""
    config = json.loads((device_dir / "device.json").read_text())
    config["agent"] = {**config.get("agent", {}), **changes.pop("agent", {})}
    atomic_write(device_dir / "device.json", canonical_json({**config, **changes}), mode=0o600)


def outbox(device_dir: Path, sql: str) -> int:
    """One number from the agent's outbox database, read as the agent runs (WAL: it never waits for us)."""
    db = sqlite3.connect(device_dir / "state" / "outbox.db", isolation_level=None)
    try:
        row = db.execute(sql).fetchone()
        return row[0] if row else 0
    finally:
        db.close()


def made(device_dir: Path) -> int:
    """Records the agent ever made: its outbox's highest seq (AUTOINCREMENT, never reused)."""
    return outbox(device_dir, "select seq from sqlite_sequence where name = 'records'")


def dropped(device_dir: Path, counter: str = "dropped") -> int:
    return outbox(device_dir, f"select value from counters where name = '{counter}'")


class AgentsPortBroker(FleetBroker):
    """The fleet's Mosquitto, with a second listener on `agent_port` (when set) secured like the first
    (TLS settings are per listener in Mosquitto 2; the ACL and the rest are global)."""

    agent_port: int | None = None

    def _write(self) -> Path:
        conf = super()._write()
        if self.agent_port:
            lines = conf.read_text().splitlines()
            tls = [line for line in lines if line.split(" ", 1)[0] in (
                "cafile", "certfile", "keyfile", "crlfile", "tls_version", "require_certificate", "use_identity_as_username")]
            with open(conf, "a") as fh:
                fh.write("\n".join([f"listener {self.agent_port} {self.bind}", *tls]) + "\n")
        return conf


@pytest.fixture
def fleet(tmp_path, digits_bundle):
    """`start(devices, agent_port=False, **agent_options)`: a fleet, a secured persistent Mosquitto
    (with a second listener for the agents when `agent_port`), a fleet server, release 1.0.0 active on
    every device, and 1.1.0 (padded to ~1.5 MB, so streaming it takes a moment) ready to push."""
    cleanup = []

    def start(devices: tuple[str, ...], agent_port: bool = False, **options) -> SimpleNamespace:
        home = new_fleet(tmp_path)
        dirs = {d: enroll_device(home, d, "x86-vnni", {}, tmp_path / d) for d in devices}
        broker = AgentsPortBroker(home, "127.0.0.1")
        # the agents' own way in, so a partition can cut them off and leave the fleet server
        broker.agent_port = free_port() if agent_port else None
        broker.start()
        cleanup.append(broker.stop)
        f = SimpleNamespace(home=home, devices=devices, dirs=dirs, broker=broker, agents={}, agent_port=broker.agent_port,
                            db=registry.open_db(home.db_path))
        for device_dir in dirs.values():
            broker_url = f"mqtts://127.0.0.1:{f.agent_port}" if agent_port else home.broker_url
            configure(device_dir, broker=broker_url, agent={"metrics_interval_s": 3600, **options})
        server = FleetServer(home, home.broker_url)
        f.spy = FetchSpy(server)
        cleanup.append(server.start().stop)
        v1 = release_bundle(digits_bundle.path, "1.0.0", tmp_path)
        f.v2 = release_bundle(digits_bundle.path, "1.1.0", tmp_path, padding=1_500_000)
        release = push(home, [v1], {}, plan=AT_ONCE)
        for device_id, device_dir in dirs.items():
            f.agents[device_id] = ApiAgent(device_dir)
            cleanup.append(f.agents[device_id].stop)
            f.agents[device_id].wait_serving()
        wait_converged(f, release, "1.0.0")
        return f

    yield start
    for stop in reversed(cleanup):
        stop()


def wait_converged(f: SimpleNamespace, release: int, version: str, timeout: float = 60) -> None:
    def done() -> bool:
        for device_id, agent in f.agents.items():
            assert agent.proc.poll() is None, f"{device_id} died:\n{agent.tail()}"
            states = [row["state"] for row in f.db["executions"].rows_where("device = ? and release_id = ?",
                                                                             [device_id, release])]
            if states != ["active"] or registry.device(f.db, device_id)["installed_version"] != version:
                return False
        return True

    try:
        wait_for(done, f"every device to run release {release} ({version})", timeout)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n" + "\n".join(f"--- {d}\n{a.tail()}" for d, a in f.agents.items())) from None


def stored(f: SimpleNamespace, device_id: str, kind: str | None = None) -> list[int]:
    """The seqs the fleet stored from `device_id` (of `kind`), in order."""
    where, args = ("and kind = ?", [kind]) if kind else ("", [])
    return [seq for (seq,) in f.db.execute(f"select seq from telemetry where device = ? {where} order by seq",
                                           [device_id, *args])]


def settled(f: SimpleNamespace, producer: Producer, device_id: str) -> bool:
    """The fleet has the record of the producer's latest marker call and the agent's outbox is empty:
    every record the agent made (it makes none but the calls' and one metrics record at start) was
    acknowledged or dropped, and nothing is in flight."""
    markers = f.db.execute("select count(*) from telemetry where device = ? and kind = 'inference' and "
                           "json_extract(body, '$.samples') = ?", [device_id, MARKER]).fetchone()[0]
    return markers == producer.markers and not outbox(f.dirs[device_id], "select count(*) from records")


def assert_accounted(f: SimpleNamespace, producer: Producer, timeout: float = 60) -> dict[str, dict[str, int]]:
    """Once every agent settled after the producer stopped: per device, received + dropped == made,
    each record stored once, and what is missing at the fleet is old: at or below the outbox's drop
    watermark (the agent's own counter may be higher: it also counts records it dropped after the
    fleet stored them). Returns the counts per device, with the agent's drop counter."""
    wait_for(lambda: all(settled(f, producer, d) for d in f.devices), "every record to reach the fleet or be dropped",
             timeout)
    result = {}
    for device_id, device_dir in f.dirs.items():
        total, seqs = made(device_dir), stored(f, device_id)
        counts = telemetry.counts(f.db, device_id)
        drops, watermark = dropped(device_dir), dropped(device_dir, "drop_watermark")
        assert len(seqs) == len(set(seqs)) == counts["received"], f"{device_id}: a record counted twice"
        assert counts["received"] + counts["dropped"] == total, (device_id, counts, total)
        lost = sorted(set(range(1, total + 1)) - set(seqs))
        assert len(lost) == counts["dropped"] <= drops, (device_id, counts, drops)
        assert not lost or lost[-1] <= watermark, f"{device_id}: seq {lost[-1]} is missing above the drop watermark {watermark}"
        result[device_id] = {**counts, "made": total, "agent_dropped": drops}
    return result


@pytest.fixture(scope="module")
def pixels(digits_model) -> np.ndarray:
    return np.load(digits_model.eval)["pixels"]


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGKILL], ids=["TERM", "kill-9"])
def test_broker_restart_during_a_release_and_telemetry(fleet, pixels, stop_signal):
    f = fleet(("dev-1", "dev-2"))
    with Producer(f, pixels) as producer:
        producer.wait_calls(20)
        f.spy.delay = 0.2  # per 128 KiB block: streaming the release takes a few seconds
        release = push(f.home, [f.v2], {}, plan=AT_ONCE)
        [target] = registry.releases(f.db)[-1]["targets"]
        parts = [d / "state" / "downloads" / f"{target['sha256']}.part" for d in f.dirs.values()]
        wait_for(lambda: any(p.exists() and PartialDownload(p, target["length"]).have for p in parts),
                 "the release to start streaming")
        f.broker.proc.send_signal(stop_signal)
        f.broker.proc.wait(10)
        producer.wait_calls(20)  # inference and telemetry go on while the broker is down
        f.spy.delay = 0
        f.broker.start()
        wait_converged(f, release, "1.1.0")
        producer.wait_calls(20)
    counts = assert_accounted(f, producer)
    assert all(c["dropped"] == 0 for c in counts.values()), counts  # the default outbox holds all of it


def test_partition_longer_than_the_outbox_and_the_keepalive(fleet, pixels):
    _nft_usable()
    f = fleet(("dev-1",), agent_port=True, outbox_bytes=20_000, keepalive_s=KEEPALIVE_S)
    [device_id] = f.devices
    partition = Partition(f.agent_port)
    with Producer(f, pixels) as producer:
        producer.wait_calls(10)
        # The cut comes as records are made and sent: first only the way back, until the fleet stored
        # records whose acks the cut swallows, so they stay in the agent's outbox, in flight.
        stored_before = telemetry.counts(f.db, device_id)["received"]
        partition.cut_messages()
        try:
            wait_for(lambda: telemetry.counts(f.db, device_id)["received"] > stored_before,
                     "the fleet to store records it cannot acknowledge")
            partition.cut()
            # Cut off while it goes on serving: records pile up past what its outbox holds ...
            wait_for(lambda: dropped(f.dirs[device_id]) > 0, "the outbox to overflow and drop its oldest records")
            release = push(f.home, [f.v2], {}, plan=AT_ONCE)
            # ... and both ends notice the silence through the keepalive: the broker ends the session (the
            # agent's last will says it is offline), the agent closes its connection and tries new ones.
            wait_for(lambda: not registry.device(f.db, device_id)["online"], "the broker to declare the agent gone")
            wait_for(lambda: ESTABLISHED not in connections_to(f.agent_port), "the agent to give up its silent connection")
            producer.wait_calls(20)
        finally:
            partition.heal()
        # The agent catches up while it goes on making records, which overflow its full outbox: it
        # drops the oldest, among them records it has sent again and the fleet stored but not yet acknowledged.
        wait_converged(f, release, "1.1.0")
        producer.wait_calls(20)
    counts = assert_accounted(f, producer)[device_id]
    assert counts["dropped"] > 0, counts
    assert counts["agent_dropped"] > counts["dropped"], f"nothing was dropped in flight: the test proves nothing {counts}"
