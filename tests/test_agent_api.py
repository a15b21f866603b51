"""The agent's local inference API (agent/http_api.py) and `edgeops agent infer`, on a real Agent
serving the real digits bundle: answers equal a bare onnxruntime session's, bad requests get a 4xx
with a reason and never stop the server, a model swap under live traffic drops no request, and every
in-process call is recorded in the outbox. The running agent is connected, with its device
certificate, to its fleet's own Mosquitto (mutual TLS); elsewhere its fleet's broker is unreachable."""

from __future__ import annotations

import http.client
import io
import json
import socket
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from edgeops.agent.http_api import MAX_BODY, NPY, NPZ, InferenceServer
from edgeops.agent.serving import InvalidInput, Serving
from edgeops.agent.service import Agent
from edgeops.cli import cli
from edgeops.fleet.home import FleetHome, enroll_device, init_fleet
from edgeops.protocol.bundle import read_bundle

sys.path.insert(0, str(Path(__file__).parent))
from fleetkit import DEADLINE_S, new_fleet, secured_mosquitto, wait_for  # noqa: E402


UNREACHABLE = "mqtts://127.0.0.1:1"  # a fleet broker no one listens on


def new_device(root: Path, fleet: FleetHome | str = UNREACHABLE) -> Path:
    """An enrolled device directory (device.json, its certificate and key, the fleet CA, pinned root)
    under `root`, of the fleet `fleet`, or of a new fleet under `root` whose broker URL is `fleet`."""
    home = fleet if isinstance(fleet, FleetHome) else init_fleet(root / "fleet", fleet)
    return enroll_device(home, "dev-api", "x86-vnni", {}, root / "device")


def reference(bundle: Path, pixels: np.ndarray) -> dict[str, np.ndarray]:
    """The bundle's model run by a bare onnxruntime session, as the agent configures it (one thread)."""
    b = read_bundle(bundle)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(b.members[b.manifest["model"]["file"]], options, providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, {"pixels": pixels})))


def request(url: str, method: str, path: str, body: bytes | None = None,
            headers: dict[str, str] | None = None) -> tuple[int, str, bytes]:
    """(status, content type, body) of one HTTP exchange with the agent's API."""
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        connection.request(method, path, body, headers or {})
        answer = connection.getresponse()
        return answer.status, answer.headers.get("Content-Type", ""), answer.read()
    finally:
        connection.close()


