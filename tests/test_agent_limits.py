"""The agent's inference API under attack, on a real `edgeops agent run` process serving the real
digits bundle (agent/http_api.py, docs/agent.md "Limits"): an .npz zip bomb, zip members that lie
about their size, an .npy header declaring 10^9 x 64 floats, a 60 MiB JSON batch, deep nesting,
NaN/Infinity, more concurrent requests than allowed and 2,000 requests at 20 concurrent. Each gets
its status with a reason, the agent keeps serving and forwarding telemetry, and its peak RSS
(VmHWM) stays within its idle RSS + 100 MB. And SIGTERM stops an agent within 5 s whatever its
broker does: a closed port, a blackhole that accepts and never answers (not even the TLS handshake),
a fleet silent mid-fetch. The agent connects with its device certificate to its fleet's own
Mosquitto (mutual TLS); the fleet stand-in uses the fleet's certificate.
"""

from __future__ import annotations

import http.client
import io
import json
import signal
import socket
import subprocess
import sys
import threading
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import paho.mqtt.client as mqtt
import pytest

from edgeops.agent.http_api import MAX_BODY, NPY, NPZ, InferenceServer
from edgeops.agent.serving import Limits, Serving
from edgeops.agent.service import Agent
from edgeops.agent.slots import SlotStore
from edgeops.fleet.home import FleetHome
from edgeops.protocol import wire
from edgeops.protocol.bundle import atomic_write, canonical_json
from edgeops.protocol.errors import EdgeopsError
from edgeops.protocol.mqtt import BrokerAddress

sys.path.insert(0, str(Path(__file__).parent))
from fleetkit import DEADLINE_S, new_fleet, secured_mosquitto, wait_for  # noqa: E402
from test_agent_api import assert_refused, assert_still_serving, new_device, npz, post_json, request  # noqa: E402

DEVICE = "dev-api"  # what new_device enrolls
HEADROOM_KB = 100 * 1024  # the agent's peak RSS may exceed its idle RSS by this much, no more
STOP_DEADLINE_S = 5.0


def npy_header(shape: tuple[int, ...], dtype: str = "<f4") -> bytes:
    """The magic and header of an .npy holding `shape` (the data is up to the caller)."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": dtype, "fortran_order": False, "shape": shape})
    return buffer.getvalue()


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def deflated_zeros(header: bytes, zeros: int) -> bytes:
    """An .npz with one member, pixels.npy: `header` then `zeros` zero bytes, deflated as it is written."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        with archive.open("pixels.npy", "w", force_zip64=zeros > 2**31) as member:
            member.write(header)
            chunk = bytes(1 << 20)
            for _ in range(zeros >> 20):
                member.write(chunk)
    return buffer.getvalue()


def declare_size(archive: bytes, size: int) -> bytes:
    """`archive` (one member, no zip64) with the member's uncompressed size set to `size` in its
    local header and central directory entry: a member that lies about how much it inflates to."""
    data = bytearray(archive)
    local, central = data.index(b"PK\x03\x04"), data.index(b"PK\x01\x02")
    data[local + 22:local + 26] = data[central + 24:central + 28] = size.to_bytes(4, "little")
    return bytes(data)


