"""A/B model slots: stage a bundle in the inactive slot, prove it runs, then switch with one rename.

State directory:
    slots/a/, slots/b/   bundle.edgeops and the model file extracted from it (model.onnx or model.tflite)
    current              the active slot's name, "a" or "b"; absent before the first install
    install.json         the journal: slot and step of the install in flight; absent otherwise

`install` runs writing -> loading -> self-test -> switching -> active. Each step is recorded in the
journal (written atomically and fsync'd with its directory) before it runs; only `switching` changes
what is served, by atomically replacing `current`.

Invariants:
- `current`, when present, names a slot whose bundle passed read_bundle and its self-test, and whose
  model file matches the bundle; nothing ever writes to or deletes the slot it names.
- The other slot is scratch: an install overwrites it, and its content counts only once `current`
  names it. So a journal's slot is the new model iff `current` names it: the switch happened.
  Until an install overwrites it, it holds the model served before, which `revert` can switch back
  to after checking it again (a crash loop, agent/boots.py).
- After `recover()` (and after any failed install) there is no journal, and exactly one complete,
  verified model is active, or none before the first install: a crash before `current` was replaced
  keeps the old pointer and discards the journal's slot; a crash after keeps the new pointer.
- Signatures are the trust layer's job, done before `install`; this module only checks that the
  staged bytes are still the ones verified (`expected_sha256`) right before switching.
- One SlotStore, in one process, owns a state directory; `active()` is cached on that basis.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeops.agent import runtime
from edgeops.protocol.bundle import atomic_write, bundle_filename, fsync_dir, read_bundle, sha256_file
from edgeops.protocol.errors import EdgeopsError

log = logging.getLogger(__name__)

SLOTS = ("a", "b")
STEPS = ("writing", "loading", "self-test", "switching", "active")
BUNDLE = "bundle.edgeops"
POINTER = "current"
JOURNAL = "install.json"
FAILPOINT_ENV = "EDGEOPS_FAILPOINT"
FAILPOINT_ACTION_ENV = "EDGEOPS_FAILPOINT_ACTION"


def failpoint(point: str) -> None:
    """Die here, as a power cut or OOM kill would, when EDGEOPS_FAILPOINT names `point` (crash tests);
    with EDGEOPS_FAILPOINT_ACTION=stop, freeze here instead (SIGSTOP), so a test can cut the power."""
    if os.environ.get(FAILPOINT_ENV) == point:
        stop = os.environ.get(FAILPOINT_ACTION_ENV) == "stop"
        os.kill(os.getpid(), signal.SIGSTOP if stop else signal.SIGKILL)


class InstallFailed(EdgeopsError):
    """An install stopped at `step`; the previous model is still the active one."""

    def __init__(self, step: str, reason: Exception):
        self.step = step
        super().__init__(f"install failed at step '{step}': {reason}")


@dataclass(frozen=True)
class ActiveModel:
    """The model being served: its slot, its (verified) manifest and the bundle file in the slot."""

    slot: str
    manifest: dict[str, Any]
    path: Path

    @property
    def model_path(self) -> Path:
        return self.path.parent / self.manifest["model"]["file"]

    @property
    def target(self) -> str:
        """The bundle's canonical file name, as it is published (NAME-VERSION-PROFILE.edgeops)."""
        return bundle_filename(self.manifest["name"], self.manifest["version"], self.manifest["profile"])