def npz(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def unpack_npz(data: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(data), allow_pickle=False) as loaded:
        return {name: loaded[name] for name in loaded.files}


def post_json(url: str, inputs: Any) -> tuple[int, dict[str, Any]]:
    status, _, body = request(url, "POST", "/v1/infer", json.dumps({"inputs": inputs}).encode(),
                              {"Content-Type": "application/json"})
    return status, json.loads(body)


@pytest.fixture(scope="module")
def pixels(digits_model) -> np.ndarray:
    return np.load(digits_model.eval)["pixels"][:16]


@pytest.fixture(scope="module")
def running(slot_releases, tmp_path_factory):
    """An Agent run as `edgeops agent run --api 127.0.0.1:0` does (in a thread, connected to its
    fleet's Mosquitto), with 1.0.0 installed in slot a and 1.1.0 in slot b, serving 1.1.0."""
    root = tmp_path_factory.mktemp("agent-api")
    home = new_fleet(root)
    broker = secured_mosquitto(home)
    device_dir = new_device(root, home)
    agent = Agent(device_dir)
    v1 = agent.slots.install(slot_releases.v1)
    v2 = agent.slots.install(slot_releases.v2)
    stop = threading.Event()
    thread = threading.Thread(target=agent.run, args=(stop, "127.0.0.1:0"), daemon=True)
    thread.start()
    api_json = device_dir / "state" / "api.json"
    wait_for(api_json.exists, "the agent to write state/api.json")
    url = json.loads(api_json.read_text())["url"]
    wait_for(lambda: request(url, "GET", "/v1/health")[0] == 200, "the agent's API to serve the model")
    yield SimpleNamespace(agent=agent, url=url, device_dir=device_dir, v1=v1, v2=v2, bundle=slot_releases.v1)
    stop.set()
    thread.join(timeout=DEADLINE_S)
    broker.stop()
    assert not thread.is_alive(), "the agent did not stop"
    assert not api_json.exists(), "a stopped agent must not leave its API address behind"


def test_json_npz_and_npy_answers_equal_a_bare_onnxruntime_session(running, pixels):
    want = reference(running.bundle, pixels)

    status, answer = post_json(running.url, {"pixels": pixels.tolist()})
    assert status == 200 and (answer["model"], answer["version"]) == (running.v2.manifest["name"], "1.1.0")
    assert sorted(answer["outputs"]) == sorted(want)
    for name, value in want.items():
        assert np.array_equal(np.asarray(answer["outputs"][name], dtype=value.dtype), value), name

    for kind, body in ((NPZ, npz(pixels=pixels)), (NPY, _npy(pixels))):
        status, content_type, data = request(running.url, "POST", "/v1/infer", body, {"Content-Type": kind})
        assert status == 200 and content_type == NPZ, data[:300]
        got = unpack_npz(data)
        assert sorted(got) == sorted(want)
        for name, value in want.items():
            assert got[name].dtype == value.dtype and np.array_equal(got[name], value), (kind, name)


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def test_model_endpoint_describes_what_is_served(running):
    status, _, body = request(running.url, "GET", "/v1/model")
    model = json.loads(body)
    manifest = running.v2.manifest
    assert status == 200
    assert (model["name"], model["version"], model["slot"]) == (manifest["name"], "1.1.0", running.v2.slot)
    assert model["inputs"] == manifest["inputs"] and model["outputs"] == manifest["outputs"]
    assert model["profile"] == "x86-vnni" and model["runtime"] == manifest["runtime"]


def test_health_is_503_until_a_model_is_served(running):
    serving = Serving()
    server = InferenceServer(serving, "127.0.0.1:0").start()
    try:
        status, _, body = request(server.url, "GET", "/v1/health")
        assert status == 503 and json.loads(body) == {"status": "no-model"}
        status, _, body = request(server.url, "GET", "/v1/model")
        assert status == 503 and "no model" in json.loads(body)["error"]
        status, answer = post_json(server.url, {"pixels": [[0.0] * 64]})
        assert status == 503 and "push a release" in answer["error"]

        serving.swap(running.v1)
        status, _, body = request(server.url, "GET", "/v1/health")
        assert status == 200
        assert json.loads(body) == {"status": "ok", "model": running.v1.manifest["name"], "version": "1.0.0",
                                    "slot": running.v1.slot}
    finally:
        server.stop()


class _Evil:
    """Unpickling this would create `marker`: proof that a request ran code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def _bad_requests(tmp_path: Path, pixels: np.ndarray) -> dict[str, tuple[bytes, str, int]]:
    """name -> (body, content type, expected status) of requests the API must refuse."""
    as_json = lambda value: json.dumps(value).encode()  # noqa: E731
    evil = np.array([_Evil(tmp_path / "pwned")], dtype=object)
    pickled_npy = io.BytesIO()
    np.save(pickled_npy, evil, allow_pickle=True)
    pickled_npz = io.BytesIO()
    np.savez(pickled_npz, pixels=evil)
    return {
        "wrong input name": (as_json({"inputs": {"pixel": pixels.tolist()}}), "application/json", 400),
        "extra input": (as_json({"inputs": {"pixels": pixels.tolist(), "more": [1]}}), "application/json", 400),
        "strings": (as_json({"inputs": {"pixels": [["a"] * 64]}}), "application/json", 400),
        "ragged": (as_json({"inputs": {"pixels": [[1.0] * 64, [1.0]]}}), "application/json", 400),
        "wrong shape": (as_json({"inputs": {"pixels": [[1.0] * 63]}}), "application/json", 400),
        "wrong rank": (as_json({"inputs": {"pixels": [1.0] * 64}}), "application/json", 400),
        "empty batch": (as_json({"inputs": {"pixels": []}}), "application/json", 400),
        "empty body": (b"", "application/json", 400),
        "not JSON": (b"{\"inputs\": ", "application/json", 400),
        "not UTF-8": (b"\xff\xfe\x00", "application/json", 400),
        "JSON list": (as_json([pixels.tolist()]), "application/json", 400),
        "inputs not an object": (as_json({"inputs": [1, 2]}), "application/json", 400),
        "strings in npz": (npz(pixels=np.array([["a"] * 64])), NPZ, 400),
        "wrong shape npy": (_npy(pixels[:, :32]), NPY, 400),
        "pickled npy": (pickled_npy.getvalue(), NPY, 400),
        "pickled npz": (pickled_npz.getvalue(), NPZ, 400),
        "npy as npz": (_npy(pixels), NPZ, 400),
        "garbage npy": (b"\x93NUMPY garbage", NPY, 400),
        "unknown content type": (as_json({"inputs": {"pixels": pixels.tolist()}}), "text/plain", 400),
    }


def assert_refused(status: int, content_type: str, body: bytes, expected: int, what: str) -> None:
    assert status == expected, (what, status, body[:300])
    assert content_type == "application/json", what
    reason = json.loads(body)["error"]
    assert isinstance(reason, str) and reason, what


def assert_still_serving(url: str, pixels: np.ndarray, what: str) -> None:
    status, answer = post_json(url, {"pixels": pixels[:2].tolist()})
    assert status == 200 and len(answer["outputs"]["label"]) == 2, f"after {what}: {status} {answer}"


def test_bad_requests_get_a_reason_and_the_server_keeps_serving(running, pixels, tmp_path):
    for what, (body, kind, expected) in _bad_requests(tmp_path, pixels).items():
        assert_refused(*request(running.url, "POST", "/v1/infer", body, {"Content-Type": kind}), expected, what)
        assert_still_serving(running.url, pixels, what)
    assert not (tmp_path / "pwned").exists(), "a pickled request ran code"

    for method, path, expected in (("POST", "/v1/nothing", 404), ("GET", "/nothing", 404), ("GET", "/v1/infer", 404)):
        assert_refused(*request(running.url, method, path, b"{}" if method == "POST" else None), expected, path)
        assert_still_serving(running.url, pixels, f"{method} {path}")


def test_body_size_is_checked_before_the_body_is_read(running, pixels):
    """A Content-Length over the limit is refused from the header alone; no body is ever sent."""
    host, port = running.url.removeprefix("http://").split(":")
    for length, expected in ((MAX_BODY + 1, 413), (None, 411), ("many", 411)):
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            header = "" if length is None else f"Content-Length: {length}\r\n"
            sock.sendall(f"POST /v1/infer HTTP/1.1\r\nHost: x\r\nContent-Type: {NPZ}\r\n{header}\r\n".encode())
            answer = b""
            while chunk := sock.recv(65536):  # the server answers and closes without waiting for a body
                answer += chunk
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.split(b" ")[1] == str(expected).encode(), (length, head)
        assert str(MAX_BODY) in json.loads(body)["error"]
        assert_still_serving(running.url, pixels, f"Content-Length {length}")


@pytest.mark.parametrize("damage", ["truncated", "bad crc"])
def test_damaged_npz_gets_a_400(running, pixels, damage):
    data = bytearray(npz(pixels=pixels))
    if damage == "truncated":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 3] ^= 0xFF  # inside the stored (uncompressed) member
    try:
        answer = request(running.url, "POST", "/v1/infer", bytes(data), {"Content-Type": NPZ})
    finally:
        assert_still_serving(running.url, pixels, f"{damage} npz")
    assert_refused(*answer, 400, f"{damage} npz")


def test_swap_under_live_traffic_drops_no_request(running, pixels):
    """Client threads post without pause while the served model is swapped back and forth: every
    request is answered 200 by one of the two versions, with the right numbers."""
    want = reference(running.bundle, pixels[:4])
    body = npz(pixels=pixels[:4])
    stop = threading.Event()
    answers: list[tuple[int, str | None, float]] = []
    failures: list[str] = []
    lock = threading.Lock()

    def client() -> None:
        host, port = running.url.removeprefix("http://").split(":")
        connection = http.client.HTTPConnection(host, int(port), timeout=30)  # keep-alive, as apps do
        while not stop.is_set():
            try:
                connection.request("POST", "/v1/infer", body, {"Content-Type": NPZ})
                answer = connection.getresponse()
                data = answer.read()
                version = answer.headers.get("X-Edgeops-Version")
                if answer.status != 200 or not all(np.array_equal(unpack_npz(data)[k], v) for k, v in want.items()):
                    failures.append(f"{answer.status} {version} {data[:200]!r}")
                with lock:
                    answers.append((answer.status, version, time.monotonic()))
            except Exception as exc:  # a dropped request: recorded, the thread carries on
                failures.append(repr(exc))
                connection.close()
                connection = http.client.HTTPConnection(host, int(port), timeout=30)
        connection.close()

    threads = [threading.Thread(target=client, daemon=True) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        for turn in range(8):
            target = (running.v1, running.v2)[turn % 2]
            version = target.manifest["version"]
            swapped_at = time.monotonic()
            running.agent.serving.swap(target)

            def served_after_swap(version: str = version, swapped_at: float = swapped_at) -> bool:
                with lock:
                    return sum(1 for _, v, t in answers if v == version and t > swapped_at) >= 20

            wait_for(lambda: served_after_swap() or failures, f"requests answered by {version} after swap {turn}")
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=DEADLINE_S)
        running.agent.serving.swap(running.v2)
    assert not failures, failures[:5]
    assert {v for _, v, _ in answers} == {"1.0.0", "1.1.0"} and {s for s, _, _ in answers} == {200}
    assert len(answers) >= 8 * 20


def test_cli_infer_prints_model_and_outputs(running, pixels, tmp_path):
    want = reference(running.bundle, pixels[:5])
    x = tmp_path / "x.npz"
    np.savez(x, pixels=pixels[:5])

    result = CliRunner().invoke(cli, ["agent", "infer", str(running.device_dir), "--input", str(x)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == f"{running.v2.manifest['name']} 1.1.0"
    assert "  label: int64 [5]" in lines
    assert f"  probabilities: float32 [5, 10] class {want['probabilities'].argmax(1).tolist()}" in lines

    for path in (x, tmp_path / "x.npy"):
        if path.suffix == ".npy":
            np.save(path, pixels[:5])
        result = CliRunner().invoke(cli, ["agent", "infer", str(running.device_dir), "--input", str(path), "--json"])
        assert result.exit_code == 0, result.output
        answer = json.loads(result.output)
        assert (answer["model"], answer["version"]) == (running.v2.manifest["name"], "1.1.0")
        for name, value in want.items():
            assert np.array_equal(np.asarray(answer["outputs"][name], dtype=value.dtype), value), (path, name)


def test_cli_infer_refuses_input_the_model_cannot_take(running, pixels, tmp_path, cli_error):
    x = tmp_path / "x.npz"
    np.savez(x, pixel=pixels[:1])
    line = cli_error("agent", "infer", running.device_dir, "--input", x)
    assert "refused" in line and "missing input(s) pixels" in line


def test_cli_infer_without_a_running_agent_says_to_start_one(tmp_path, pixels, cli_error):
    x = tmp_path / "x.npz"
    np.savez(x, pixels=pixels[:1])
    device_dir = new_device(tmp_path)
    line = cli_error("agent", "infer", device_dir, "--input", x)
    assert f"edgeops agent run {device_dir}" in line

    # An agent that died without cleaning up: its address is stale.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    (device_dir / "state").mkdir(exist_ok=True)
    (device_dir / "state" / "api.json").write_text(json.dumps({"url": f"http://127.0.0.1:{closed}"}))
    line = cli_error("agent", "infer", device_dir, "--input", x)
    assert "cannot reach" in line and f"edgeops agent run {device_dir}" in line


def test_agent_infer_records_each_call(slot_releases, pixels, tmp_path):
    agent = Agent(new_device(tmp_path))
    agent.serving.swap(agent.slots.install(slot_releases.v1))
    manifest = agent.serving.served.manifest
    sizes = [1, 3, 16, 2, 5, 1, 7]
    outputs = [agent.infer({"pixels": pixels[:n]}) for n in sizes]
    with pytest.raises(InvalidInput):  # refused before the model runs, and recorded as an error
        agent.infer({"pixels": pixels[:1, :10]})

    assert agent.telemetry.flush() == len(sizes) + 1
    *records, refused = agent.telemetry.outbox.pending(1000)
    assert [r.kind for r in records] == ["inference"] * len(sizes)
    body = json.loads(refused.body)
    assert (refused.kind, body["ok"], body["version"]) == ("inference", False, "1.0.0")
    assert body["error"].startswith("invalid input: input pixels has shape [1, 10]")
    seqs = [r.seq for r in records]
    assert seqs == sorted(set(seqs)) and [r.t for r in records] == sorted(r.t for r in records)
    for record, n, out in zip(records, sizes, outputs):
        body = json.loads(record.body)
        assert (body["model"], body["version"], body["ok"], body["samples"]) == (manifest["name"], "1.0.0", True, n)
        assert isinstance(body["latency_ms"], float) and body["latency_ms"] > 0
        assert body["classes"] == out["probabilities"].argmax(1).tolist() == out["label"].tolist()
        assert np.allclose(body["confidences"], out["probabilities"].max(1), atol=1e-4)
    assert agent.telemetry.flush() == 0  # each call recorded once
    agent.telemetry.outbox.close()