def memory_kb(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of process `pid`, in kB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return {key: int(fields[key].split()[0]) for key in ("VmRSS", "VmHWM")}


def raw_post(url: str, kind: str, length: int, body: bytes = b"") -> tuple[int, dict[str, str], dict]:
    """POST headers declaring `length` and then `body` (maybe less) on a raw socket; the answer,
    which the server gives without reading the rest."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(f"POST /v1/infer HTTP/1.1\r\nHost: x\r\nContent-Type: {kind}\r\nContent-Length: {length}\r\nConnection: close\r\n\r\n".encode()
                     + body)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, data = answer.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, json.loads(data)


class Fleetless:
    """A paho client on the device's broker, with the fleet's own certificate, that acknowledges its
    telemetry as the fleet does (wire.telemetry_ack), so the outbox keeps moving, and keeps what it
    received."""

    def __init__(self, home: FleetHome):
        address = BrokerAddress.parse(home.broker_url)
        self.records: list[dict] = []
        self.states: list[dict] = []
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="limits-test")
        self.client.tls_set_context(home.client_tls().context())
        self.client.on_message = self._on_message
        self.client.connect(address.host, address.port)
        self.client.subscribe([(wire.topic(DEVICE, "telemetry"), 1), (wire.topic(DEVICE, "state"), 1)])
        self.client.loop_start()

    def _on_message(self, client, userdata, message) -> None:
        payload = json.loads(message.payload)
        if message.topic.endswith("/state"):
            self.states.append(payload)
            return
        self.records.extend(payload["records"])
        client.publish(wire.topic(DEVICE, "acks"), wire.telemetry_ack([r["seq"] for r in payload["records"]]), qos=1)

    def stop(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


class AgentRun:
    """`python -m edgeops agent run DEVICE_DIR --api 127.0.0.1:0`; its log in DEVICE_DIR/agent.log."""

    def __init__(self, device_dir: Path):
        self.device_dir, self.log = device_dir, device_dir / "agent.log"
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "edgeops", "-v", "agent", "run", str(device_dir),
                                          "--api", "127.0.0.1:0"], stdout=log, stderr=subprocess.STDOUT)

    def url(self) -> str:
        path = self.device_dir / "state" / "api.json"

        def found() -> str | None:
            assert self.proc.poll() is None, f"the agent died:\n{self.log.read_text()[-3000:]}"
            try:
                return json.loads(path.read_text())["url"]
            except (OSError, ValueError):
                return None

        return wait_for(found, "the agent to serve its inference API")

    def sigterm_stops_it(self) -> float:
        """Seconds from SIGTERM to exit; fails past STOP_DEADLINE_S."""
        start = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(STOP_DEADLINE_S)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"SIGTERM did not stop the agent within {STOP_DEADLINE_S}s:\n"
                                 f"{self.log.read_text()[-3000:]}") from None
        assert code == 0, self.log.read_text()[-3000:]
        return time.monotonic() - start

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture(scope="module")
def pixels(digits_model) -> np.ndarray:
    return np.load(digits_model.eval)["pixels"][:16]


@pytest.fixture(scope="module")
def served(slot_releases, pixels, tmp_path_factory):
    """A real agent process with the digits bundle installed, its fleet's Mosquitto (mutual TLS), a
    fleet stand-in acking its telemetry, and its idle RSS measured after a warm-up."""
    root = tmp_path_factory.mktemp("agent-limits")
    home = new_fleet(root)
    broker = secured_mosquitto(home)
    device_dir = new_device(root, home)
    SlotStore(device_dir / "state").install(slot_releases.v1)
    fleet = Fleetless(home)
    agent = AgentRun(device_dir)
    try:
        url = agent.url()
        wait_for(lambda: request(url, "GET", "/v1/health")[0] == 200, "the agent to serve the model")
        for n in range(1, 21):  # warm up every path, so what follows measures only the attacks
            assert post_json(url, {"pixels": pixels[:n % 16 + 1].tolist()})[0] == 200
            assert request(url, "POST", "/v1/infer", npz(pixels=pixels[:n % 16 + 1]), {"Content-Type": NPZ})[0] == 200
            assert request(url, "POST", "/v1/infer", npy(pixels[:n % 16 + 1]), {"Content-Type": NPY})[0] == 200
        idle = memory_kb(agent.proc.pid)
        print(f"agent idle: {idle}")
        yield SimpleNamespace(url=url, agent=agent, fleet=fleet, idle=idle, device_dir=device_dir)
    finally:
        agent.stop()
        fleet.stop()
        broker.stop()


def assert_bounded(served: SimpleNamespace, what: str) -> None:
    now = memory_kb(served.agent.proc.pid)
    print(f"after {what}: {now} (idle VmRSS {served.idle['VmRSS']} kB)")
    assert now["VmHWM"] <= served.idle["VmRSS"] + HEADROOM_KB, (what, now, served.idle)


def test_npz_zip_bomb_is_refused_before_it_is_inflated(served, pixels):
    """0.95 MiB of deflated zeros declaring float32 [4,000,000, 64] (1 GiB)."""
    bomb = deflated_zeros(npy_header((4_000_000, 64)), 4_000_000 * 64 * 4)
    assert len(bomb) < 1.1 * 2**20
    assert_refused(*request(served.url, "POST", "/v1/infer", bomb, {"Content-Type": NPZ}), 413, "zip bomb")
    assert_still_serving(served.url, pixels, "a zip bomb")
    assert_bounded(served, "a zip bomb")


@pytest.mark.parametrize("lie", ["member inflates past its declared size", "header declares 4,000,000 samples"])
def test_a_zip_member_that_lies_about_its_size_is_never_inflated_past_it(served, pixels, lie):
    if lie == "member inflates past its declared size":  # declared as 16 samples; inflates to 512 MiB
        header = npy_header((16, 64))
        archive, expected = declare_size(deflated_zeros(header, 512 * 2**20), len(header) + 16 * 64 * 4), 400
    else:  # declared as 1 MiB; its .npy header says 1 GiB
        archive, expected = declare_size(deflated_zeros(npy_header((4_000_000, 64)), 2**30), 2**20), 413
    assert_refused(*request(served.url, "POST", "/v1/infer", archive, {"Content-Type": NPZ}), expected, lie)
    assert_still_serving(served.url, pixels, lie)
    assert_bounded(served, lie)


def test_npy_header_declaring_a_billion_samples_is_refused(served, pixels):
    body = npy_header((10**9, 64)) + bytes(64 * 4 * 16)
    assert_refused(*request(served.url, "POST", "/v1/infer", body, {"Content-Type": NPY}), 413, "10^9 x 64 npy")
    short = npy_header((16, 64)) + bytes(100)  # a header promising more than the body holds
    assert_refused(*request(served.url, "POST", "/v1/infer", short, {"Content-Type": NPY}), 400, "short npy")
    assert_still_serving(served.url, pixels, "an npy header declaring 10^9 x 64")
    assert_bounded(served, "an npy header declaring 10^9 x 64")


def test_big_json_batches_are_refused_in_bounded_memory(served, pixels):
    status, _, answer = raw_post(served.url, "application/json", int(59.5 * 2**20))  # refused from its header
    assert status == 413 and "send fewer samples" in answer["error"], answer
    numbers = b'{"inputs": {"pixels": [' + b"0," * (1_500_000 - 1) + b"0]}}"  # 3 MB: within the body limit
    rows = json.dumps({"inputs": {"pixels": np.tile(pixels, (125, 1)).tolist()}}).encode()  # 2,000 samples
    for what, body in (("1.5M numbers", numbers), ("2,000 samples", rows)):
        status, kind, answer = request(served.url, "POST", "/v1/infer", body, {"Content-Type": "application/json"})
        assert_refused(status, kind, answer, 413, what)
        assert_still_serving(served.url, pixels, what)
    assert_bounded(served, "big JSON batches")


def test_deep_json_nesting_is_refused(served, pixels):
    for depth in (5, 100_000):
        body = b'{"inputs": {"pixels": ' + b"[" * depth + b"0" + b"]" * depth + b"}}"
        status, kind, answer = request(served.url, "POST", "/v1/infer", body, {"Content-Type": "application/json"})
        assert_refused(status, kind, answer, 400, f"depth {depth}")
        assert "nests deeper than 4" in json.loads(answer)["error"]
    assert_still_serving(served.url, pixels, "deep nesting")
    assert_bounded(served, "deep nesting")


def test_nan_and_infinity_are_refused_by_default(served, pixels):
    for value in ("NaN", "Infinity", "-Infinity"):
        body = json.dumps({"inputs": {"pixels": pixels[:2].tolist()}}).replace("0.0", value, 1).encode()
        status, kind, answer = request(served.url, "POST", "/v1/infer", body, {"Content-Type": "application/json"})
        assert_refused(status, kind, answer, 400, value)
        assert "NaN or Infinity" in json.loads(answer)["error"]
    broken = pixels[:2].copy()
    broken[1, 5] = np.inf
    assert_refused(*request(served.url, "POST", "/v1/infer", npz(pixels=broken), {"Content-Type": NPZ}), 400, "inf in npz")
    assert_still_serving(served.url, pixels, "NaN and Infinity")


def test_nan_and_infinity_are_served_with_the_setting_and_refusals_are_recorded(slot_releases, pixels, tmp_path):
    active = SlotStore(tmp_path / "state").install(slot_releases.v1)
    broken = pixels[:2].copy()
    broken[0, 3] = np.nan
    for allow, expected in ((False, 400), (True, 200)):
        seen = []
        serving = Serving(seen.append, limits=Limits(allow_nonfinite=allow))
        serving.swap(active)
        server = InferenceServer(serving, "127.0.0.1:0").start()
        try:
            status, answer = post_json(server.url, {"pixels": broken.tolist()})
        finally:
            server.stop()
        assert status == expected, answer
        assert [o.error is None for o in seen] == [allow]
        if not allow:
            assert seen[0].error.startswith("invalid input: input pixels holds NaN or Infinity")


def test_limits_come_from_device_json(tmp_path):
    device_dir = new_device(tmp_path)
    config = json.loads((device_dir / "device.json").read_text())
    for agent_options, expected in (({"allow_nonfinite": True, "max_batch": 8, "max_concurrent": 2},
                                     Limits(max_batch=8, max_concurrent=2, allow_nonfinite=True)),
                                    ({}, Limits())):
        atomic_write(device_dir / "device.json", canonical_json({**config, "agent": agent_options}), mode=0o600)
        agent = Agent(device_dir)
        assert agent.serving.limits == expected
        agent.telemetry.outbox.close()
    atomic_write(device_dir / "device.json", canonical_json({**config, "agent": {"max_batch": 0}}), mode=0o600)
    with pytest.raises(EdgeopsError, match="max_batch must be 1 to"):
        Agent(device_dir)


def test_requests_past_max_concurrent_get_429_with_retry_after(served, pixels):
    """Limits().max_concurrent requests send half their body and hold their slots; the next one
    waits, then gets 429; the held ones, completed, are served."""
    body = npz(pixels=pixels[:4])
    host, port = served.url.removeprefix("http://").split(":")
    held = []
    try:
        for _ in range(Limits().max_concurrent):
            sock = socket.create_connection((host, int(port)), timeout=30)
            sock.sendall(f"POST /v1/infer HTTP/1.1\r\nHost: x\r\nContent-Type: {NPZ}\r\n"
                         f"Content-Length: {len(body)}\r\n\r\n".encode() + body[:100])
            held.append(sock)

        def refused() -> tuple | None:
            status, headers, answer = raw_post(served.url, NPZ, len(body), body)
            return (headers, answer) if status == 429 else None

        headers, answer = wait_for(refused, "a request past max_concurrent to get 429")
        assert headers["Retry-After"] == "1" and "requests are in progress" in answer["error"], (headers, answer)
        for sock in held:
            sock.sendall(body[100:])
            assert sock.recv(65536).startswith(b"HTTP/1.1 200 "), "a held request was not served"
    finally:
        for sock in held:
            sock.close()
    assert_still_serving(served.url, pixels, "429s")


def test_2000_requests_at_20_concurrent_get_no_connection_reset(served, pixels):
    """Each request on a new connection, 20 at a time: the listen backlog holds the bursts."""
    bodies = [(json.dumps({"inputs": {"pixels": pixels[:2].tolist()}}).encode(), "application/json"),
              (npz(pixels=pixels[:2]), NPZ)]
    host, port = served.url.removeprefix("http://").split(":")

    def one(i: int) -> int | str:
        body, kind = bodies[i % 2]
        connection = http.client.HTTPConnection(host, int(port), timeout=60)
        try:
            connection.request("POST", "/v1/infer", body, {"Content-Type": kind})
            answer = connection.getresponse()
            answer.read()
            return answer.status
        except OSError as exc:
            return repr(exc)
        finally:
            connection.close()

    with ThreadPoolExecutor(20) as pool:
        results = list(pool.map(one, range(2000)))
    failures = [r for r in results if not isinstance(r, int)]
    statuses = {s: results.count(s) for s in set(results) if isinstance(s, int)}
    print(f"2000 requests at 20 concurrent: {statuses}")
    assert not failures, failures[:5]
    assert set(statuses) <= {200, 429} and statuses.get(200, 0) >= 1900, statuses
    assert_bounded(served, "2000 requests at 20 concurrent")


def test_after_the_attacks_memory_stayed_bounded_and_telemetry_still_flows(served, pixels):
    assert_bounded(served, "all the attacks")
    marked = time.time()
    status, answer = post_json(served.url, {"pixels": pixels[:7].tolist()})
    assert status == 200

    def forwarded() -> bool:
        return any(r["kind"] == "inference" and r["t"] >= marked and r["body"].get("samples") == 7
                   for r in list(served.fleet.records))

    wait_for(forwarded, "the agent to forward the inference made after the attacks")


# ---- SIGTERM, whatever the broker does


def blackhole() -> tuple[int, list[socket.socket]]:
    """A TCP server that accepts connections and never answers: (its port, the connections accepted)."""
    server = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []
    threading.Thread(target=lambda: [accepted.append(server.accept()[0]) for _ in iter(int, 1)], daemon=True).start()
    return server.getsockname()[1], accepted


def closed_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as server:
        return server.getsockname()[1]


@pytest.mark.parametrize("broker", ["closed port", "blackhole"])
def test_sigterm_stops_an_agent_whose_broker_is_unreachable(tmp_path, broker):
    if broker == "blackhole":
        port, accepted = blackhole()
    else:
        port, accepted = closed_port(), None
    agent = AgentRun(new_device(tmp_path, f"mqtts://127.0.0.1:{port}"))
    try:
        agent.url()
        if accepted is not None:
            wait_for(lambda: accepted, "the agent to connect to the blackhole")
        print(f"{broker}: stopped in {agent.sigterm_stops_it():.2f}s")
    finally:
        agent.stop()


def test_sigterm_stops_an_agent_waiting_on_a_silent_fleet(slot_releases, tmp_path):
    """The broker is up, the fleet is not: the agent asks for a release's metadata and waits."""
    home = new_fleet(tmp_path)
    broker = secured_mosquitto(home)
    fleet = Fleetless(home)
    agent = None
    try:
        fleet.client.publish(wire.topic(DEVICE, "desired"), wire.encode({"release_id": 1, "target": slot_releases.v1.name}),
                             qos=1, retain=True).wait_for_publish(DEADLINE_S)
        agent = AgentRun(new_device(tmp_path, home))
        wait_for(lambda: any((s.get("execution") or {}).get("state") == "downloading" for s in list(fleet.states)),
                 "the agent to start fetching the release")
        print(f"silent fleet: stopped in {agent.sigterm_stops_it():.2f}s")
    finally:
        if agent is not None:
            agent.stop()
        fleet.stop()
        broker.stop()
