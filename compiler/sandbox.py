"""Run a build in a child process under memory and CPU limits, so a hostile model cannot take the caller down.

A model is untrusted input to parsers and native code: it can make onnxruntime allocate terabytes
(a ConstantOfShape folded at load time), spin forever (a Loop with a huge trip count), or crash a
parser. The build runs in a child forked from a forkserver that has imported the compiler once.
The child sets RLIMIT_DATA (private writable memory, counted by the kernel since Linux 4.7; unlike
RLIMIT_AS it ignores the address space TensorFlow and thread pools reserve but never touch),
RLIMIT_CPU and RLIMIT_CORE=0 on itself; the processes it starts (the TensorFlow converter, the
memory probe) inherit them, each with a budget of its own.

Invariants:
- the child talks to the parent through one pipe of JSON messages: progress, log records, then
  the report or an error; its stdout and stderr go to a second pipe, which the parent logs at INFO;
- every outcome in the parent is the report or an EdgeopsError of one line: the child's own
  error, or what ended it (memory limit, CPU limit, a crash) and which option to raise;
- the child writes outputs only through `atomic_write`; if it dies by a signal, the parent removes
  the temporary files it may have left, so the output folder holds whole files or nothing new.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import re
import resource
import signal
import threading
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, is_dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgeops.protocol.errors import BuildFailed, EdgeopsError

if TYPE_CHECKING:
    from edgeops.compiler.build import BuildRequest

log = logging.getLogger(__name__)
SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
SIZE_UNITS = {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
TIME = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|min|h|d)?\s*$", re.IGNORECASE)
TIME_UNITS = {"": 1, "s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400}
# Children fork from a server that imported the compiler once: a build then starts in milliseconds,
# not the second those imports take, and the server is single-threaded, so forking it is safe.
_CONTEXT = multiprocessing.get_context("forkserver")
_CONTEXT.set_forkserver_preload(["edgeops.compiler.build"])
CPU_GRACE_S = 5  # between SIGXCPU (soft limit) and SIGKILL (hard limit)
# What onnxruntime, protobuf and the C++ runtime say when an allocation fails under RLIMIT_DATA.
OUT_OF_MEMORY = re.compile(r"bad_alloc|bad allocation|Failed to allocate memory|MemoryError|Cannot allocate memory|"
                           r"failed to map segment")


def parse_size(text: str, what: str = "--max-memory") -> int:
    """Bytes from "8GiB", "512M", "2g", "1048576" (binary units: 1G = 1 GiB)."""
    match = SIZE.match(text)
    size = float(match.group(1)) * SIZE_UNITS[(match.group(2) or "")[:1].lower()] if match else 0.0
    if not 1 <= size < 2**60:  # setrlimit takes 64 bits (and "9" * 400 is inf as a float)
        raise EdgeopsError(f"{what} {text!r} is not a size; write e.g. 8GiB, 512MiB")
    return int(size)


def parse_seconds(text: str, what: str = "--max-cpu-time") -> int:
    """Whole seconds from "90", "90s", "10m", "1.5h", "1d"."""
    match = TIME.match(text)
    seconds = float(match.group(1)) * TIME_UNITS[(match.group(2) or "").lower()] if match else 0.0
    if not 1 <= seconds < 2**40:
        raise EdgeopsError(f"{what} {text!r} is not a duration of at least 1 s; write e.g. 30m, 2h")
    return int(seconds)


def _default_memory() -> int:
    """Three quarters of this machine's RAM: a runaway build fails instead of swapping the machine to a halt."""
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") * 3 // 4


def human_bytes(n: int) -> str:
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n} B"


@dataclass(frozen=True)
class Limits:
    """Per-process limits of the build's child (each process it starts gets the same)."""

    memory_bytes: int = field(default_factory=_default_memory)
    cpu_seconds: int = 8 * 3600  # an int8 search over a large model takes CPU-hours on many cores

    @classmethod
    def from_options(cls, memory: str | None, cpu_time: str | None) -> Limits:
        """From --max-memory and --max-cpu-time as written; None keeps the default."""
        default = cls()
        return cls(parse_size(memory) if memory else default.memory_bytes,
                   parse_seconds(cpu_time) if cpu_time else default.cpu_seconds)

    def apply(self) -> None:
        """Set on the calling process; never above a hard limit the caller already has."""
        for which, soft, hard in ((resource.RLIMIT_DATA, self.memory_bytes, self.memory_bytes),
                                  (resource.RLIMIT_CPU, self.cpu_seconds, self.cpu_seconds + CPU_GRACE_S),
                                  (resource.RLIMIT_CORE, 0, 0)):
            current = resource.getrlimit(which)[1]
            if current != resource.RLIM_INFINITY:
                soft, hard = min(soft, current), min(hard, current)
            resource.setrlimit(which, (soft, hard))


