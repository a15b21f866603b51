"""The fleet CA (fleet/ca.py) and the renewal rule devices apply (protocol/certs.py), on real keys."""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from edgeops.fleet import ca
from edgeops.protocol import certs
from edgeops.protocol.errors import EdgeopsError


@pytest.fixture
def pki(tmp_path):
    ca.create_ca(tmp_path / "pki")
    return tmp_path / "pki"


def test_certificates_say_who_and_what_for(pki):
    server = x509.load_pem_x509_certificate(ca.issue(pki, "edgeops broker", 30, server_names=["gw.lan", "10.0.0.5"]).cert)
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["gw.lan"]
    assert [str(a) for a in names.get_values_for_type(x509.IPAddress)] == ["10.0.0.5"]
    assert list(server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.SERVER_AUTH]
    issued = ca.issue(pki, "dev-1", 10)
    device = x509.load_pem_x509_certificate(issued.cert)
    assert device.subject.rfc4514_string() == "CN=dev-1"
    assert list(device.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert not device.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert abs((device.not_valid_after_utc - dt.datetime.now(dt.timezone.utc)) - dt.timedelta(days=10)) < dt.timedelta(minutes=1)
    device.verify_directly_issued_by(x509.load_pem_x509_certificate((pki / "ca.pem").read_bytes()))
    assert ca.issue(pki, "dev-1").serial != issued.serial


def test_one_ca_per_folder_and_at_least_a_day(pki):
    with pytest.raises(EdgeopsError, match="already holds"):
        ca.create_ca(pki)
    with pytest.raises(EdgeopsError, match="at least 1 day"):
        ca.issue(pki, "dev-1", 0)


def test_the_crl_lists_revoked_serials_and_is_due_past_half_its_life(pki):
    assert not ca.crl_due(pki)
    serials = [ca.issue(pki, f"dev-{i}").serial for i in range(2)]
    crl = x509.load_pem_x509_crl(ca.write_crl(pki, serials).read_bytes())
    assert sorted(r.serial_number for r in crl) == sorted(serials)
    (pki / "crl.pem").write_bytes(b"garbage")
    assert ca.crl_due(pki)


def test_a_device_takes_a_renewal_only_for_itself_from_its_ca_and_lasting_longer(tmp_path, pki):
    ca_pem = (pki / "ca.pem").read_bytes()
    current = ca.issue(pki, "dev-1", 10)
    key = certs.public_key(current.cert)
    good = ca.issue(pki, "dev-1", 400, public_key=key).cert
    assert certs.check_renewal(ca_pem, current.cert, good).subject.rfc4514_string() == "CN=dev-1"
    ca.create_ca(tmp_path / "rogue")
    refusals = {
        "not signed by the pinned fleet CA": ca.issue(tmp_path / "rogue", "dev-1", 400, public_key=key).cert,
        "not this device": ca.issue(pki, "dev-2", 400, public_key=key).cert,
        "another key": ca.issue(pki, "dev-1", 400).cert,
        "no later than": ca.issue(pki, "dev-1", 5, public_key=key).cert,
        "not a PEM certificate": b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        "larger than": b"x" * (certs.MAX_PEM + 1),
    }
    for reason, offered in refusals.items():
        with pytest.raises(EdgeopsError, match=reason):
            certs.check_renewal(ca_pem, current.cert, offered)
