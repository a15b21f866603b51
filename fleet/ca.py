"""The fleet's certificate authority: who may speak MQTT to the fleet, proven by X.509 certificates.

Layout (`FleetHome.pki`, every key mode 0600):
    ca.pem, ca.key              the fleet CA (ECDSA P-256: every embedded TLS stack speaks it)
    broker.pem, broker.key      the broker's server certificate, for the names devices dial
    api.pem, api.key            the HTTP API's server certificate, for the names operators dial
    fleet.pem, fleet.key        the fleet server's client certificate (CN `_edgeops-fleet`)
    ingest-N.pem, ingest-N.key  ingest worker N's client certificate
    crl.pem                     the revocation list the broker checks every handshake against

Invariants:
- A certificate's subject CN is the identity the broker uses (`use_identity_as_username`): a device
  id for a device, a name starting with '_' (which `wire.DEVICE_ID` forbids) for the fleet's own
  clients, so no device can be issued the fleet's identity.
- Device certificates are client-only (extended key usage clientAuth), the broker's server-only,
  so a device certificate cannot impersonate the broker.
- Serial numbers are random 159-bit integers (RFC 5280 allows 20 octets), never reused.
- The CRL lists every serial ever revoked; it is re-signed whole each time, never edited.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edgeops.protocol.bundle import atomic_write
from edgeops.protocol.errors import EdgeopsError

CA_DAYS = 3650
SERVER_DAYS = 825
DEVICE_DAYS = 365
CRL_DAYS = 365  # the broker refuses every client once its CRL is past nextUpdate: re-signed on each revocation and by `fleet serve`
FLEET_CN = "_edgeops-fleet"


@dataclass(frozen=True)
class Issued:
    """A certificate and its key, as PEM."""
    cert: bytes
    key: bytes
    serial: int
    not_after: dt.datetime


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def create_ca(pki: Path, name: str = "edgeops fleet CA") -> None:
    """Create the CA key and self-signed certificate in `pki`, and an empty CRL."""
    pki.mkdir(parents=True, exist_ok=True)
    if (pki / "ca.pem").exists():
        raise EdgeopsError(f"{pki} already holds a certificate authority")
    key = _new_key()
    now = _now()
    cert = (x509.CertificateBuilder().subject_name(_name(name)).issuer_name(_name(name)).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    atomic_write(pki / "ca.key", _key_pem(key), mode=0o600)
    atomic_write(pki / "ca.pem", cert.public_bytes(serialization.Encoding.PEM))
    write_crl(pki, [])


def _ca(pki: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    try:
        cert = x509.load_pem_x509_certificate((pki / "ca.pem").read_bytes())
        key = serialization.load_pem_private_key((pki / "ca.key").read_bytes(), password=None)
    except FileNotFoundError:
        raise EdgeopsError(f"{pki} holds no certificate authority; this fleet predates certificates, so create "
                           "a new one with `edgeops fleet init`") from None
    return cert, key  # type: ignore[return-value]


def issue(pki: Path, cn: str, days: int = DEVICE_DAYS, server_names: list[str] | None = None,
          public_key: ec.EllipticCurvePublicKey | None = None) -> Issued:
    """A certificate for `cn` signed by the fleet CA: a server certificate for `server_names` (DNS
    names or IP addresses) if given, else a client one. A new key is made unless `public_key` is
    given (a renewal keeps the device's key); then `Issued.key` is empty."""
    if days < 1:
        raise EdgeopsError(f"a certificate must be valid for at least 1 day, not {days}")
    ca_cert, ca_key = _ca(pki)
    key = None if public_key is not None else _new_key()
    now = _now()
    not_after = min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc)
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server_names else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(ca_cert.subject)
               .public_key(public_key or key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(not_after)
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False))
    if server_names:
        builder = builder.add_extension(x509.SubjectAlternativeName([_general_name(n) for n in server_names]), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    return Issued(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key) if key else b"",
                  cert.serial_number, not_after)


def _general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def write_issued(issued: Issued, cert_path: Path, key_path: Path | None) -> None:
    atomic_write(cert_path, issued.cert)
    if key_path is not None and issued.key:
        atomic_write(key_path, issued.key, mode=0o600)


def write_crl(pki: Path, revoked_serials: list[int]) -> Path:
    """Re-sign the CRL listing `revoked_serials`; returns its path."""
    ca_cert, ca_key = _ca(pki)
    now = _now()
    builder = (x509.CertificateRevocationListBuilder().issuer_name(ca_cert.subject).last_update(now)
               .next_update(now + dt.timedelta(days=CRL_DAYS)))
    for serial in sorted(set(revoked_serials)):
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now).build())
    crl = builder.sign(ca_key, hashes.SHA256())
    path = pki / "crl.pem"
    atomic_write(path, crl.public_bytes(serialization.Encoding.PEM))
    return path


def crl_due(pki: Path) -> bool:
    """True when the CRL is past half its validity (or unreadable): time to re-sign it."""
    try:
        crl = x509.load_pem_x509_crl((pki / "crl.pem").read_bytes())
    except (OSError, ValueError):
        return True
    left = crl.next_update_utc - _now() if crl.next_update_utc else dt.timedelta(0)
    return left < dt.timedelta(days=CRL_DAYS / 2)
