"""The fleet's home directory and the operator's actions on it: init, enroll, push.

Layout:
    fleet.json     settings: broker URL and the names it is reached by, metadata lifetimes, the HTTP
                   API's bearer token (mode 0600)
    registry.db    devices, releases, executions, certificates (edgeops.fleet.registry)
    repo/          the TUF repository: metadata/, targets/, keys/ (edgeops.fleet.trust)
    pki/           the fleet CA, the broker's and the fleet's own certificates, the HTTP API's server
                   certificate (api.pem, api.key), the CRL (edgeops.fleet.ca)

Invariants: a release exists in the registry only after its bundles are signed into the repository,
so a device never hears of a release it cannot fetch and verify. A device's private key exists only
in its device folder (mode 0600); the registry keeps its certificate's serial and expiry. The CRL
is rewritten in the same step as every revocation.
"""

from __future__ import annotations

import json
import contextlib
import os
import secrets
import fcntl
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterator

from edgeops.fleet import ca, registry, trust
from edgeops.fleet.plan import Plan
from edgeops.protocol import bundle as bundlemod
from edgeops.protocol import certs
from edgeops.protocol.mqtt import BROKER_CN, BrokerAddress, TlsFiles
from edgeops.protocol.errors import EdgeopsError
from edgeops.protocol.profiles import load_profile

CONFIG = "fleet.json"
DEFAULT_BROKER = "mqtts://127.0.0.1:8883"
DEFAULT_LIFETIMES = {"root": 365 * 86400, "targets": 90 * 86400, "snapshot": 7 * 86400, "timestamp": 86400}


@dataclass(frozen=True)
class FleetHome:
    path: Path
    config: dict[str, Any]

    @property
    def db_path(self) -> Path:
        return self.path / "registry.db"

    @property
    def repo(self) -> Path:
        return self.path / "repo"

    @property
    def pki(self) -> Path:
        return self.path / "pki"

    @property
    def broker_url(self) -> str:
        return self.config["broker"]

    def client_tls(self, name: str = "fleet") -> TlsFiles:
        """The TLS files of one of the fleet's own MQTT clients: `fleet`, or `ingest-N`."""
        return TlsFiles(self.pki / "ca.pem", self.pki / f"{name}.pem", self.pki / f"{name}.key")

    @contextlib.contextmanager
    def repo_lock(self) -> Iterator[None]:
        """Serialize repository writes: `edgeops push` and the server's metadata refresh both sign."""
        with open(self.path / ".repo.lock", "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            yield

    def expiry(self) -> trust.Expiry:
        seconds = self.config["lifetimes"]
        return trust.Expiry(**{role: timedelta(seconds=seconds[role]) for role in DEFAULT_LIFETIMES})

    @classmethod
    def open(cls, path: str | Path) -> "FleetHome":
        path = Path(path)
        try:
            config = json.loads((path / CONFIG).read_text())
        except FileNotFoundError:
            raise EdgeopsError(f"{path} is not a fleet directory (no {CONFIG}); create one with `edgeops fleet init {path}`") from None
        except ValueError as exc:
            raise EdgeopsError(f"{path / CONFIG} is not valid JSON: {exc}") from None
        return cls(path, config)


def init_fleet(path: str | Path, broker: str = DEFAULT_BROKER, lifetimes: dict[str, int] | None = None,
               broker_hosts: list[str] | None = None, api_hosts: list[str] | None = None) -> FleetHome:
    """Create the fleet directory: registry, TUF repository with fresh keys, the fleet CA with the
    broker's certificate (for the broker URL's host and `broker_hosts`), the HTTP API's (for those
    names, loopback and `api_hosts`) and the fleet's, settings."""
    path = Path(path)
    if (path / CONFIG).exists():
        raise EdgeopsError(f"{path} already holds a fleet; pick an empty directory")
    address = BrokerAddress.parse(broker)
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)  # the CA key, the registry (telemetry, captured samples) and the settings: the fleet's user only
    config = {"broker": broker, "broker_hosts": _broker_names(address.host, broker_hosts or []),
              "lifetimes": {**DEFAULT_LIFETIMES, **(lifetimes or {})}, "api_token": secrets.token_urlsafe(32)}
    home = FleetHome(path, config)
    ca.create_ca(home.pki)
    issue_broker_certificate(home)
    issue_api_certificate(home, api_hosts)
    ca.write_issued(ca.issue(home.pki, ca.FLEET_CN, ca.CA_DAYS), home.pki / "fleet.pem", home.pki / "fleet.key")
    trust.init_repository(home.repo, home.expiry())
    registry.open_db(home.db_path).conn.close()
    bundlemod.atomic_write(path / CONFIG, bundlemod.canonical_json(config))
    os.chmod(path / CONFIG, 0o600)  # holds the API token: owner only, whatever atomic_write's default
    return home


