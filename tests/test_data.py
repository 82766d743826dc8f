"""Tests for headstart.data: sources, splits, image loading, transforms and loaders."""

from __future__ import annotations

import logging
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from headstart.config import DataConfig
from headstart.data import DataBundle, build_data, build_transform, list_images, load_image, loaders, make_loader
from headstart.data import datasets as hd_datasets
from headstart.data.splits import stratified_limit
from headstart.errors import HeadstartError, OfflineError
from headstart.models.preprocess import Preprocessing

PRE = Preprocessing(crop=16, resize=18)  # tiny sizes keep every test fast
COLOURS = {"cat": (200, 30, 30), "dog": (30, 200, 30), "fox": (30, 30, 200)}


def _write_images(folder: Path, per_class: dict[str, int], size: int = 20) -> None:
    """``per_class[c]`` small solid-ish PNGs in ``folder/c``."""
    rng = np.random.default_rng(0)
    for c, n in per_class.items():
        (folder / c).mkdir(parents=True, exist_ok=True)
        base = np.array(COLOURS.get(c, (120, 120, 120)), dtype=np.int16)
        for i in range(n):
            noise = rng.integers(-20, 20, (size, size, 3))
            arr = np.clip(base + noise, 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(folder / c / f"{c}_{i:02d}.png")


@pytest.fixture
def three_classes(tmp_path: Path) -> Path:
    root = tmp_path / "pets"
    _write_images(root, {"cat": 6, "dog": 6, "fox": 6})
    return root


def _cfg(source, **kw) -> DataConfig:
    return DataConfig(source=str(source), **kw)


# --------------------------------------------------------------------------- folders


def test_folder_split_is_stratified_and_seeded(three_classes: Path) -> None:
    a = build_data(_cfg(three_classes, val_split=0.2), PRE, seed=1)
    b = build_data(_cfg(three_classes, val_split=0.2), PRE, seed=1)
    c = build_data(_cfg(three_classes, val_split=0.2), PRE, seed=2)
    assert a.classes == ["cat", "dog", "fox"]
    assert a.source == str(three_classes) and a.skipped == 0 and a.kind == "photo"
    assert len(a.train) + len(a.val) == 18
    assert [a.val.describe(i) for i in range(len(a.val))] == [b.val.describe(i) for i in range(len(b.val))]
    assert {a.val.describe(i) for i in range(len(a.val))} != {c.val.describe(i) for i in range(len(c.val))}
    counts = a.class_counts()
    assert all(n >= 1 for n in counts["val"].values())
    assert counts["train"] == {"cat": 5, "dog": 5, "fox": 5}
    # no image in both splits; describe names the file; targets match folder names
    train_files = {a.train.describe(i) for i in range(len(a.train))}
    assert not train_files & {a.val.describe(i) for i in range(len(a.val))}
    for i in range(len(a.train)):
        assert Path(a.train.describe(i)).parent.name == a.classes[a.train.targets[i]]
    x, y = a.train[0]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and isinstance(y, int)


def test_every_class_reaches_val_and_singletons_stay_in_train(tmp_path: Path) -> None:
    _write_images(tmp_path, {f"c{i}": 2 for i in range(10)} | {"solo": 1})
    b = build_data(_cfg(tmp_path, val_split=0.1), PRE)
    counts = b.class_counts()
    assert all(counts["val"][f"c{i}"] == 1 and counts["train"][f"c{i}"] == 1 for i in range(10))
    assert counts["train"]["solo"] == 1 and counts["val"]["solo"] == 0


def test_train_val_layout(tmp_path: Path) -> None:
    _write_images(tmp_path / "train", {"cat": 4, "dog": 4, "fox": 4})
    _write_images(tmp_path / "valid", {"cat": 2, "dog": 2})
    b = build_data(_cfg(tmp_path), PRE)
    assert b.classes == ["cat", "dog", "fox"]
    assert len(b.train) == 12 and len(b.val) == 4
    assert b.class_counts()["val"] == {"cat": 2, "dog": 2, "fox": 0}
    assert all("valid" in b.val.describe(i) for i in range(len(b.val)))


def test_val_class_missing_from_train_is_an_error(tmp_path: Path) -> None:
    _write_images(tmp_path / "train", {"cat": 2, "dog": 2})
    _write_images(tmp_path / "val", {"cat": 1, "fox": 1})
    with pytest.raises(HeadstartError, match="fox"):
        build_data(_cfg(tmp_path), PRE)


@pytest.mark.parametrize(
    ("setup", "words"),
    [
        (lambda p: None, ["no images", "subfolder"]),
        (lambda p: _write_images(p, {"cat": 3}), ["only one class", "cat"]),
        (lambda p: Image.new("RGB", (4, 4)).save(p / "loose.png"), ["directly in", "subfolder"]),
    ],
    ids=["empty", "one-class", "no-subfolders"],
)
def test_bad_folders(tmp_path: Path, setup, words) -> None:
    setup(tmp_path)
    with pytest.raises(HeadstartError) as e:
        build_data(_cfg(tmp_path), PRE)
    msg = str(e.value)
    assert str(tmp_path) in msg
    for w in words:
        assert w in msg


def test_missing_path_and_unknown_name(tmp_path: Path) -> None:
    with pytest.raises(HeadstartError) as e:
        build_data(_cfg(tmp_path / "nope"), PRE)
    assert "does not exist" in str(e.value) and "cifar10" in str(e.value) and "nope" in str(e.value)
    with pytest.raises(HeadstartError) as e:
        build_data(_cfg("mnist"), PRE)
    msg = str(e.value)
    assert "unknown data source" in msg and "'mnist'" in msg and "digits" in msg and "folder" in msg


def test_bad_val_split(three_classes: Path) -> None:
    for bad in (0.0, 1.0, 1.5):
        with pytest.raises(HeadstartError, match="val_split"):
            build_data(_cfg(three_classes, val_split=bad), PRE)


def test_corrupt_image_skipped_with_one_warning(three_classes: Path, caplog) -> None:
    (three_classes / "dog" / "broken.jpg").write_bytes(b"this is not a jpeg at all" * 10)
    (three_classes / "dog" / "._resource_fork.jpg").write_bytes(b"\x00\x05\x16\x07")  # ignored silently
    (three_classes / "dog" / "notes.txt").write_text("ignored: not an image extension")
    with caplog.at_level(logging.WARNING, logger="headstart.data"):
        b = build_data(_cfg(three_classes), PRE)
    assert b.skipped == 1
    assert len(b.train) + len(b.val) == 18
    warnings = [r for r in caplog.records if r.name == "headstart.data" and r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "skipped 1 unreadable" in warnings[0].getMessage() and "broken.jpg" in warnings[0].getMessage()
    with pytest.raises(HeadstartError, match="broken.jpg"):
        build_data(_cfg(three_classes, strict=True), PRE)


def _truncated_jpeg(path: Path) -> Path:
    """A JPEG cut in half: ``Image.verify()`` passes it, only decoding it fails."""
    rng = np.random.default_rng(7)
    Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(path, quality=95)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with Image.open(path) as im:
        im.verify()
    return path


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "headstart.data" and r.levelno == logging.WARNING]


@pytest.mark.parametrize("in_memory", [False, True])
def test_truncated_jpeg_is_skipped_at_scan_time(three_classes: Path, caplog, in_memory) -> None:
    _truncated_jpeg(three_classes / "cat" / "cut.jpg")
    with caplog.at_level(logging.WARNING, logger="headstart.data"):
        b = build_data(_cfg(three_classes, in_memory=in_memory), PRE)
    assert b.skipped == 1 and len(b.train) + len(b.val) == 18
    assert any("skipped 1 unreadable" in w and "cut.jpg" in w for w in _warnings(caplog))
    for ds in (b.train, b.val):
        for i in range(len(ds)):
            ds[i]  # every image left in reads
    with pytest.raises(HeadstartError, match="1 unreadable image.*cut.jpg") as e:
        build_data(_cfg(three_classes, strict=True), PRE)
    assert "\n" not in str(e.value)


def test_symlink_loops_and_links_count_each_file_once(three_classes: Path, caplog) -> None:
    os.symlink(".", three_classes / "cat" / "loop")  # a cycle: was 20 images turned into hundreds
    os.symlink("..", three_classes / "dog" / "up")  # back to the root: would pull every class into dog
    os.link(three_classes / "fox" / "fox_00.png", three_classes / "fox" / "hard.png")
    os.symlink("fox_01.png", three_classes / "fox" / "soft.png")
    (three_classes / "cat" / "more").mkdir()
    os.symlink("../../dog", three_classes / "cat" / "more" / "dogs")  # a link to another class folder
    with caplog.at_level(logging.WARNING, logger="headstart.data"):
        b = build_data(_cfg(three_classes, val_split=0.5), PRE, seed=0)
    assert b.class_counts()["train"] == {"cat": 3, "dog": 3, "fox": 3}
    assert b.class_counts()["val"] == {"cat": 3, "dog": 3, "fox": 3}
    inodes = [{os.stat(ds.describe(i)).st_ino for i in range(len(ds))} for ds in (b.train, b.val)]
    assert len(inodes[0]) == len(b.train) and len(inodes[1]) == len(b.val) and not inodes[0] & inodes[1]
    said = [w for w in _warnings(caplog) if "reached twice" in w]
    assert len(said) == 1 and said[0].startswith("skipped 5 path(s)"), said
    for name in ("cat/loop", "dog/up", "fox/hard.png", "fox/soft.png", "cat/more/dogs"):
        assert name in said[0]
    assert b.skipped == 2  # the two links to files (the folders skipped held no new images)
    assert len(list_images(three_classes)) == 18


def test_the_same_file_in_train_and_val_stays_in_train(tmp_path: Path, caplog) -> None:
    _write_images(tmp_path / "train", {"cat": 3, "dog": 3})
    _write_images(tmp_path / "val", {"cat": 1, "dog": 1})
    os.link(tmp_path / "train" / "cat" / "cat_01.png", tmp_path / "val" / "cat" / "copy.png")
    os.symlink("../../train/dog/dog_02.png", tmp_path / "val" / "dog" / "copy.png")
    with caplog.at_level(logging.WARNING, logger="headstart.data"):
        b = build_data(_cfg(tmp_path), PRE)
    assert len(b.train) == 6 and len(b.val) == 2
    assert not any("copy.png" in b.val.describe(i) for i in range(len(b.val)))
    assert any("val/cat/copy.png" in w and "val/dog/copy.png" in w for w in _warnings(caplog))


def test_an_error_in_a_loader_worker_is_the_original_one_line(tmp_path: Path) -> None:
    good = tmp_path / "good.png"
    Image.new("RGB", (8, 8), (1, 2, 3)).save(good)
    bad = _truncated_jpeg(tmp_path / "cut.jpg")  # a file that went bad after the folder was scanned
    ds = hd_datasets.FileDataset([good, good, bad, good], [0, 0, 1, 1], ["a", "b"],
                                 transform=build_transform(PRE, train=False, augment=False))
    for workers in (0, 1):
        with pytest.raises(HeadstartError) as e:
            list(make_loader(ds, batch_size=2, shuffle=False, workers=workers, seed=0))
        assert str(e.value).startswith(f"cannot read image {bad}:"), str(e.value)
        assert "\n" not in str(e.value) and "worker" not in str(e.value)


def test_limits_are_stratified_and_seeded(tmp_path: Path) -> None:
    _write_images(tmp_path, {"cat": 12, "dog": 12, "fox": 12})
    b = build_data(_cfg(tmp_path, val_split=0.5, limit_train=6, limit_val=3), PRE, seed=3)
    assert len(b.train) == 6 and len(b.val) == 3
    counts = b.class_counts()
    assert counts["train"] == {"cat": 2, "dog": 2, "fox": 2}
    assert counts["val"] == {"cat": 1, "dog": 1, "fox": 1}
    again = build_data(_cfg(tmp_path, val_split=0.5, limit_train=6, limit_val=3), PRE, seed=3)
    assert [b.train.describe(i) for i in range(6)] == [again.train.describe(i) for i in range(6)]
    with pytest.raises(HeadstartError, match="limit_train"):
        build_data(_cfg(tmp_path, limit_train=0), PRE)


def test_stratified_limit_keeps_proportions() -> None:
    targets = [0] * 80 + [1] * 20
    idx = stratified_limit(targets, 10, seed=0)
    assert np.bincount(np.asarray(targets)[idx]).tolist() == [8, 2]
    assert len(set(idx.tolist())) == 10


def test_datasets_api_and_pickling(three_classes: Path) -> None:
    b = build_data(_cfg(three_classes, in_memory=False), PRE)  # files (in-memory: tests/test_memory.py)
    ds = b.train
    assert ds.classes == b.classes and isinstance(ds.targets, list)
    raw = ds.raw_image(0)
    assert raw.mode == "RGB" and raw.size == (20, 20)
    ds2 = pickle.loads(pickle.dumps(ds))  # DataLoader workers pickle datasets
    assert ds2.targets == ds.targets and ds2.describe(3) == ds.describe(3)
    assert ds2[0][0].shape == (3, 16, 16)
    ds.transform = b.val.transform  # swappable, e.g. to cache features without augmentation
    assert torch.equal(ds[0][0], b.val.transform(raw))
    digits = build_data(DataConfig(source="digits", limit_train=10, limit_val=10), PRE)
    assert pickle.loads(pickle.dumps(digits.train)).describe(0) == digits.train.describe(0)


def test_list_images(three_classes: Path, tmp_path: Path) -> None:
    (three_classes / "cat" / "UPPER.JPG").write_bytes(b"whatever")
    found = list_images(three_classes)
    assert len(found) == 19 and found == sorted(found)
    assert list_images(found[0]) == [found[0]]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(HeadstartError, match="no images"):
        list_images(empty)
    with pytest.raises(HeadstartError, match="does not exist"):
        list_images(tmp_path / "missing")


# --------------------------------------------------------------------------- load_image


def test_load_image_modes(tmp_path: Path) -> None:
    def roundtrip(im: Image.Image, name: str) -> Image.Image:
        im.save(tmp_path / name)
        out = load_image(tmp_path / name)
        assert out.mode == "RGB"
        return out

    assert roundtrip(Image.new("L", (4, 4), 100), "l.png").getpixel((0, 0)) == (100, 100, 100)
    assert roundtrip(Image.new("1", (4, 4), 1), "one.png").getpixel((0, 0)) == (255, 255, 255)
    assert roundtrip(Image.new("CMYK", (4, 4), (0, 0, 0, 0)), "cmyk.tif").getpixel((0, 0)) == (255, 255, 255)
    assert roundtrip(Image.new("CMYK", (4, 4), (0, 255, 255, 0)), "red.tif").getpixel((0, 0)) == (255, 0, 0)

    pal = Image.new("P", (4, 4), 1)
    pal.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    assert roundtrip(pal, "p.png").getpixel((0, 0)) == (10, 200, 30)
    pal.putpixel((1, 1), 0)
    pal.info["transparency"] = 0  # index 0 (black) is transparent
    out = roundtrip(pal, "ptrans.png")
    assert out.getpixel((1, 1)) == (255, 255, 255) and out.getpixel((0, 0)) == (10, 200, 30)

    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))  # fully transparent black
    rgba.putpixel((2, 2), (10, 20, 30, 255))
    out = roundtrip(rgba, "rgba.png")
    assert out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((2, 2)) == (10, 20, 30)
    la = Image.new("LA", (4, 4), (0, 0))
    assert roundtrip(la, "la.png").getpixel((0, 0)) == (255, 255, 255)


