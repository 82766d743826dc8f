"""Nothing torn or leaked: atomic writes on full and read-only disks.

The cases with a real full or read-only disk mount a small tmpfs (root with CAP_SYS_ADMIN) and
skip where that is not allowed; each has a twin that makes the write fail by monkeypatching, so
the mechanism is tested everywhere.
"""

from __future__ import annotations

import contextlib
import errno
import io
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from headstart import files
from headstart.errors import HeadstartError


@contextlib.contextmanager
def _tmpfs(path: Path, options: str) -> Iterator[Path]:
    """A tmpfs mounted at ``path`` for the block; skips where mounting is not allowed."""
    path.mkdir(parents=True, exist_ok=True)
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True,
                              text=True)
    except FileNotFoundError:
        pytest.skip("no mount command")
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}); needs root with CAP_SYS_ADMIN")
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


# ---------------------------------------------------------------------- full and read-only disks


def _assert_full_disk_error(e: HeadstartError, dest: Path, need: int) -> None:
    msg = str(e)
    assert "\n" not in msg and str(dest) in msg and "full" in msg, msg
    assert f"it needs {files.format_bytes(need)}" in msg and " free in " in msg, msg


def test_a_full_disk_is_one_line_and_the_old_file_stays(tmp_path):
    with _tmpfs(tmp_path / "small", "size=64k") as small:
        dest = small / "best.pt"
        files.write_atomically(dest, lambda f: f.write(b"old"))
        payload = {"w": torch.zeros(40_000)}  # 160 KB: does not fit
        with pytest.raises(HeadstartError) as e:
            files.write_atomically(dest, lambda f: torch.save(payload, f))  # torch wraps ENOSPC in a RuntimeError
        size = len(_saved_bytes(payload))
        _assert_full_disk_error(e.value, dest, size)
        assert dest.read_bytes() == b"old" and sorted(p.name for p in small.iterdir()) == ["best.pt"]


def _saved_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def test_a_full_disk_is_one_line_without_a_mount(tmp_path, monkeypatch):
    dest = tmp_path / "last.pt"
    dest.write_bytes(b"old")

    def fills_up(f):
        f.write(b"x" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(HeadstartError) as e:
        files.write_atomically(dest, fills_up)
    _assert_full_disk_error(e.value, dest, 1000)  # measuring fails as well: what it wrote before failing
    assert dest.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["last.pt"]
    wrapped = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    wrapped.__context__ = OSError(errno.ENOSPC, "No space left on device")

    def torch_like(f):
        f.write(b"y" * 10)
        if not hasattr(f, "fileno"):  # the counting sink headstart measures with
            f.write(b"y" * 4086)
            return
        raise wrapped

    with pytest.raises(HeadstartError) as e:
        files.write_atomically(dest, torch_like)
    _assert_full_disk_error(e.value, dest, 4096)
    def buggy(f):
        raise ValueError("a bug")

    with pytest.raises(ValueError, match="a bug"):  # other errors are not the disk's: raised as they are
        files.write_atomically(dest, buggy)
    assert dest.read_bytes() == b"old"


def test_a_read_only_folder_is_one_line(tmp_path):
    with _tmpfs(tmp_path / "ro", "size=64k,ro") as ro, \
            pytest.raises(HeadstartError, match=re.escape(f"cannot write {ro}/run/best.pt: {ro} is read-only")):
        files.write_atomically(ro / "run" / "best.pt", lambda f: f.write(b"x"))


def test_a_read_only_folder_is_one_line_without_a_mount(tmp_path, monkeypatch):
    def refuse(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(files.tempfile, "mkstemp", refuse)
    with pytest.raises(HeadstartError) as e:
        files.write_atomically(tmp_path / "best.pt", lambda f: f.write(b"x"))
    assert str(e.value).startswith(f"cannot write {tmp_path}/best.pt: {tmp_path} is read-only"), str(e.value)
