"""Device metrics, read from Linux's /proc and /sys without extra packages: CPU use since the last
sample, memory, disk of the state directory, and temperature where a thermal zone is readable.

A value that cannot be read on this device is left out, never guessed.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any


class DeviceMetrics:
    def __init__(self, disk_path: str | Path):
        self.disk_path = Path(disk_path)
        self._cpu = _cpu_times()

    def sample(self) -> dict[str, Any]:
        """One sample: cpu_percent (over the time since the previous sample), mem_*, disk_*, temp_c, rss_mb."""
        values: dict[str, Any] = {}
        cpu = _cpu_times()
        if cpu and self._cpu:
            busy, total = cpu[0] - self._cpu[0], cpu[1] - self._cpu[1]
            if total > 0:
                values["cpu_percent"] = round(100.0 * busy / total, 1)
        self._cpu = cpu
        memory = _meminfo()
        if "MemTotal" in memory and "MemAvailable" in memory:
            values["mem_total_mb"] = round(memory["MemTotal"] / 1024, 1)
            values["mem_available_mb"] = round(memory["MemAvailable"] / 1024, 1)
        try:
            usage = shutil.disk_usage(self.disk_path)
            values["disk_free_mb"] = round(usage.free / 2**20, 1)
            values["disk_total_mb"] = round(usage.total / 2**20, 1)
        except OSError:
            pass
        temperature = _temperature()
        if temperature is not None:
            values["temp_c"] = temperature
        rss = _status_kb("VmRSS")
        if rss is not None:
            values["agent_rss_mb"] = round(rss / 1024, 1)
        return values


def _cpu_times() -> tuple[int, int] | None:
    """(busy, total) jiffies of all CPUs."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


def _meminfo() -> dict[str, int]:
    try:
        lines = Path("/proc/meminfo").read_text().splitlines()
    except OSError:
        return {}
    return {line.split(":")[0]: int(line.split()[1]) for line in lines if len(line.split()) >= 2 and line.split()[1].isdigit()}


def _temperature() -> float | None:
    """The hottest readable thermal zone, in °C."""
    readings = []
    for zone in Path("/sys/class/thermal").glob("thermal_zone*/temp"):
        try:
            readings.append(int(zone.read_text().strip()) / 1000.0)
        except (OSError, ValueError):
            continue
    return max(readings) if readings else None


def _status_kb(field: str) -> int | None:
    try:
        for line in Path(f"/proc/{os.getpid()}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None