def _broker_names(url_host: str, extra: list[str]) -> list[str]:
    """The names the broker's certificate covers: the URL's host, the operator's, and loopback."""
    names = [url_host, *extra, "localhost", "127.0.0.1"]
    return list(dict.fromkeys(n.strip() for n in names if n.strip()))


def issue_broker_certificate(home: FleetHome, broker_hosts: list[str] | None = None) -> list[str]:
    """(Re-)issue the broker's server certificate for the fleet's broker names plus `broker_hosts`;
    returns the names it covers. Restart (or reload) the broker to serve it."""
    names = _broker_names(BrokerAddress.parse(home.broker_url).host, [*home.config.get("broker_hosts", []), *(broker_hosts or [])])
    ca.write_issued(ca.issue(home.pki, BROKER_CN, ca.SERVER_DAYS, server_names=names),
                    home.pki / "broker.pem", home.pki / "broker.key")
    if names != home.config.get("broker_hosts"):
        home.config["broker_hosts"] = names
        bundlemod.atomic_write(home.path / CONFIG, bundlemod.canonical_json(home.config), mode=0o600)
    return names


API_CERT, API_KEY = "api.pem", "api.key"  # in pki/: the HTTP API's server certificate


def issue_api_certificate(home: FleetHome, api_hosts: list[str] | None = None) -> list[str]:
    """(Re-)issue the HTTP API's server certificate (pki/api.pem, pki/api.key) for loopback, the
    broker's names, the API names it had and `api_hosts`; returns the names it covers (kept in
    fleet.json as `api_hosts`, which the API also accepts in the Host header). Restart `fleet serve`
    to serve it."""
    names = _broker_names(BrokerAddress.parse(home.broker_url).host,
                          [*home.config.get("broker_hosts", []), *home.config.get("api_hosts", []), *(api_hosts or []), "::1"])
    ca.write_issued(ca.issue(home.pki, "edgeops fleet API", ca.SERVER_DAYS, server_names=names),
                    home.pki / API_CERT, home.pki / API_KEY)
    if names != home.config.get("api_hosts"):
        home.config["api_hosts"] = names
        if (home.path / CONFIG).exists():  # init_fleet writes the settings once, after every certificate
            bundlemod.atomic_write(home.path / CONFIG, bundlemod.canonical_json(home.config), mode=0o600)
    return names


DEVICE_TLS = {"ca": "tls/ca.pem", "cert": "tls/device.pem", "key": "tls/device.key"}  # in the device folder


def enroll_device(home: FleetHome, device_id: str, profile: str, labels: dict[str, str], out: Path,
                  agent: dict[str, Any] | None = None, cert_days: int = ca.DEVICE_DAYS,
                  re_enroll: bool = False) -> Path:
    """Register a device and write what its agent needs: settings, its certificate and key with the
    fleet CA to pin, pinned root metadata, and `agent` settings (docs/agent.md: outbox_bytes,
    metrics_interval_s, drift_window, capture). A revoked id comes back only with `re_enroll`."""
    load_profile(profile)  # an unknown profile fails here, not on the device
    out = Path(out)
    if (out / "device.json").exists():
        raise EdgeopsError(f"{out} already holds a device configuration")
    db = registry.open_db(home.db_path)
    registry.check_enrollable(db, device_id, re_enroll)
    issued = ca.issue(home.pki, device_id, cert_days)
    (out / "tls").mkdir(parents=True, exist_ok=True)
    bundlemod.atomic_write(out / DEVICE_TLS["ca"], (home.pki / "ca.pem").read_bytes())
    ca.write_issued(issued, out / DEVICE_TLS["cert"], out / DEVICE_TLS["key"])
    bundlemod.atomic_write(out / "root.json", trust.read_metadata(home.repo, "root.json"))
    registry.enroll(db, device_id, profile, labels, issued.cert, re_enroll)
    device = {"id": device_id, "profile": profile, "labels": labels, "broker": home.broker_url, "tls": DEVICE_TLS,
              **({"agent": agent} if agent else {})}
    bundlemod.atomic_write(out / "device.json", bundlemod.canonical_json(device))
    return out