def run_build(request: BuildRequest | Mapping[str, Any], limits: Limits = Limits(),
              progress: Callable[[str], None] = lambda message: None) -> dict[str, Any]:
    """`edgeops.compiler.build.build(request)` in a limited child process: its report, or EdgeopsError
    (BuildFailed, with the report of every candidate, when none fitted).

    `request` may be a BuildRequest or a mapping of its fields, so a caller need not import the
    compiler (onnx, onnxruntime: about a second) only to hand it to the child. As with any
    multiprocessing forkserver, a script that calls this must guard its entry point with
    `if __name__ == "__main__":`, since the child imports the caller's main module.
    """
    fields = asdict(request) if is_dataclass(request) else dict(request)
    before = _partial_files(fields.get("outdir", "."))
    order = {"request": {k: str(v) if isinstance(v, Path) else v for k, v in fields.items()}, "limits": asdict(limits),
             "log_level": logging.getLogger().getEffectiveLevel(), "cwd": os.getcwd(), "env": dict(os.environ)}
    messages, send = _CONTEXT.Pipe(duplex=False)
    err_read, err_write = os.pipe()
    err_send = Connection(err_write, readable=False)  # a Connection, so the forkserver passes it on as an fd
    child = _CONTEXT.Process(target=_child, args=(order, send, err_send), name="edgeops-build")
    try:
        child.start()
    finally:
        send.close()
        err_send.close()
    stderr_tail: deque[str] = deque(maxlen=20)
    drain = threading.Thread(target=_drain, args=(err_read, stderr_tail), daemon=True)
    drain.start()
    outcome: dict[str, Any] = {}
    try:
        while (message := _next(messages)) is not None:
            _receive(message, outcome, progress)
    except BaseException:  # interrupted here (Ctrl-C): take the child down too
        child.kill()
        raise
    finally:
        child.join()
        drain.join(timeout=5)
        messages.close()
    code = child.exitcode
    if "report" in outcome:  # sent after the bundle was written: a crash on the way out changes nothing
        return outcome["report"]
    if code < 0:
        for partial in _partial_files(fields.get("outdir", ".")) - before:
            partial.unlink(missing_ok=True)
    if "failed_report" in outcome:
        raise BuildFailed(outcome["error"], outcome["failed_report"])
    if fields.get("metric") and ":" in str(fields["metric"]):
        outcome.setdefault("metric", fields["metric"])
    raise EdgeopsError(_failure(code, outcome, list(stderr_tail), limits))


def _next(messages: Connection) -> dict[str, Any] | None:
    """The next message from the child, None once it has closed its end (it exited or died)."""
    while True:
        try:
            raw = messages.recv_bytes()
        except EOFError:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            log.debug("unreadable message from the build process: %r", raw[:200])


def _partial_files(outdir: str | Path) -> set[Path]:
    """atomic_write's temporary files (`.NAME.XXXXXX.part`): a child killed while writing leaves one."""
    return set(Path(outdir).glob(".*.part")) if Path(outdir).is_dir() else set()


def _drain(fd: int, tail: deque[str]) -> None:
    """Log the child's stderr (native libraries write there) and keep its last lines for `_failure`."""
    with os.fdopen(fd, "rb") as stream:
        for raw in stream:
            line = raw.decode("utf-8", "replace").rstrip()
            if line:
                tail.append(line)
                log.info("build process: %s", line)


def _receive(message: dict[str, Any], outcome: dict[str, Any], progress: Callable[[str], None]) -> None:
    if "progress" in message:
        progress(message["progress"])
    elif "log" in message:
        record = logging.makeLogRecord(message["log"])
        logging.getLogger(record.name).handle(record)
    else:
        outcome.update(message)


