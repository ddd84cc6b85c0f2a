"""services/poller/certificates.py: a certificate's validity period, read from DER whatever the DER holds."""

from __future__ import annotations

import datetime as dt

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from services.poller.certificates import Validity, certificate_end, certificate_validity, days_left

START = dt.datetime(2030, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
END = START + dt.timedelta(days=90)


def der_certificate() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "healthgate-test")])
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(START)
        .not_valid_after(END)
        .sign(key, hashes.SHA256())
    )
    return certificate.public_bytes(serialization.Encoding.DER)


def test_the_validity_period_is_read() -> None:
    der = der_certificate()
    assert certificate_validity(der) == Validity(START, END)
    assert certificate_end(der) == END
    assert days_left(END, END - dt.timedelta(hours=36)) == 1.5


def with_version(der: bytes, version: int) -> bytes:
    # The version field opens the TBSCertificate: [0] EXPLICIT INTEGER (v3 is 2).
    at = der.index(bytes([0xA0, 0x03, 0x02, 0x01, 0x02]))
    return der[: at + 4] + bytes([version]) + der[at + 5 :]


def test_a_certificate_that_cannot_be_read_has_no_validity() -> None:
    whole = der_certificate()
    for der in (
        whole[:50],  # cut short
        b"\x30\x00",  # an empty sequence
        b"",
        with_version(whole, 7),  # an X.509 version that does not exist (cryptography's InvalidVersion)
    ):
        assert certificate_validity(der) is None and certificate_end(der) is None, der
