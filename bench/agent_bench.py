"""Agent benchmarks, each against a baseline measured in the same run (2-core machines are noisy).

    python bench/agent_bench.py [--bundle X.edgeops] [--calls 2000] [--json out.json]

- in-process inference: `Agent.infer()` (validation + recording) vs a bare onnxruntime
  `session.run` on the same model and input, interleaved call by call. Goal: overhead <= 5 %.
- local HTTP: POST /v1/infer (JSON and .npz bodies) vs in-process `Agent.infer()`: p50 and p99.
- outbox: records/s appended in the recorder's group commits (synchronous=FULL). Goal: >= 20,000/s.
- idle memory: RSS of `edgeops agent run` (a subprocess) serving the small demo model, after
  it installed it and settled. Goal: <= 100 MB.

Without --bundle it builds the small demo MLP (edgeops.examples) for x86-vnni.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np


def build_bundle(work: Path) -> Path:
    from edgeops.compiler.build import BuildRequest, build
    from edgeops.examples import train_digits_mlp

    m = train_digits_mlp(work / "model")
    return Path(build(BuildRequest(m.onnx, "x86-vnni", m.calib, m.eval, name="digits", version="1.0.0",
                                   outdir=work / "release"))["bundle"])


def device(work: Path, bundle: Path, home=None, device_id: str = "bench"):
    """An enrolled device dir (`work/device_id`) with `bundle` installed; without `home`, of a fleet whose
    broker is never dialed (the device only serves)."""
    from edgeops.agent.service import Agent
    from edgeops.fleet.home import enroll_device, init_fleet
    from edgeops.protocol.bundle import read_bundle

    profile = read_bundle(bundle).manifest["profile"]
    home = home or init_fleet(work / "fleet", "mqtts://127.0.0.1:1")
    enroll_device(home, device_id, profile, {}, work / device_id)
    agent = Agent(work / device_id)
    agent.slots.install(bundle)
    agent.serving.swap(agent.slots.active())
    return agent


def sample_input(agent) -> dict[str, np.ndarray]:
    from edgeops.protocol.bundle import read_bundle

    arrays = read_bundle(agent.slots.active().path).selftest()
    return {k.removeprefix("input/"): v[:1] for k, v in arrays.items() if k.startswith("input/")}


def inference_overhead(agent, feed, calls: int) -> dict[str, float]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = 1, 1
    session = ort.InferenceSession(str(agent.slots.active().model_path), options, providers=["CPUExecutionProvider"])
    bare, ours = [], []
    for _ in range(50):  # warm both
        session.run(None, feed)
        agent.infer(feed)
    for _ in range(calls):  # interleaved, so drifts in machine load hit both alike
        t = time.perf_counter()
        session.run(None, feed)
        bare.append(time.perf_counter() - t)
        t = time.perf_counter()
        agent.infer(feed)
        ours.append(time.perf_counter() - t)
    b, o = statistics.median(bare), statistics.median(ours)
    return {"bare_us": b * 1e6, "agent_us": o * 1e6, "overhead": o / b - 1}


def http_latency(agent, feed, calls: int) -> dict[str, float]:
    from edgeops.agent.http_api import NPZ, InferenceServer

    server = InferenceServer(agent.serving, "127.0.0.1:0").start()
    try:
        buffer = io.BytesIO()
        np.savez(buffer, **feed)
        bodies = {"json": (json.dumps({"inputs": {k: v.tolist() for k, v in feed.items()}}).encode(), "application/json"),
                  "npz": (buffer.getvalue(), NPZ)}
        result = {}
        for name, (body, kind) in bodies.items():
            times = []
            for _ in range(calls):
                request = urllib.request.Request(f"{server.url}/v1/infer", body, {"Content-Type": kind}, method="POST")
                t = time.perf_counter()
                with urllib.request.urlopen(request) as answer:
                    answer.read()
                times.append(time.perf_counter() - t)
            times.sort()
            result[f"{name}_p50_ms"] = times[len(times) // 2] * 1e3
            result[f"{name}_p99_ms"] = times[int(len(times) * 0.99)] * 1e3
        inproc = []
        for _ in range(calls):
            t = time.perf_counter()
            agent.infer(feed)
            inproc.append(time.perf_counter() - t)
        inproc.sort()
        result["inprocess_p50_ms"] = inproc[len(inproc) // 2] * 1e3
        result["inprocess_p99_ms"] = inproc[int(len(inproc) * 0.99)] * 1e3
        return result
    finally:
        server.stop()


def outbox_throughput(work: Path, seconds: float = 3.0) -> dict[str, float]:
    from edgeops.agent.outbox import Outbox

    outbox = Outbox(work / "outbox-bench.db", 64 * 1024 * 1024)
    body = json.dumps({"model": "digits", "version": "1.0.0", "latency_ms": 0.1234, "ok": True,
                       "samples": 1, "classes": [3], "confidences": [0.98]}, separators=(",", ":"))
    per_commit = 1000  # ~50 ms of records at 20 k/s: what the recorder commits at a time
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        outbox.append([("inference", time.time(), body)] * per_commit)
        count += per_commit
    return {"records_per_s": count / (time.perf_counter() - start), "records_per_commit": per_commit}


def idle_memory(device_dir: Path, settled=None) -> dict[str, float]:
    """RSS of `edgeops agent run DEVICE_DIR` serving, 3 s after it serves (and `settled(pid)` holds, if given)."""
    proc = subprocess.Popen([sys.executable, "-m", "edgeops", "agent", "run", str(device_dir), "--api", "127.0.0.1:0"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not (device_dir / "state" / "api.json").exists():
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("the agent did not start serving")
            time.sleep(0.1)
        while settled is not None and not settled(proc.pid):
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("the agent did not settle")
            time.sleep(0.1)
        time.sleep(3)  # settle: metrics sampled, threads idle
        status = Path(f"/proc/{proc.pid}/status").read_text()
        fields = {line.split(":")[0]: int(line.split()[1]) for line in status.splitlines() if line.startswith(("VmRSS", "VmHWM"))}
        return {"rss_mb": fields["VmRSS"] / 1024, "peak_rss_mb": fields["VmHWM"] / 1024}
    finally:
        proc.terminate()
        proc.wait(15)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", type=Path)
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="edgeops-agent-bench-"))
    bundle = args.bundle or build_bundle(work)
    agent = device(work, bundle)
    stop = threading.Event()
    recorder = threading.Thread(target=agent.telemetry.run_recorder, args=(stop,), daemon=True)
    recorder.start()  # recording runs as in the agent: inference only enqueues
    feed = sample_input(agent)
    results = {"inference": inference_overhead(agent, feed, args.calls)}
    r = results["inference"]
    print(f"in-process inference: bare onnxruntime {r['bare_us']:.1f} us, Agent.infer {r['agent_us']:.1f} us "
          f"(median): overhead {100 * r['overhead']:+.1f} % (goal <= 5 %)", flush=True)
    results["http"] = h = http_latency(agent, feed, max(200, args.calls // 4))
    print(f"local HTTP: JSON p50 {h['json_p50_ms']:.2f} ms p99 {h['json_p99_ms']:.2f} ms; npz p50 {h['npz_p50_ms']:.2f} ms "
          f"p99 {h['npz_p99_ms']:.2f} ms; in-process p50 {h['inprocess_p50_ms']:.3f} ms "
          f"(HTTP npz adds {h['npz_p50_ms'] / h['inprocess_p50_ms']:.0f}x at p50)", flush=True)
    stop.set()
    recorder.join(10)
    agent.telemetry.outbox.close()
    results["outbox"] = o = outbox_throughput(work)
    print(f"outbox: {o['records_per_s']:,.0f} records/s in commits of {o['records_per_commit']} (goal >= 20,000/s)", flush=True)
    results["memory"] = m = idle_memory(work / "bench")
    print(f"idle agent serving the model: RSS {m['rss_mb']:.1f} MB (peak {m['peak_rss_mb']:.1f} MB; goal <= 100 MB)", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
