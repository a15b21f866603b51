"""Reading X.509 certificates, for the agent and the fleet alike (the fleet's CA is fleet/ca.py).

The one decision here is `check_renewal`: a device replaces its certificate only with one its
pinned fleet CA signed, for the same subject and the same key, valid for longer. So a renewal that
reaches it over a broker it does not trust cannot change who it is, nor lock it out. The decision
reads no clock: a device's wall clock may be wrong (agent/clock.py).
"""

from __future__ import annotations

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPublicKeyTypes

from edgeops.protocol.errors import EdgeopsError

MAX_PEM = 16 * 1024  # a certificate is ~600 bytes; anything much larger is not one


def load(pem: bytes) -> x509.Certificate:
    """Exactly one PEM certificate, bounded in size."""
    if len(pem) > MAX_PEM:
        raise EdgeopsError(f"a certificate of {len(pem)} bytes is larger than {MAX_PEM}")
    if pem.count(b"-----BEGIN") != 1:
        raise EdgeopsError("not a PEM certificate: exactly one PEM block is expected")
    try:
        return x509.load_pem_x509_certificate(pem)
    except ValueError as exc:
        raise EdgeopsError(f"not a PEM certificate: {exc}") from None


def pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def serial_and_expiry(pem: bytes) -> tuple[int, float]:
    cert = load(pem)
    return cert.serial_number, cert.not_valid_after_utc.timestamp()


def public_key(pem: bytes) -> CertificateIssuerPublicKeyTypes:
    return load(pem).public_key()  # type: ignore[return-value]


def check_renewal(ca_pem: bytes, current_pem: bytes, offered_pem: bytes) -> x509.Certificate:
    """The offered certificate if it may replace the current one (see the module docstring);
    EdgeopsError with the reason otherwise."""
    ca_cert, current, offered = load(ca_pem), load(current_pem), load(offered_pem)
    try:
        offered.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        raise EdgeopsError("the offered certificate is not signed by the pinned fleet CA") from None
    if offered.subject != current.subject:
        raise EdgeopsError(f"the offered certificate is for {offered.subject.rfc4514_string()}, not this device")
    if offered.public_key() != current.public_key():
        raise EdgeopsError("the offered certificate is for another key")
    if offered.not_valid_after_utc <= current.not_valid_after_utc:
        raise EdgeopsError("the offered certificate expires no later than the current one")
    return offered