@pytest.mark.parametrize("suffix", ["png", "tif"])
def test_16bit_gradient_stays_a_gradient(tmp_path: Path, suffix: str) -> None:
    grad = np.linspace(0, 65535, 64).astype(np.uint16).reshape(8, 8)
    Image.fromarray(grad).save(tmp_path / f"g16.{suffix}")
    out = np.asarray(load_image(tmp_path / f"g16.{suffix}"))
    assert out.dtype == np.uint8 and out.shape == (8, 8, 3)
    flat = out[..., 0].ravel()
    assert flat[0] == 0 and flat[-1] == 255 and abs(int(flat[32]) - 130) <= 2
    assert np.all(np.diff(flat.astype(int)) >= 0) and len(np.unique(flat)) > 50
    # mode "I" (32-bit container holding 16-bit data) scales the same way
    Image.fromarray(grad.astype(np.int32)).save(tmp_path / "gi.tif")
    assert np.array_equal(np.asarray(load_image(tmp_path / "gi.tif")), out)


def test_load_image_exif_orientation_and_errors(tmp_path: Path) -> None:
    im = Image.new("RGB", (6, 3), (0, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    im.save(tmp_path / "rot.jpg", exif=exif)
    assert load_image(tmp_path / "rot.jpg").size == (3, 6)
    with pytest.raises(HeadstartError, match="does not exist"):
        load_image(tmp_path / "missing.png")
    (tmp_path / "bad.png").write_bytes(b"garbage")
    with pytest.raises(HeadstartError, match="bad.png"):
        load_image(tmp_path / "bad.png")


# --------------------------------------------------------------------------- digits and CIFAR


def test_digits_bundle() -> None:
    pre = Preprocessing(crop=24, resize=28)
    b = build_data(DataConfig(source="digits", val_split=0.25), pre, seed=0)
    assert isinstance(b, DataBundle) and b.kind == "digits" and b.source == "digits"
    assert b.classes == [str(i) for i in range(10)]
    assert len(b.train) + len(b.val) == 1797
    assert all(n > 0 for n in b.class_counts()["val"].values())
    x, y = b.val[0]
    assert x.shape == (3, 24, 24) and x.dtype == torch.float32 and 0 <= y <= 9
    # normalised: the black background maps to -mean/std, not 0
    assert x.min().item() == pytest.approx(-pre.mean[0] / pre.std[0], abs=1e-4)
    assert b.val.describe(0).startswith("digits #")
    raw = np.asarray(b.val.raw_image(0))
    assert raw.shape == (8, 8, 3) and raw.max() > 200
    lim = build_data(DataConfig(source="digits", limit_train=50, limit_val=20), pre)
    assert len(lim.train) == 50 and len(lim.val) == 20
    assert set(lim.class_counts()["train"].values()) == {5}


def test_cifar_offline_raises_offline_error(tmp_path: Path, monkeypatch) -> None:
    import torchvision.datasets.cifar as tv_cifar

    def no_network(url, *a, **kw):
        raise OSError("[Errno -3] Temporary failure in name resolution")

    # CIFAR10.download calls the name imported into torchvision.datasets.cifar.
    monkeypatch.setattr(tv_cifar, "download_and_extract_archive", no_network)
    root = tmp_path / "cache"
    for name, archive in (("cifar10", "cifar-10-python.tar.gz"), ("cifar100", "cifar-100-python.tar.gz")):
        with pytest.raises(OfflineError) as e:
            build_data(DataConfig(source=name, root=str(root)), PRE)
        msg = str(e.value)
        assert archive in msg and str(root) in msg and "https://" in msg and "extract" in msg


# --------------------------------------------------------------------------- transforms and loaders


def test_transforms() -> None:
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 40, 3), dtype=np.uint8))
    ev = build_transform(PRE, train=False, augment=True)
    assert torch.equal(ev(img), ev(img)) and ev(img).shape == (3, 16, 16)
    no_aug = build_transform(PRE, train=True, augment=False)
    assert torch.equal(no_aug(img), ev(img))
    tr = build_transform(PRE, train=True, augment=True)
    torch.manual_seed(0)
    outs = [tr(img) for _ in range(4)]
    assert all(o.shape == (3, 16, 16) for o in outs)
    assert any(not torch.equal(outs[0], o) for o in outs[1:])
    dig = build_transform(PRE, train=True, augment=True, kind="digits")
    assert not any(type(t).__name__ == "RandomHorizontalFlip" for t in dig.transforms)
    assert any(type(t).__name__ == "RandomAffine" for t in dig.transforms)
    assert not torch.equal(dig(img), dig(img))
    dig_eval = build_transform(PRE, train=False, augment=False, kind="digits")
    assert dig_eval(img).shape == (3, 16, 16)  # non-square input still ends square
    with pytest.raises(HeadstartError, match="interpolation"):
        build_transform(Preprocessing(interpolation="lanczos9"), train=False, augment=False)


