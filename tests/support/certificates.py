"""TLS certificates made in the test with `cryptography`: a test CA and the server certificates it issues, or
self-signed ones, for any names, addresses and validity.

    ca = CertificateAuthority()
    pair = ca.issue(dns_names=["grpc.test"], ips=["127.0.0.1"])     # verifies against ca.pem
    lone = self_signed(ips=["127.0.0.1"], days=-1)                   # self-signed and expired a day ago
    pair.write(tmp_path, "server")                                   # (cert path, key path)
    ca.write(tmp_path / "ca.pem")                                    # for SSL_CERT_FILE or ssl cafile

Every certificate carries the extensions strict verifiers expect (SKI/AKI, key usage, serverAuth), so that it
verifies under `VERIFY_X509_STRICT` too, as tests/support/nginx.py's does.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_LEAF_USAGE = x509.KeyUsage(
    digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
    key_agreement=False, key_cert_sign=False, crl_sign=False, encipher_only=False, decipher_only=False,
)  # fmt: skip
_CA_USAGE = x509.KeyUsage(
    digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
    key_agreement=False, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False,
)  # fmt: skip


@dataclass(frozen=True)
class KeyPair:
    """A server certificate and its private key, PEM; `not_after` is the certificate's end of validity (UTC)."""

    cert_pem: bytes
    key_pem: bytes
    not_after: dt.datetime

    def write(self, directory: Path, name: str = "server") -> tuple[Path, Path]:
        """Write `<name>.crt` and `<name>.key` (mode 0600) into `directory`; returns their paths."""
        cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
        cert_path.write_bytes(self.cert_pem)
        key_path.write_bytes(self.key_pem)
        key_path.chmod(0o600)
        return cert_path, key_path


def _end(days: float) -> dt.datetime:
    # Whole seconds: X.509 stores none finer, and tests compare the end a result carries with this one.
    return (dt.datetime.now(dt.UTC) + dt.timedelta(days=days)).replace(microsecond=0)


def _leaf(
    subject_key: ec.EllipticCurvePrivateKey,
    issuer: x509.Name,
    issuer_key: ec.EllipticCurvePrivateKey,
    dns_names: Sequence[str],
    ips: Sequence[str],
    days: float,
) -> KeyPair:
    common_name = next(iter(dns_names), None) or next(iter(ips), "healthgate test server")
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    public_key = subject_key.public_key()
    not_after = _end(days)
    names: list[x509.GeneralName] = [x509.DNSName(name) for name in dns_names]
    names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(min(not_after, dt.datetime.now(dt.UTC)) - dt.timedelta(days=2))
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_LEAF_USAGE, critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False)
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    cert = builder.sign(issuer_key, hashes.SHA256())
    key_pem = subject_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return KeyPair(cert.public_bytes(serialization.Encoding.PEM), key_pem, not_after)


class CertificateAuthority:
    """A test CA (its own key, valid for a year) that issues server certificates."""

    def __init__(self, common_name: str = "healthgate test CA") -> None:
        self._key = ec.generate_private_key(ec.SECP256R1())
        self._name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        public_key = self._key.public_key()
        now = dt.datetime.now(dt.UTC)
        self._cert = (
            x509.CertificateBuilder()
            .subject_name(self._name)
            .issuer_name(self._name)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=2))
            .not_valid_after(now + dt.timedelta(days=365))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_CA_USAGE, critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public_key), critical=False)
            .sign(self._key, hashes.SHA256())
        )

    @property
    def pem(self) -> bytes:
        return self._cert.public_bytes(serialization.Encoding.PEM)

    def write(self, path: Path) -> Path:
        path.write_bytes(self.pem)
        return path

    def issue(self, *, dns_names: Sequence[str] = (), ips: Sequence[str] = (), days: float = 30) -> KeyPair:
        """A server certificate for `dns_names` and `ips`, ending in `days` (negative: already expired)."""
        return _leaf(ec.generate_private_key(ec.SECP256R1()), self._name, self._key, dns_names, ips, days)


def self_signed(*, dns_names: Sequence[str] = (), ips: Sequence[str] = ("127.0.0.1",), days: float = 30) -> KeyPair:
    """A self-signed server certificate for `dns_names` and `ips`, ending in `days` (negative: already expired)."""
    key = ec.generate_private_key(ec.SECP256R1())
    common_name = next(iter(dns_names), None) or next(iter(ips), "healthgate test server")
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    return _leaf(key, name, key, dns_names, ips, days)
