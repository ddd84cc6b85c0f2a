"""The health-check key file and AES-256-GCM encryption of check secrets.

Each ciphertext is bound to its check: the check id is the associated data, so a ciphertext copied
onto another check fails authentication instead of decrypting.
"""

from __future__ import annotations

import base64
import binascii
import os
import secrets
import uuid
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

KEY_BYTES = 32
NONCE_BYTES = 12


class KeyFileError(Exception):
    """The key file exists but cannot be used; the service that needs it must not start."""


class DecryptionError(Exception):
    """A ciphertext does not belong to this key and check (tampered, moved, or another key)."""


def _decode_key(text: bytes, path: Path) -> bytes:
    try:
        key = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise KeyFileError(f"key file {path} is malformed: expected base64 of {KEY_BYTES} bytes") from None
    if len(key) != KEY_BYTES:
        raise KeyFileError(f"key file {path} is malformed: holds {len(key)} bytes, a 256-bit key needs {KEY_BYTES}")
    return key


def load_or_create_key(path: Path) -> bytes:
    """Read the key, creating it (mode 0600) when absent. An existing file is never overwritten."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    except OSError as exc:
        raise KeyFileError(f"cannot create key file {path}: {exc.strerror}") from None
    else:
        with os.fdopen(descriptor, "wb") as key_file:
            key_file.write(base64.b64encode(secrets.token_bytes(KEY_BYTES)) + b"\n")
    try:
        return _decode_key(path.read_bytes(), path)
    except OSError as exc:
        raise KeyFileError(f"cannot read key file {path}: {exc.strerror}") from None


class SecretBox:
    """Encrypts and decrypts secrets of one check with the service's key."""

    def __init__(self, key: bytes) -> None:
        self._aead = AESGCM(key)

    def encrypt(self, plaintext: str, check_id: uuid.UUID) -> bytes:
        nonce = secrets.token_bytes(NONCE_BYTES)
        return nonce + self._aead.encrypt(nonce, plaintext.encode(), check_id.bytes)

    def decrypt(self, ciphertext: bytes, check_id: uuid.UUID) -> str:
        nonce, sealed = ciphertext[:NONCE_BYTES], ciphertext[NONCE_BYTES:]
        try:
            return self._aead.decrypt(nonce, sealed, check_id.bytes).decode()
        except (InvalidTag, ValueError):
            raise DecryptionError(f"secret of check {check_id} does not decrypt with this key") from None