@pytest.mark.parametrize("kind, policy", [("digits", "none"), ("photo", "randaugment"), ("photo", "trivialaugment")])
def test_bicubic_models_augment_every_kind(kind: str, policy: str) -> None:
    # timm's EfficientNets resize bicubically; torchvision warps image tensors only nearest or
    # bilinear, so the digits' affine and the policies' rotations must not inherit bicubic.
    pre = Preprocessing(crop=16, resize=18, interpolation="bicubic")
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (12, 12, 3), dtype=np.uint8))
    tr = build_transform(pre, train=True, augment=True, kind=kind, policy=policy)
    torch.manual_seed(0)
    assert all(tr(img).shape == (3, 16, 16) for _ in range(8))


def test_loader_same_seed_same_order(three_classes: Path) -> None:
    b = build_data(_cfg(three_classes), PRE)
    b.train.transform = b.val.transform  # deterministic pixels: compare order only

    def first_batch(seed, workers):
        loader = make_loader(b.train, batch_size=4, shuffle=True, workers=workers, seed=seed)
        return next(iter(loader))

    x1, y1 = first_batch(7, 0)
    x2, y2 = first_batch(7, 0)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    x3, _ = first_batch(8, 0)
    assert not torch.equal(x1, x3)
    x4, y4 = first_batch(7, 1)  # worker processes give the same order as the main process
    assert torch.equal(x1, x4) and torch.equal(y1, y4)


