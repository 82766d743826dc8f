"""Writing files so that a crash never leaves a torn one under the real name.

A disk that is full, read-only or not ours to write is the user's to fix, not a bug:
:func:`write_atomically` turns it into one :class:`HeadstartError` line naming the file, and for a
full disk how much space the file needed and how much was free (:func:`unwritable`).
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from headstart.errors import HeadstartError

#: errno values that mean "this place cannot be written", as opposed to a bug or a failing disk.
UNWRITABLE = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def write_atomically(dest: str | Path, write: Callable[[BinaryIO], None]) -> Path:
    """Call ``write`` on a temporary file beside ``dest``, flush it to disk, then rename it into place.

    Readers see the old file or the complete new one, never a partial one; the temporary file is
    removed if ``write`` fails or the process is interrupted. A full, read-only or forbidden
    destination raises :class:`HeadstartError`; to tell how much space a file needed, ``write``
    is then called once more on a sink that only counts bytes (so it should write the same bytes
    each time it is called, as ``torch.save`` of one object does).
    """
    dest = Path(dest)
    tmp: str | None = None
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException as e:
        written = _size(tmp)
        _remove(tmp)
        cause = unwritable_cause(e)
        if cause is None:
            raise
        full = cause.errno in (errno.ENOSPC, errno.EDQUOT)
        raise unwritable(dest, cause, need=_measure(write, written) if full else None) from None
    return dest


def unwritable_cause(error: BaseException) -> OSError | None:
    """The OSError saying "cannot write here" behind ``error``, if any.

    Writers wrap it: ``torch.save`` on a full disk raises a RuntimeError whose context is the
    OSError(ENOSPC) of the file's ``write``.
    """
    seen: set[int] = set()
    e: BaseException | None = error if isinstance(error, Exception) else None
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError) and e.errno in UNWRITABLE:
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def unwritable(dest: str | Path, error: OSError, *, need: int | None = None, what: str = "") -> HeadstartError:
    """The one-line error for ``dest`` that could not be written because of ``error``.

    ``need``: the bytes the file needed (a full disk then says that beside the space free);
    ``what`` ends the line with what to do instead of the generic advice.
    """
    dest = Path(dest)
    folder = _existing_parent(dest)
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        free = shutil.disk_usage(folder).free
        room = "quota" if error.errno == errno.EDQUOT else "disk"
        needed = f"it needs {format_bytes(need)}, " if need else ""
        return HeadstartError(
            f"cannot write {dest}: the {room} is full ({needed}{format_bytes(free)} free in {folder}); "
            f"{what or 'free some space or write somewhere else'}")
    why = "read-only" if error.errno == errno.EROFS else "not writable by this user"
    return HeadstartError(f"cannot write {dest}: {folder} is {why} ({error.strerror}); "
                          f"{what or 'give a folder you can write to'}")


def format_bytes(n: int) -> str:
    """``812 bytes``, ``1.4 MiB``, ``2.0 GiB``."""
    if n < 1024:
        return f"{n} bytes"
    size = float(n)
    for unit in ("KiB", "MiB", "GiB"):
        size /= 1024
        if size < 1024:
            return f"{size:.1f} {unit}"
    return f"{size / 1024:.1f} TiB"


class _Counter:
    """A write-only sink that counts the bytes written to it."""

    def __init__(self) -> None:
        self.n = 0

    def write(self, data: bytes) -> int:
        self.n += len(data)
        return len(data)

    def flush(self) -> None:
        pass


def _measure(write: Callable[[BinaryIO], None], at_least: int) -> int:
    """How many bytes ``write`` writes (``at_least`` if it cannot be called again)."""
    counter = _Counter()
    try:
        write(counter)  # type: ignore[arg-type]
    except Exception:  # noqa: BLE001 - only a better number was at stake
        return at_least
    return max(counter.n, at_least)


def _size(path: str | None) -> int:
    try:
        return os.stat(path).st_size if path else 0
    except OSError:
        return 0


def _remove(path: str | None) -> None:
    if path:
        Path(path).unlink(missing_ok=True)


def _existing_parent(path: Path) -> Path:
    p = path.parent
    while not p.exists() and p != p.parent:
        p = p.parent
    return p
