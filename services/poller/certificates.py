"""Reading a TLS server's certificate for `cert_expires_at`, `min_cert_days` and `cert_days_left`
(CONTRACT §3, §4): read from the connection whether or not its certificate was verified."""

from __future__ import annotations

import datetime as dt
import ssl
from dataclasses import dataclass

from cryptography import x509


@dataclass(frozen=True)
class Validity:
    """A certificate's validity period (notBefore, notAfter), UTC."""

    start: dt.datetime
    end: dt.datetime


def certificate_validity(der: bytes) -> Validity | None:
    """The validity period of a DER certificate; None when it cannot be read (not DER, cut short, or an X.509
    version that does not exist: cryptography's InvalidVersion is not a ValueError)."""
    try:
        certificate = x509.load_der_x509_certificate(der)
        return Validity(certificate.not_valid_before_utc, certificate.not_valid_after_utc)
    except (ValueError, x509.InvalidVersion):
        return None


def certificate_end(der: bytes) -> dt.datetime | None:
    """The end of validity (notAfter, UTC) of a DER certificate; None when it cannot be read."""
    validity = certificate_validity(der)
    return None if validity is None else validity.end


def peer_certificate_validity(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> Validity | None:
    """The validity period of the certificate the server presented on this TLS connection (its leaf), or None
    without TLS or certificate. `getpeercert(binary_form=True)` gives it also when verification was off, where
    the parsed form is empty."""
    if ssl_object is None:
        return None
    der = ssl_object.getpeercert(binary_form=True)
    return certificate_validity(der) if der else None


def peer_certificate_end(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> dt.datetime | None:
    """The end of validity of the certificate the server presented on this TLS connection, or None (see
    `peer_certificate_validity`)."""
    validity = peer_certificate_validity(ssl_object)
    return None if validity is None else validity.end


def days_left(end: dt.datetime, now: dt.datetime) -> float:
    """Days from `now` until `end` (fractional; negative once expired)."""
    return (end - now).total_seconds() / 86400