def _failure(code: int, outcome: dict[str, Any], stderr: list[str], limits: Limits) -> str:
    """One line: why the child ended without a report, and what to do about it."""
    memory = (f"the build ran out of memory under its limit of {human_bytes(limits.memory_bytes)}; "
              "if the model is trusted and needs more, raise --max-memory")
    if outcome.get("memory"):
        log.info("build process: %s", outcome["error"])
        return memory
    if "error" in outcome:
        return outcome["error"]
    if code == -signal.SIGXCPU:
        return (f"the build used its limit of {limits.cpu_seconds} s of CPU time and was stopped; "
                "if the model is trusted and the build needs longer, raise --max-cpu-time")
    if any(OUT_OF_MEMORY.search(line) for line in stderr):
        return memory
    if code == -signal.SIGKILL:
        return ("the build process was killed (SIGKILL), most likely by the kernel's out-of-memory killer: "
                "lower --max-memory below the memory this machine has free, or free some")
    if code < 0:
        name = signal.strsignal(-code) or f"signal {-code}"
        return f"the build process crashed ({name}) in native code, probably on a malformed model"
    last = stderr[-1] if stderr else "no output"
    return f"the build process ended without a report (exit status {code}): {last}" + (
        f"; the --metric function {metric} may have ended it" if (metric := outcome.get("metric")) else "")


# ----------------------------------------------------------------------------------------- the child


class _PipeHandler(logging.Handler):
    def __init__(self, send: Callable[[dict], None]) -> None:
        super().__init__()
        self.send = send

    def emit(self, record: logging.LogRecord) -> None:
        self.send({"log": {"name": record.name, "levelno": record.levelno, "levelname": record.levelname,
                           "msg": self.format(record)}})


def _child(order: dict[str, Any], pipe: Connection, stderr: Connection) -> None:
    """Apply the limits, build, and send the outcome through `pipe`; runs forked from the forkserver."""
    os.dup2(stderr.fileno(), 2)
    os.dup2(2, 1)  # stray prints from libraries must not mix with the parent's stdout (its --json report)
    stderr.close()
    os.chdir(order["cwd"])  # the forkserver keeps the working folder and environment of its start
    os.environ.clear()
    os.environ.update(order["env"])
    lock = threading.Lock()

    def send(message: dict) -> None:
        with lock:
            pipe.send_bytes(json.dumps(message, default=str).encode())

    limits = Limits(**order["limits"])
    limits.apply()
    handler = _PipeHandler(send)
    handler.setFormatter(logging.Formatter("%(message)s"))  # the parent's handlers add level and name
    logging.basicConfig(level=order["log_level"], handlers=[handler], force=True)
    log.info("building in process %d under limits of %s of memory and %d s of CPU time", os.getpid(),
             human_bytes(limits.memory_bytes), limits.cpu_seconds)
    try:
        from edgeops.compiler.build import BuildRequest, build

        request = order["request"]
        request.update({key: Path(request[key]) for key in ("model", "calib", "eval", "outdir") if request.get(key) is not None})
        send({"report": build(BuildRequest(**request), progress=lambda message: send({"progress": message}))})
    except BuildFailed as exc:  # no candidate fitted: the report of every candidate goes with the reason
        send({"error": str(exc), "failed_report": exc.report})
    except EdgeopsError as exc:  # onnxruntime's allocation failures arrive wrapped in one (PassError)
        send({"error": str(exc), "memory": bool(OUT_OF_MEMORY.search(str(exc)))})
    except MemoryError:
        send({"error": "out of memory", "memory": True})
    except Exception as exc:  # reported to the parent as one line, the traceback in its debug log
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        log.debug("internal error in the build process", exc_info=True)
        send({"error": _internal(exc, first), "memory": bool(OUT_OF_MEMORY.search(str(exc)))})
    finally:
        pipe.close()


def _internal(exc: Exception, first: str) -> str:
    """The line for an exception the build did not turn into an EdgeopsError."""
    if type(exc).__module__.startswith("onnxruntime"):
        return f"onnxruntime cannot load or run the model: {first[:300]}"
    if isinstance(exc, RecursionError):
        return "the model nests too deeply to process; refusing it"
    return (f"internal error: {type(exc).__name__}: {first[:300]} (run with -vv for the traceback, "
            "and please report it)")
