"""Real filesystems for fault tests: an ext4 image on a loop device whose power can be cut, and a
small tmpfs that fills up. Both need root and util-linux; ext4 also needs e2fsprogs (mkfs.ext4)
and xfsprogs (xfs_io). A missing part skips locally and fails under CI=true (realparts.missing).

A power cut is `xfs_io -x -c shutdown MOUNTPOINT` without `-f`: the filesystem stops at once and
its journal is not flushed, so whatever was not fsync'd is lost, as when the power goes. ext4 is
mounted with `commit=60`, so the kernel does not commit the journal by itself within a test: only
what the code under test synced survives.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from pathlib import Path

from realparts import missing


def require(*tools: str) -> None:
    if os.geteuid() != 0:
        missing("mounting a filesystem needs root")
    for tool in ("mount", "umount", *tools):
        if shutil.which(tool) is None:
            missing(f"{tool} is not installed (Debian: util-linux, e2fsprogs, xfsprogs)")


def _run(*args: str) -> None:
    proc = subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed: {proc.stderr.strip()}")


class Mount:
    """A filesystem mounted at `where` (created if needed) by `mount ARGS... where`."""

    def __init__(self, where: Path, *args: str):
        self.where, self.args = where, args
        where.mkdir(parents=True, exist_ok=True)
        self.mount()

    def mount(self) -> None:
        _run("mount", *self.args, str(self.where))

    def mounted(self) -> bool:
        return os.path.ismount(self.where)

    def umount(self) -> None:
        _run("umount", str(self.where))

    def cut_power(self) -> None:
        """Stop the filesystem now, dropping its unflushed journal; then kill its writers and remount."""
        _run("xfs_io", "-x", "-c", "shutdown", str(self.where))

    def remount(self) -> None:
        self.umount()
        self.mount()

    def cleanup(self) -> None:
        """Unmount even after a failure; a lazy unmount if something still holds a file open."""
        if self.mounted() and subprocess.run(["umount", str(self.where)], capture_output=True, check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(self.where)], capture_output=True, check=False)


def ext4(image: Path, where: Path, size_mb: int = 96) -> Mount:
    """A fresh ext4 filesystem in a sparse `image` file, loop-mounted at `where` (the loop device is
    released with the mount: `-o loop` sets autoclear)."""
    with open(image, "wb") as fh:
        fh.truncate(size_mb * 1024 * 1024)
    _run("mkfs.ext4", "-q", "-F", str(image))
    return Mount(where, "-o", "loop,commit=60", str(image))


def tmpfs(where: Path, size_kb: int) -> Mount:
    return Mount(where, "-t", "tmpfs", "-o", f"size={size_kb}k,mode=0755", "tmpfs")


def fill(directory: Path) -> Path:
    """Take every free byte of `directory`'s filesystem with one file, as a runaway log would; delete
    the file to give the space back."""
    path = directory / "filler"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for chunk in (1 << 20, 1 << 12):
            try:
                while True:
                    os.write(fd, bytes(chunk))
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
    finally:
        os.close(fd)
    return path
