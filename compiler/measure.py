"""Run a candidate model in onnxruntime: outputs on a dataset, batch-1 latency, peak memory.

Latency is the median of batch-1 runs with the profile's thread count (capped at this machine's
cores), after warm-up, always measured in alternation with the model it is compared to. Peak memory is measured in a fresh subprocess, because the
allocations of the models measured before would otherwise hide it.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from edgeops.compiler.data import Dataset
from edgeops.protocol.errors import EdgeopsError

# onnxruntime's C++ warnings (e.g. from sessions inside its quantizer) would drown the build's output.
ort.set_default_logger_severity(3)



def session(model_bytes: bytes, threads: int = 1, quiet: bool = False, plain: bool = False) -> ort.InferenceSession:
    """A CPU session; `quiet` also silences onnxruntime's own error log (for probes expected to fail).

    `plain` turns graph optimizations off, to check the graph is valid ONNX by itself and not only
    after onnxruntime's fusions, which another runtime version or execution provider may not apply.
    """
    options = ort.SessionOptions()
    if plain:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = max(1, min(threads, os.cpu_count() or 1))
    options.inter_op_num_threads = 1
    options.log_severity_level = 4 if quiet else 3
    return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])


def run_dataset(sess: ort.InferenceSession, data: Dataset, limit: int | None = None) -> list[np.ndarray]:
    """All outputs over the dataset, samples on the first axis (stacked runs are concatenated)."""
    chunks: list[list[np.ndarray]] = []
    for feed in data.batches(limit):
        outputs = sess.run(None, feed)
        chunks.append(outputs)
    if not chunks:
        raise EdgeopsError("no complete batch to run: the data has fewer samples than the batch size")
    join = np.concatenate if data.stacked else np.stack
    return [join([chunk[i] for chunk in chunks]) for i in range(len(chunks[0]))]


def first_sample(data: Dataset) -> dict[str, np.ndarray]:
    """The smallest feed the model takes: one sample, or one fixed-size batch."""
    return next(data.batches(limit=data.batch or 1))


def _timed(sess: ort.InferenceSession, feed: dict[str, np.ndarray]) -> float:
    start = time.perf_counter()
    sess.run(None, feed)
    return time.perf_counter() - start


def paired_latency_ms(sessions: list[ort.InferenceSession], feed: dict[str, np.ndarray],
                      budget_s: float = 2.0, min_rounds: int = 5, max_rounds: int = 200) -> list[float]:
    """Median latencies of several models measured in alternating short blocks.

    Load from other processes comes and goes; alternating puts every model under the same
    conditions, so their ratio holds even when the absolute figures drift.
    """
    for sess in sessions:
        for _ in range(3):
            sess.run(None, feed)
    times: list[list[float]] = [[] for _ in sessions]
    deadline = time.perf_counter() + budget_s
    for done in range(max_rounds):
        if done >= min_rounds and time.perf_counter() > deadline:
            break
        for index, sess in enumerate(sessions):
            times[index].extend(_timed(sess, feed) for _ in range(5))
    return [float(np.median(t) * 1000) for t in times]


def peak_memory_mb(model_path: Path, feed_path: Path, threads: int) -> float:
    """Peak RSS of a fresh process that loads the model and runs one feed: what a device must have free."""
    proc = subprocess.run(
        [sys.executable, "-m", "edgeops.compiler.measure", str(model_path), str(feed_path), str(threads)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if proc.returncode != 0:
        raise EdgeopsError(f"memory probe failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}")
    return float(json.loads(proc.stdout)["peak_mb"])


def _probe(model_path: str, feed_path: str, threads: str) -> None:
    with np.load(feed_path, allow_pickle=False) as data:
        feed = {k: data[k] for k in data.files}
    if model_path.endswith(".tflite"):  # LiteRT targets: measured in the runtime they ship for
        from edgeops.compiler.litert import interpreter

        interpreter(Path(model_path).read_bytes(), int(threads)).run(feed)
    else:
        session(Path(model_path).read_bytes(), int(threads)).run(None, feed)
    print(json.dumps({"peak_mb": _high_water_mb()}))


def _high_water_mb() -> float:
    # VmHWM belongs to this process image; ru_maxrss would include the parent's peak from before exec.
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


if __name__ == "__main__":
    _probe(*sys.argv[1:4])