class SlotStore:
    def __init__(self, state_dir: str | Path):
        self.root = Path(state_dir)
        self.root.mkdir(parents=True, exist_ok=True)
        self._active: ActiveModel | None = None
        self._known = False  # whether _active reflects the disk

    def active(self) -> ActiveModel | None:
        """The model being served (verified when first read, then kept current by install and recover)."""
        if not self._known:
            self._active, self._known = self._read_active(), True
        return self._active

    def install(self, bundle_path: str | Path, on_step: Callable[[str], None] | None = None,
                expected_sha256: str | None = None) -> ActiveModel:
        """Install a bundle the trust layer verified, and switch to it once it passed its self-test.

        `on_step(step)` is called as each step starts. `expected_sha256` is the verified hash of the
        bundle file: the staged copy must have it when written and still have it right before the switch.
        Raises InstallFailed naming the step; the previous model then stays active.
        """
        if self._journal() is not None:
            self.recover()
        previous = self.active()
        slot = "b" if previous is not None and previous.slot == "a" else "a"
        slot_dir = self._slot_dir(slot)
        staged = slot_dir / BUNDLE
        step = "writing"
        try:
            self._enter(slot, step, on_step)
            digest = self._stage(Path(bundle_path), slot_dir)
            if expected_sha256 is not None and digest != expected_sha256:
                raise EdgeopsError(f"the bundle's sha256 is {digest}, not the verified {expected_sha256}")
            failpoint(f"after:{step}")

            step = "loading"
            self._enter(slot, step, on_step)
            bundle = read_bundle(staged)
            model_file = slot_dir / bundle.manifest["model"]["file"]
            atomic_write(model_file, bundle.model_bytes)
            model = runtime.load(bundle.model_bytes, bundle.manifest)
            failpoint(f"after:{step}")

            step = "self-test"
            self._enter(slot, step, on_step)
            runtime.selftest(model, bundle)
            del model  # the serving side loads its own; don't hold a second session
            failpoint(f"after:{step}")

            step = "switching"
            self._enter(slot, step, on_step)
            if sha256_file(staged) != digest:  # digest is expected_sha256 when given (checked above)
                raise EdgeopsError(f"the staged bundle {staged} changed since it was verified; not switching")
            if sha256_file(model_file) != bundle.manifest["files"][model_file.name]["sha256"]:
                raise EdgeopsError(f"the extracted model {model_file} changed since it was verified; not switching")
            atomic_write(self.root / POINTER, f"{slot}\n".encode())
            failpoint(f"after:{step}")
        except BaseException as exc:
            self._converge(slot)
            if isinstance(exc, (EdgeopsError, OSError)):
                raise InstallFailed(step, exc) from exc
            raise
        self._clear_journal()
        self._active, self._known = ActiveModel(slot, bundle.manifest, staged), True
        if on_step is not None:
            on_step("active")
        return self._active

    def recover(self) -> ActiveModel | None:
        """Converge after a crash (see the invariants); call at start. Returns the active model."""
        journal = self._journal()
        if journal is not None:
            log.warning("finishing an install interrupted at step %r", journal.get("step"))
            self._converge(journal.get("slot"))
        for stray in self.root.glob(".*.part"):  # atomic_write's temporaries of `current` and the journal
            stray.unlink()
        self._known = False
        try:
            return self.active()
        except EdgeopsError as exc:
            # Storage corrupted a verified slot: serve nothing rather than something unverified, and
            # let the next install restore service.
            log.error("the active slot is unusable, no model is active until the next install: %s", exc)
            (self.root / POINTER).unlink(missing_ok=True)
            fsync_dir(self.root)
            self._active, self._known = None, True
            return None

    def revert(self) -> ActiveModel | None:
        """Serve the other slot's model again, the one before the active one, if it is still complete and
        verified (no install overwrote it since); None, changing nothing, when it is not."""
        current = self.active()
        if current is None:
            return None
        other = "b" if current.slot == "a" else "a"
        try:
            previous = self._read_slot(other)
        except (EdgeopsError, OSError):
            return None
        atomic_write(self.root / POINTER, f"{other}\n".encode())
        self._active, self._known = previous, True
        return previous

    def _slot_dir(self, slot: str) -> Path:
        return self.root / "slots" / slot

    def _pointer(self) -> str | None:
        try:
            slot = (self.root / POINTER).read_text().strip()
        except FileNotFoundError:
            return None
        if slot not in SLOTS:
            raise EdgeopsError(f"{self.root / POINTER} names no slot ({slot!r})")
        return slot

    def _read_active(self) -> ActiveModel | None:
        slot = self._pointer()
        return None if slot is None else self._read_slot(slot)

    def _read_slot(self, slot: str) -> ActiveModel:
        bundle = read_bundle(self._slot_dir(slot) / BUNDLE)
        active = ActiveModel(slot, bundle.manifest, bundle.path)
        expected = bundle.manifest["files"][active.model_path.name]["sha256"]
        if not active.model_path.is_file() or sha256_file(active.model_path) != expected:
            raise EdgeopsError(f"slot {slot}: {active.model_path} is missing or differs from its bundle")
        return active

    def _journal(self) -> dict[str, Any] | None:
        try:
            journal = json.loads((self.root / JOURNAL).read_text())
        except FileNotFoundError:
            return None
        except ValueError:  # cannot happen with atomic writes; still, recover by discarding
            return {}
        return journal if isinstance(journal, dict) else {}

    def _enter(self, slot: str, step: str, on_step: Callable[[str], None] | None) -> None:
        atomic_write(self.root / JOURNAL, json.dumps({"slot": slot, "step": step}).encode())
        if on_step is not None:
            on_step(step)
        failpoint(f"before:{step}")

    def _stage(self, source: Path, slot_dir: Path) -> str:
        """Copy the bundle into an emptied slot, durably; return the sha256 of the bytes written."""
        if slot_dir.exists():
            shutil.rmtree(slot_dir)
        slot_dir.mkdir(parents=True)
        fsync_dir(slot_dir.parent)
        digest = hashlib.sha256()
        with open(source, "rb") as src, open(slot_dir / BUNDLE, "xb") as dst:
            for block in iter(lambda: src.read(1 << 20), b""):
                digest.update(block)
                dst.write(block)
            dst.flush()
            os.fsync(dst.fileno())
        fsync_dir(slot_dir)
        return digest.hexdigest()

    def _converge(self, slot: str | None) -> None:
        """Keep `slot` if `current` names it (the switch happened), else discard it; clear the journal.

        With no slot recorded (an unreadable journal), every slot `current` does not name is discarded.
        """
        pointer = self._pointer()
        for candidate in SLOTS:
            if candidate != pointer and slot in (None, candidate) and self._slot_dir(candidate).exists():
                shutil.rmtree(self._slot_dir(candidate))
                fsync_dir(self._slot_dir(candidate).parent)
        self._clear_journal()
        self._known = False

    def _clear_journal(self) -> None:
        (self.root / JOURNAL).unlink(missing_ok=True)
        fsync_dir(self.root)
