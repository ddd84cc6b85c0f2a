"""The health-check key file and AES-256-GCM encryption of check secrets.

Each ciphertext is bound to its check: the check id is the associated data, so a ciphertext copied
onto another check fails authentication instead of decrypting.
"""

from __future__ import annotations

import base64
import binascii
import errno
import os
import secrets
import uuid
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from shared.files import UnusableFile, read_regular_file

KEY_BYTES = 32
NONCE_BYTES = 12


class KeyFileError(Exception):
    """The key file exists but cannot be used; the service that needs it must not start."""


class DecryptionError(Exception):
    """A ciphertext does not belong to this key and check (tampered, moved, or another key)."""


KEY_VARIABLE = "HEALTHGATE_KEY_FILE"
# A key file holds 44 base64 characters and a newline; anything far larger is not a key file (and must not be
# read whole: a path may name a huge file by mistake).
MAX_KEY_FILE_BYTES = 4096


def _decode_key(text: bytes, path: Path) -> bytes:
    """The key from the file's text: base64 of 32 bytes. ASCII whitespace anywhere (a trailing newline, CRLF,
    a key wrapped over lines, spaces pasted around it) is not part of base64 and is dropped; anything else that
    is not base64 is refused."""
    try:
        key = base64.b64decode(b"".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise KeyFileError(
            f"key file {path} ({KEY_VARIABLE}) is malformed: expected base64 of {KEY_BYTES} bytes"
        ) from None
    if len(key) != KEY_BYTES:
        raise KeyFileError(
            f"key file {path} ({KEY_VARIABLE}) is malformed: holds {len(key)} bytes, a 256-bit key needs {KEY_BYTES}"
        )
    return key


def load_or_create_key(path: Path) -> bytes:
    """Read the 32-byte key from `path` (CONTRACT §2 `HEALTHGATE_KEY_FILE`), creating it (mode 0600, parent
    directories too) when absent. An existing file is never overwritten.

    Only a regular file of at most 4 KiB is read, without ever blocking: a FIFO, a device (`/dev/zero`), a
    socket or a directory is refused at once, naming what it is (shared/files.py).

    Raises KeyFileError, one line naming the file and `HEALTHGATE_KEY_FILE`: cannot be created, cannot be read
    (or is not a regular file), or is malformed.
    """
    if not os.path.lexists(path):
        _create_key(path)
    try:
        text = read_regular_file(path, MAX_KEY_FILE_BYTES)
    except UnusableFile as exc:
        raise KeyFileError(f"cannot read key file {path} ({KEY_VARIABLE}): it {exc.reason}") from None
    return _decode_key(text, path)


def _create_key(path: Path) -> None:
    """Write a new key to `path` unless a file appears there first.

    The key is written to a temporary file beside it and then hard-linked into place: `link` fails when the
    name exists, so an existing key is never overwritten, and a service starting at the same moment (`healthgate
    up` starts the api and the poller together) sees either no file or the whole key, never an empty file being
    written. A file system without hard links gets an exclusive create instead."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError:  # mkdir's word for "a part of the path is a file"
        raise KeyFileError(
            f"cannot create key file {path} ({KEY_VARIABLE}): a part of its directory {path.parent} is a file"
        ) from None
    except OSError as exc:
        raise KeyFileError(f"cannot create key file {path} ({KEY_VARIABLE}): {exc.strerror or exc}") from None
    content = base64.b64encode(secrets.token_bytes(KEY_BYTES)) + b"\n"
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    try:
        _write_new(temporary, content)
        try:
            os.link(temporary, path)
        except FileExistsError:
            pass  # another process made it first: use theirs
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.EXDEV):
                raise
            try:
                _write_new(path, content)
            except FileExistsError:
                pass
        finally:
            temporary.unlink(missing_ok=True)
    except OSError as exc:
        raise KeyFileError(f"cannot create key file {path} ({KEY_VARIABLE}): {exc.strerror or exc}") from None


def _write_new(path: Path, content: bytes) -> None:
    """Create `path` (mode 0600, failing if it exists) holding `content`, flushed to disk."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as created:
        created.write(content)
        created.flush()
        os.fsync(created.fileno())


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