def revoke_device(home: FleetHome, device_id: str, reason: str = "") -> list[int]:
    """Revoke a device: out of the registry's devices and every rollout, its certificates on the CRL.
    Returns the revoked serials. The broker refuses it from its next CRL load on."""
    db = registry.open_db(home.db_path)
    serials = registry.revoke(db, device_id, reason)
    ca.write_crl(home.pki, registry.revoked_serials(db))
    return serials


def renew_device(home: FleetHome, device_id: str, days: int = ca.DEVICE_DAYS) -> bytes:
    """A new certificate for an enrolled device's existing key, recorded in the registry; `fleet
    serve` sends it to the device (retained, on its `cert` topic), which checks it against its pinned CA."""
    db = registry.open_db(home.db_path)
    current = registry.latest_certificates(db).get(device_id)
    if current is None:
        raise EdgeopsError(f"no enrolled device {device_id}; `edgeops status` lists them")
    issued = ca.issue(home.pki, device_id, days, public_key=certs.public_key(current["pem"].encode()))
    registry.add_certificate(db, device_id, issued.cert)
    return issued.cert


def push(home: FleetHome, bundle_paths: list[Path], selector: dict[str, str], targets_key: Path | None = None,
         plan: Plan | None = None) -> int:
    """Sign the bundles of one model version into the repository and register them as a release,
    rolled out under `plan` (default: the safe staged plan, fleet/plan.py)."""
    if not bundle_paths:
        raise EdgeopsError("give at least one bundle to push")
    bundles = [bundlemod.read_bundle(p) for p in bundle_paths]
    identities = {(b.manifest["name"], b.manifest["version"]) for b in bundles}
    if len(identities) != 1:
        raise EdgeopsError(f"one release is one model version; these bundles are {sorted(identities)}")
    model, version = identities.pop()
    targets = []
    with home.repo_lock():
        for b in bundles:
            custom = {"model": model, "version": version, "profile": b.manifest["profile"]}
            target = trust.add_target(home.repo, b.path.name, b.path, custom, targets_key, home.expiry())
            targets.append({"profile": b.manifest["profile"], "target": b.path.name,
                            "sha256": target.hashes["sha256"], "length": target.length})
    return registry.create_release(registry.open_db(home.db_path), model, version, selector, targets, plan)


def withdraw_rolled_back(home: FleetHome, db: Any, targets_key: Path | None = None) -> dict[int, list[str]]:
    """Withdraw from the signed targets the bundles of rolled-back rollouts (unless a newer release
    reuses the name), so their devices may return to what they ran before; per rollout, what was
    withdrawn. Idempotent: the server runs it after every engine round."""
    rows = db.execute(
        "select o.id, t.target from rollouts o join release_targets t on t.release_id = o.id where o.state = 'rolled-back' "
        "and not exists (select 1 from release_targets t2 join rollouts o2 on o2.id = t2.release_id "
        "where t2.target = t.target and o2.id > o.id and o2.state != 'rolled-back')").fetchall()
    if not rows:
        return {}
    with home.repo_lock():
        listed = trust.listed_targets(home.repo)
        pending = [(rollout_id, name) for rollout_id, name in rows if name in listed]
        if not pending:
            return {}
        trust.withdraw_targets(home.repo, [name for _, name in pending], targets_key, home.expiry())
    withdrawn: dict[int, list[str]] = {}
    for rollout_id, name in pending:
        withdrawn.setdefault(rollout_id, []).append(name)
    return withdrawn
