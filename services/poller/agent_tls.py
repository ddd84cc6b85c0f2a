"""The TLS context for host agents (CONTRACT §2 `HEALTHGATE_AGENT_CA_FILE`, `_CERT_FILE`, `_KEY_FILE`).

The files are checked when the poller starts, and any problem stops it with one line that names each
variable and file and says what is wrong in words (CONTRACT §1), instead of OpenSSL's "[SSL] PEM lib".

OpenSSL judges the files (it is what will use them), and the `cryptography` package explains a refusal:
it parses the certificate and the key, so that "not a PEM certificate", "encrypted key" and "the key does
not match the certificate" can be told apart. Every file is read through `shared.files.read_regular_file`
first: a FIFO, a device or a directory is refused by name and never opened, so nothing here can block.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from shared.files import UnusableFile, read_regular_file
from shared.settings import ServiceConfigError

CA_VARIABLE = "HEALTHGATE_AGENT_CA_FILE"
CERT_VARIABLE = "HEALTHGATE_AGENT_CERT_FILE"
KEY_VARIABLE = "HEALTHGATE_AGENT_KEY_FILE"
# A CA bundle with every public root is about 220 KB; a few MiB leaves room and still refuses a wrong path
# to something huge.
MAX_PEM_BYTES = 4 * 1024 * 1024
PEM_CERTIFICATE_LINE = b"-----BEGIN CERTIFICATE-----"


class AgentTlsError(ServiceConfigError):
    """The agent TLS files cannot be used; the message is one line naming every problem."""


class _PassphraseNeeded(Exception):
    """Raised from OpenSSL's passphrase callback: without a callback OpenSSL would ask on the terminal."""


def _refuse_passphrase() -> bytes:
    raise _PassphraseNeeded


def agent_ssl_context(ca_file: Path | None, cert_file: Path | None, key_file: Path | None) -> ssl.SSLContext | None:
    """The TLS context for the agents' HTTPS: trust `ca_file` (else the system's roots), present `cert_file`
    with the key in `key_file`, or in `cert_file` itself when `key_file` is None (mTLS). None when no file is
    set: agents are then reached with the system's roots and no client certificate.

    Raises AgentTlsError listing every problem, each naming its variable and file: missing or not a regular
    file (a FIFO, a device, a directory: never opened), not PEM (or DER, with how to convert it), no
    certificate in it, no private key, an encrypted key, a key that does not match the certificate, or a key
    without a certificate.
    """
    if ca_file is None and cert_file is None and key_file is None:
        return None
    problems: list[str] = []
    ca = _read(CA_VARIABLE, ca_file, problems)
    cert = _read(CERT_VARIABLE, cert_file, problems)
    key = _read(KEY_VARIABLE, key_file, problems)
    if key_file is not None and cert_file is None:
        problems.append(f"{KEY_VARIABLE} {key_file} is set without {CERT_VARIABLE}: give the certificate it belongs to")
    context = _trusting(ca_file, ca, problems) if ca_file is not None else ssl.create_default_context()
    if cert_file is not None and cert is not None and (key_file is None or key is not None):
        problem = _chain_problem(context, cert_file, cert, key_file, key)
        if problem:
            problems.append(problem)
    if problems:
        raise AgentTlsError("cannot use the agent TLS files: " + "; ".join(problems))
    return context


def _read(variable: str, path: Path | None, problems: list[str]) -> bytes | None:
    if path is None:
        return None
    try:
        return read_regular_file(path, MAX_PEM_BYTES)
    except UnusableFile as exc:
        problems.append(f"{variable} {path} {exc.reason}")
        return None


def _trusting(ca_file: Path, ca: bytes | None, problems: list[str]) -> ssl.SSLContext:
    """A verifying context that trusts only the certificates in `ca` (OpenSSL reads them from the bytes
    already read: the file is not opened again)."""
    if ca is None:
        return ssl.create_default_context()
    # OpenSSL takes PEM text as ASCII; text outside the certificate blocks (comments naming issuers, often
    # UTF-8) does not matter to it, so any other byte becomes "?".
    text = ca.decode("latin-1").encode("ascii", "replace").decode("ascii")
    try:
        context = ssl.create_default_context(cadata=text) if text.strip() else None
    except ssl.SSLError:
        context = None
    if context is None or context.cert_store_stats()["x509"] == 0:
        problems.append(f"{CA_VARIABLE} {ca_file} {_not_certificates(ca)}")
        return ssl.create_default_context()
    return context


def _not_certificates(data: bytes) -> str:
    """Why `data` holds no usable PEM certificate, in words."""
    if not data.strip():
        return "is empty: expected PEM certificates (-----BEGIN CERTIFICATE-----)"
    try:
        x509.load_der_x509_certificate(data)
    except ValueError:
        pass
    else:
        return "is a DER (binary) certificate, not PEM: convert it with `openssl x509 -inform der -outform pem`"
    if PEM_CERTIFICATE_LINE not in data:
        return "is not a PEM certificate: it has no -----BEGIN CERTIFICATE----- block"
    return "is not a PEM certificate: its -----BEGIN CERTIFICATE----- block does not decode"


def _chain_problem(
    context: ssl.SSLContext, cert_file: Path, cert: bytes, key_file: Path | None, key: bytes | None
) -> str | None:
    """Load the client certificate and its key into `context`; None when OpenSSL takes them, else why not."""
    try:
        context.load_cert_chain(cert_file, key_file, password=_refuse_passphrase)
    except (ssl.SSLError, _PassphraseNeeded) as exc:
        why = getattr(exc, "reason", None) or str(exc) or "the key needs a passphrase"
        files = f"{CERT_VARIABLE} {cert_file}" + (f" and {KEY_VARIABLE} {key_file}" if key_file else "")
        return _explain_chain(cert_file, cert, key_file, key) or f"{files}: OpenSSL refuses them ({why})"
    return None


def _explain_chain(cert_file: Path, cert: bytes, key_file: Path | None, key: bytes | None) -> str | None:
    """Why OpenSSL refused the certificate and key, in words (None when no reason is found here)."""
    try:
        certificate = x509.load_pem_x509_certificates(cert)[0]
    except ValueError:
        return f"{CERT_VARIABLE} {cert_file} {_not_certificates(cert)}"
    if key_file is None:
        source, source_path, key = CERT_VARIABLE, cert_file, cert
    else:
        source, source_path = KEY_VARIABLE, key_file
    try:
        private_key = serialization.load_pem_private_key(key or b"", password=None)
    except TypeError:  # cryptography's word for "encrypted, and no password given"
        return f"{source} {source_path} holds an encrypted (passphrase-protected) key: give it unencrypted"
    except UnsupportedAlgorithm:
        return f"{source} {source_path} holds a private key of a type that is not supported"
    except ValueError:
        if key_file is None:
            return f"{CERT_VARIABLE} {cert_file} holds no private key and {KEY_VARIABLE} is not set"
        if PEM_CERTIFICATE_LINE in (key or b""):
            return f"{KEY_VARIABLE} {key_file} holds a certificate, not a private key"
        return f"{KEY_VARIABLE} {key_file} is not a PEM private key (-----BEGIN PRIVATE KEY-----)"
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if private_key.public_key().public_bytes(*spki) != certificate.public_key().public_bytes(*spki):
        return f"{source} {source_path} holds a key that does not match the certificate in {CERT_VARIABLE} {cert_file}"
    return None
