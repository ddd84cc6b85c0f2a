"""Reading small configuration files (the key file, agent TLS files) without ever blocking or reading too much.

A path in a setting may name anything: a FIFO (opening it for reading waits for a writer, forever), a device
(`/dev/zero` never ends, `/dev/urandom` neither), a socket, a directory, or a huge file. A service must refuse
these at start with one line saying what the file is (CONTRACT §1), not hang or fill its memory. So a file is
used only when it is a regular file: `stat` first (nothing else is ever opened), then open with `O_NONBLOCK`
(should it have been swapped for a FIFO meanwhile, opening returns at once) and `fstat` the open file again,
and read at most a bound.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

# Open flags: O_NONBLOCK so that opening a FIFO never waits for a writer, O_NOCTTY so that a terminal never
# becomes the process's controlling terminal.
_OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)


class UnusableFile(Exception):
    """A file that cannot be used. `reason` completes "the file …", e.g. "is a FIFO (named pipe), not a regular
    file" or "does not exist": the caller names the setting and the path in front of it."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def kind_of(mode: int) -> str:
    """What a `st_mode` that is not a regular file is, in words ("a FIFO (named pipe)")."""
    kinds = (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    )
    return next((word for test, word in kinds if test(mode)), "not a file")


def read_regular_file(path: Path, max_bytes: int) -> bytes:
    """The whole content of `path` (symbolic links followed), which must be a regular file of at most
    `max_bytes` bytes. Never blocks (see the module's docstring) and never reads more than `max_bytes` + 1.

    Raises UnusableFile: missing, not a regular file (which kind it is instead), unreadable (the system's
    words, e.g. "Permission denied"), or larger than `max_bytes`.
    """
    try:
        info = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            raise UnusableFile("does not exist (it is a symbolic link to a missing file)") from None
        raise UnusableFile("does not exist") from None
    except NotADirectoryError:
        raise UnusableFile("does not exist (a part of its path is a file, not a directory)") from None
    except OSError as exc:
        raise UnusableFile(f"cannot be read: {exc.strerror or exc}") from None
    _require_regular(info.st_mode)
    try:
        descriptor = os.open(path, _OPEN_FLAGS)
    except OSError as exc:
        raise UnusableFile(f"cannot be read: {exc.strerror or exc}") from None
    try:
        _require_regular(os.fstat(descriptor).st_mode)  # replaced between stat and open
        chunks: list[bytes] = []
        size = 0
        while size <= max_bytes:
            chunk = os.read(descriptor, max_bytes + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as exc:
        raise UnusableFile(f"cannot be read: {exc.strerror or exc}") from None
    finally:
        os.close(descriptor)
    if size > max_bytes:
        raise UnusableFile(f"is larger than {max_bytes:,} bytes")
    return b"".join(chunks)


def _require_regular(mode: int) -> None:
    if not stat.S_ISREG(mode):
        raise UnusableFile(f"is {kind_of(mode)}, not a regular file")