def test_default_workers(three_classes: Path, monkeypatch) -> None:
    digits = build_data(DataConfig(source="digits", limit_train=20, limit_val=10), PRE)
    assert loaders.default_workers(digits.train) == 0
    files = build_data(_cfg(three_classes, in_memory=False), PRE).train
    decoded = build_data(_cfg(three_classes), PRE).train  # still resized and cropped per item
    monkeypatch.setattr(loaders, "usable_cpus", lambda: 2)
    assert loaders.default_workers(decoded) == 1
    decoded.batch_device = torch.device("cpu")  # items are raw slices: transformed per batch
    assert loaders.default_workers(decoded) == 0
    monkeypatch.setattr(loaders, "usable_cpus", lambda: 1)
    assert loaders.default_workers(files) == 0
    monkeypatch.setattr(loaders, "usable_cpus", lambda: 2)
    assert loaders.default_workers(files) == 1
    monkeypatch.setattr(loaders, "usable_cpus", lambda: 32)
    assert loaders.default_workers(files) == 4
    monkeypatch.setattr(loaders, "usable_cpus", lambda: 2)  # more workers than cores makes torch warn
    loader = make_loader(files, batch_size=4, shuffle=False, workers=None, seed=0)
    # loaders are rebuilt every epoch, so persistent workers would only hold memory
    assert loader.num_workers == 1 and not loader.persistent_workers
    assert make_loader(digits.train, batch_size=4, shuffle=False, workers=None, seed=0).num_workers == 0
    with pytest.raises(HeadstartError, match="batch_size"):
        make_loader(files, batch_size=0, shuffle=False, workers=0, seed=0)


def test_cifar_from_extracted_files(tmp_path: Path, monkeypatch) -> None:
    """The wrapping of torchvision's CIFAR10 (arrays, classes, official test split as val)."""
    import torchvision.datasets.cifar as tv_cifar

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    names = ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"]
    for n in names:
        pixels = rng.integers(0, 255, (20, 3 * 32 * 32), dtype=np.uint8)
        batch = {"data": pixels, "labels": [i % 10 for i in range(20)]}
        (folder / n).write_bytes(pickle.dumps(batch))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"k{i}" for i in range(10)]}))
    # The fake files fail torchvision's md5 checks; skip those checks (and any download).
    monkeypatch.setattr(tv_cifar.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *a, **k: True)
    b = build_data(DataConfig(source="cifar10", root=str(tmp_path), limit_val=10), PRE)
    assert b.classes == [f"k{i}" for i in range(10)] and b.kind == "photo" and b.source == "cifar10"
    assert len(b.train) == 100 and len(b.val) == 10
    assert set(b.class_counts()["val"].values()) == {1}
    assert b.val.describe(0).startswith("cifar10 test #")
    assert b.train.raw_image(0).size == (32, 32) and b.train[0][0].shape == (3, 16, 16)
    assert loaders.default_workers(b.train) == 0
