"""What an outsider's attack on the secured fleet found, each fixed and checked here on real parts
(registry files, certificates from a real fleet CA, the wire parsers):
- a NaN or Infinity in a telemetry record is malformed (it broke every SQLite json query after it);
- a revoked device is out of every rollout: its executions are cancelled, so no quota, gate or
  baseline counts it;
- re-enrolling a revoked id starts a new identity: nothing of the old one counts for it;
- a renewal with anything appended to the certificate is refused (it would have locked the device out);
- the generated broker configuration bounds the packet size.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from edgeops.fleet import mosquitto, registry, rollout, telemetry
from edgeops.fleet.home import enroll_device, init_fleet, renew_device, revoke_device
from edgeops.fleet.plan import make_plan
from edgeops.protocol import certs, wire
from edgeops.protocol.errors import EdgeopsError

sys.path.insert(0, str(Path(__file__).parent))
from telemetrykit import send  # noqa: E402

AT_ONCE = make_plan(stages="100%", bake=0, min_calls=0, abort="failed>100%")


@pytest.fixture
def home(tmp_path):
    home = init_fleet(tmp_path / "fleet", "mqtts://127.0.0.1:1")
    for device_id in ("dev-a", "dev-b"):
        enroll_device(home, device_id, "rpi4", {"site": "lab"}, tmp_path / device_id)
    return home


@pytest.mark.parametrize("constant", [b"NaN", b"Infinity", b"-Infinity"])
def test_non_finite_numbers_are_malformed(constant):
    payload = (b'{"device":"dev-a","dropped":0,"records":[{"seq":1,"kind":"inference","t":1.0,"body":{"latency_ms":'
               + constant + b',"ok":true}}]}')
    with pytest.raises(wire.WireError, match="not JSON"):
        wire.parse_telemetry(payload)
    with pytest.raises(wire.WireError, match="not JSON"):
        wire.decode(b'{"device":"dev-a","clock":' + constant + b"}", {"device": str})
    with pytest.raises(ValueError):
        wire.encode({"x": float(constant)})


def test_a_revoked_device_is_out_of_every_rollout(home):
    db = registry.open_db(home.db_path)
    registry.record_reports(db, [(d, {"device": d, "online": True}) for d in ("dev-a", "dev-b")])
    release = registry.create_release(db, "digits", "1.0.0", {"site": "lab"},
                                      [{"profile": "rpi4", "target": "t", "sha256": "0" * 64, "length": 1}], AT_ONCE)
    rollout.tick(db)
    for d in ("dev-a", "dev-b"):
        registry.record_reports(db, [(d, {"device": d, "online": True,
                                          "execution": {"release": release, "state": "active", "reason": ""}})])
    send(db, "dev-a", [(1, "inference", 1.0, {"model": "digits", "version": "1.0.0", "ok": False, "latency_ms": 1.0})])
    revoke_device(home, "dev-a", "stolen")
    states = dict(db.execute("select device, state from executions where release_id = ?", [release]).fetchall())
    assert states == {"dev-a": "cancelled", "dev-b": "active"}
    assert rollout.summary(db, release)["stages"][0]["active"] == 1


def test_re_enrolling_a_revoked_id_starts_a_new_identity(home, tmp_path):
    db = registry.open_db(home.db_path)
    send(db, "dev-a", [(1, "inference", 1.0, {"model": "digits", "version": "1.0.0", "ok": True, "latency_ms": 1.0})])
    revoke_device(home, "dev-a")
    enroll_device(home, "dev-a", "rpi4", {"site": "lab"}, tmp_path / "dev-a-new", re_enroll=True)
    assert db["telemetry"].count_where("device = 'dev-a'") == 0
    send(db, "dev-a", [(1, "inference", 2.0, {"model": "digits", "version": "1.0.0", "ok": True, "latency_ms": 1.0})])
    assert telemetry.counts(db, "dev-a") == {"received": 1, "dropped": 0}  # seq 1 again is new, not a duplicate


def test_a_renewal_with_anything_appended_is_refused(home, tmp_path):
    current = (tmp_path / "dev-a/tls/device.pem").read_bytes()
    renewed = renew_device(home, "dev-a", days=400)
    ca_pem = (tmp_path / "dev-a/tls/ca.pem").read_bytes()
    assert certs.pem(certs.check_renewal(ca_pem, current, renewed)) == renewed
    with pytest.raises(EdgeopsError, match="exactly one PEM block"):
        certs.check_renewal(ca_pem, current, renewed + b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")


def test_the_broker_refuses_packets_larger_than_the_protocol_needs(home, tmp_path):
    conf = mosquitto.write_config(home, tmp_path / "broker")["conf"].read_text()
    assert f"max_packet_size {mosquitto.MAX_PACKET}" in conf
    assert wire.MAX_TELEMETRY_PAYLOAD < mosquitto.MAX_PACKET and wire.MAX_BLOCK + 4096 < mosquitto.MAX_PACKET
    assert json.loads((home.path / "fleet.json").read_text())["broker"] == "mqtts://127.0.0.1:1"
    assert home.path.stat().st_mode & 0o077 == 0  # the fleet folder is its user's alone
