"""Nothing stale, torn or leaked: the feature cache and atomic writes under damage, kills and full disks.

The cases with a real full or read-only disk mount a small tmpfs (root with CAP_SYS_ADMIN) and
skip where that is not allowed; each has a twin that makes the write fail by monkeypatching, so
the mechanism is tested everywhere.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import logging
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from headstart import files
from headstart.config import DataConfig
from headstart.data import build_data
from headstart.errors import HeadstartError
from headstart.models.backbones import build_network
from headstart.training import cache as cache_mod

SIZE = 32


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return build_network("resnet18", "none", num_classes=2, input_size=SIZE)


def _folder(root: Path, per_class: int = 3, seed: int = 0, suffix: str = ".bmp") -> Path:
    """2 classes of noise images; BMP by default: new pixels keep the file size."""
    rng = np.random.default_rng(seed)
    for c in ("ant", "bee"):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(root / c / f"{i}{suffix}")
    return root


def _dataset(folder: Path, net) -> object:
    return build_data(DataConfig(source=str(folder), in_memory=False, val_split=0.5), net.preprocessing).train


def _features(net, ds, root: Path) -> np.ndarray:
    out = cache_mod.cached_features(net, ds, body_fp=cache_mod.body_fingerprint(net), kind="photo", view=0, seed=0,
                                    root=root, batch_size=4, device=torch.device("cpu"), progress=False, desc="t",
                                    data_fp=cache_mod.dataset_fingerprint(ds))
    return np.array(out.features)


def _entry(root: Path) -> Path:
    (entry,) = [p for p in root.iterdir() if p.is_dir()]
    return entry


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


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


# ---------------------------------------------------------------------- stale features


def test_changed_pixels_with_the_same_size_and_mtime_are_not_served_stale(tmp_path, net):
    folder = _folder(tmp_path / "imgs")
    before = _features(net, _dataset(folder, net), tmp_path / "cache")
    for i, path in enumerate(sorted(folder.rglob("*.bmp"))):
        st = path.stat()
        rng = np.random.default_rng(100 + i)
        Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(path)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # what an editor or rsync may keep
        assert (path.stat().st_size, path.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    after = _features(net, _dataset(folder, net), tmp_path / "cache")
    fresh = _features(net, _dataset(folder, net), tmp_path / "fresh-cache")
    assert not np.allclose(after, before), "features of the old pixels were served"
    np.testing.assert_array_equal(after, fresh)
    assert len([p for p in (tmp_path / "cache").iterdir() if p.is_dir()]) == 2


def test_unchanged_files_hit_the_cache_and_a_copy_hashes_alike(tmp_path, net):
    folder = _folder(tmp_path / "imgs")
    ds = _dataset(folder, net)
    first = cache_mod.dataset_fingerprint(ds)
    for path in folder.rglob("*.bmp"):
        os.utime(path, ns=(1, 1))  # touched, not changed: the bytes decide
    assert cache_mod.dataset_fingerprint(ds) == first
    copy = shutil.copytree(folder, tmp_path / "copy")
    assert cache_mod.file_digests([str(copy / Path(p).relative_to(folder)) for p in ds.paths]) == \
        cache_mod.file_digests(ds.paths)
    Path(ds.paths[0]).unlink()
    with pytest.raises(HeadstartError, match="cannot read .*feature cache"):
        cache_mod.dataset_fingerprint(ds)


# ---------------------------------------------------------------------- leaks and damage


def test_orphaned_temporary_files_are_removed_and_never_counted(tmp_path, net):
    root = tmp_path / "cache"
    _features(net, _dataset(_folder(tmp_path / "imgs"), net), root)
    entry = _entry(root)
    whole = cache_mod.cache_entries(root)[0]["bytes"]
    dead = entry / f".view0.npy.{_dead_pid()}.tmp"  # what a killed extraction leaves behind
    dead.write_bytes(b"\0" * (4 << 20))
    live = entry / f".view1.npy.{os.getpid()}.tmp"  # a view being written right now
    live.write_bytes(b"\0" * (1 << 20))
    (info,) = cache_mod.cache_entries(root)
    assert info["bytes"] == whole and info["views"] == 1
    assert not dead.exists() and live.exists()
    # extraction into an entry clears what dead runs left there too
    other = root / ("0" * 24)
    other.mkdir()
    (other / f".view0.npy.{_dead_pid()}.tmp").write_bytes(b"x")
    cache_mod.remove_orphans(other)
    assert list(other.iterdir()) == []


def test_a_partial_view_description_is_listed_as_damaged_and_rebuilt(tmp_path, net, caplog):
    root = tmp_path / "cache"
    ds = _dataset(_folder(tmp_path / "imgs"), net)
    good = _features(net, ds, root)
    meta = _entry(root) / "view0.json"
    meta.write_text(meta.read_text()[:10])
    (info,) = cache_mod.cache_entries(root)  # used to raise JSONDecodeError
    assert "damaged" in info["source"] and info["views"] == 0
    with caplog.at_level(logging.WARNING, logger=cache_mod.log.name):
        again = _features(net, ds, root)
    np.testing.assert_array_equal(again, good)
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(said) == 1 and _entry(root).name in said[0] and "rebuilding" in said[0]
    assert json.loads(meta.read_text())["images"] == len(ds)


def test_a_truncated_feature_file_is_rebuilt_and_said(tmp_path, net, caplog):
    root = tmp_path / "cache"
    ds = _dataset(_folder(tmp_path / "imgs"), net)
    good = _features(net, ds, root)
    npy = _entry(root) / "view0.npy"
    npy.write_bytes(npy.read_bytes()[: npy.stat().st_size // 2])
    with caplog.at_level(logging.WARNING, logger=cache_mod.log.name):
        again = _features(net, ds, root)  # used to raise "mmap length is greater than file size"
    np.testing.assert_array_equal(again, good)
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(said) == 1 and _entry(root).name in said[0] and "view0.npy" in said[0]


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


def test_a_read_only_cache_dir_is_one_line(tmp_path, net):
    ds = _dataset(_folder(tmp_path / "imgs"), net)
    with _tmpfs(tmp_path / "ro", "size=64k,ro") as ro, \
            pytest.raises(HeadstartError, match=re.escape(f"cannot write {ro}/") + ".*read-only.*--cache-dir"):
        _features(net, ds, ro / "features")


def test_a_read_only_cache_dir_is_one_line_without_a_mount(tmp_path, net, monkeypatch):
    ds = _dataset(_folder(tmp_path / "imgs"), net)

    def refuse(self, *a, **k):
        raise OSError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(Path, "mkdir", refuse)
    with pytest.raises(HeadstartError, match="not writable by this user.*--cache-dir"):
        _features(net, ds, tmp_path / "features")


def test_a_full_cache_disk_says_how_much_the_features_need(tmp_path, net):
    ds = _dataset(_folder(tmp_path / "imgs", per_class=24), net)  # 24 train images x 512 floats: 48 KiB
    with _tmpfs(tmp_path / "small", "size=16k") as small:
        with pytest.raises(HeadstartError) as e:
            _features(net, ds, small)
        entry = _entry(small)
        _assert_full_disk_error(e.value, entry / "view0.npy", len(ds) * 512 * 4)
        assert "--cache-dir" in str(e.value) and list(entry.iterdir()) == []
