"""Image folders decoded once into memory, and the batched (GPU-side) transforms."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from headstart.cli.main import build_parser
from headstart.config import DataConfig, RunConfig, apply_overrides
from headstart.data import build_data, build_transform, make_loader
from headstart.data.datasets import FileDataset, MemoryDataset
from headstart.data.memory import enable_batch_transforms, hold_in_memory
from headstart.data.transforms import BatchTransform
from headstart.errors import HeadstartError
from headstart.jobs.train import prepare
from headstart.models.preprocess import Preprocessing
from headstart.training import cache as cache_mod
from headstart.training.fit import fit

PRE = Preprocessing(crop=24, resize=28)


def _folder(root: Path, sizes: list[tuple[int, int]], per_class: int = 6) -> Path:
    rng = np.random.default_rng(0)
    for c in ("ant", "bee", "cat"):
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            w, h = sizes[i % len(sizes)]
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


def _data(root: Path, **kw) -> object:
    return build_data(DataConfig(source=str(root), **kw), PRE, seed=0)


def test_same_size_small_images_are_kept_as_decoded(tmp_path):
    root = _folder(tmp_path / "imgs", [(20, 16)])
    mem, files = _data(root), _data(root, in_memory=False)
    assert isinstance(mem.train, MemoryDataset) and isinstance(files.train, FileDataset)
    assert mem.train.stored_shape == (3, 16, 20)
    assert mem.train.paths == files.train.paths and mem.train.targets == files.train.targets
    for split in ("train", "val"):
        a, b = getattr(mem, split), getattr(files, split)
        b.transform = a.transform = build_transform(PRE, train=False, augment=False)
        for i in range(len(a)):  # the transform sees exactly the pixels it would read from the file
            assert torch.equal(a[i][0], b[i][0]) and a[i][1] == b[i][1]
    assert np.array_equal(np.asarray(mem.train.raw_image(0)), np.asarray(files.train.raw_image(0)))
    assert mem.train.describe(0) == files.train.describe(0)


def test_mixed_sizes_are_stored_at_the_resize_square_and_evaluate_the_same(tmp_path):
    root = _folder(tmp_path / "imgs", [(40, 30), (33, 50), (60, 60)])
    mem, files = _data(root), _data(root, in_memory=False)
    assert mem.val.stored_shape == (3, PRE.resize, PRE.resize)
    for i in range(len(mem.val)):
        # resize-then-centre-crop is the first step of evaluation's own transform
        torch.testing.assert_close(mem.val[i][0], files.val[i][0], atol=0.02, rtol=0)


def test_images_stay_on_disk_when_they_do_not_fit(tmp_path):
    root = _folder(tmp_path / "imgs", [(20, 20)])
    said: list[str] = []
    bundle = build_data(DataConfig(source=str(root), in_memory=False), PRE)
    hold_in_memory(bundle, enabled=None, memory_gb=1e-6, pre=PRE, workers=0, say=said.append)
    assert isinstance(bundle.train, FileDataset) and "data.memory_gb" in said[0]
    with pytest.raises(HeadstartError, match="data.memory_gb"):
        _data(root, in_memory=True, memory_gb=1e-6)


def test_in_memory_flag_parses_yes_no_auto():
    parser = build_parser()
    for value, expected in (("no", False), ("yes", True), ("auto", None)):
        args = parser.parse_args(["train", "--in-memory", value])
        assert vars(args)["data.in_memory"] is expected
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--in-memory", "maybe"])


def _gradient_batch(n: int = 8, h: int = 20, w: int = 30) -> torch.Tensor:
    """Images whose value grows left to right: a mirrored crop decreases instead."""
    row = torch.linspace(0, 255, w).round().to(torch.uint8)
    return row.expand(n, 3, h, w).clone()


def test_batched_evaluation_transform_matches_the_per_image_one():
    x = torch.randint(0, 256, (5, 3, 20, 30), dtype=torch.uint8)
    per_image = build_transform(PRE, train=False, augment=False)
    expect = torch.stack([per_image(img) for img in x])
    got = BatchTransform(PRE, train=False)(x)
    assert got.shape == expect.shape == (5, 3, PRE.crop, PRE.crop)
    # float interpolation against uint8 interpolation: a few 1/255 steps apart at most
    assert (got - expect).abs().mean() < 0.02


def test_batched_training_transform_crops_flips_and_repeats_by_seed():
    x = _gradient_batch(64)
    bt = BatchTransform(PRE, train=True)
    a = bt(x, torch.Generator().manual_seed(1))
    b = bt(x, torch.Generator().manual_seed(1))
    c = bt(x, torch.Generator().manual_seed(2))
    assert a.shape == (64, 3, PRE.crop, PRE.crop)
    assert torch.equal(a, b) and not torch.equal(a, c)
    slope = a[:, 0, :, -1].mean(1) - a[:, 0, :, 0].mean(1)
    flipped = (slope < 0).float().mean()
    assert 0.25 < flipped < 0.75  # about half are mirrored
    widths = slope.abs()
    assert widths.std() > 0.05  # crops of different widths span different value ranges
    for ch in range(3):  # values stay within what 0..255 normalise to
        lo, hi = (np.array([0.0, 255.0]) - PRE.mean[ch] * 255) / (PRE.std[ch] * 255)
        assert a[:, ch].min() >= lo - 1e-4 and a[:, ch].max() <= hi + 1e-4


class SkipFirst(torch.utils.data.Sampler):
    """Indices ``skip .. n-1``: what a loader resumed inside an epoch draws."""

    def __init__(self, n: int, skip: int) -> None:
        self.n, self.skip = n, skip

    def __iter__(self):
        return iter(range(self.skip, self.n))

    def __len__(self) -> int:
        return self.n - self.skip


def test_loader_transforms_batches_on_the_device(tmp_path):
    root = _folder(tmp_path / "imgs", [(20, 20)])
    data = _data(root)
    assert enable_batch_transforms(data, torch.device("cpu"))
    assert data.train[0][0].dtype == torch.uint8  # items stay raw: the loader transforms batches
    loader = make_loader(data.train, batch_size=4, shuffle=False, workers=0, seed=3)
    x, y = next(iter(loader))
    assert x.dtype == torch.float32 and x.shape == (4, 3, PRE.crop, PRE.crop) and y.shape == (4,)
    again = next(iter(make_loader(data.train, batch_size=4, shuffle=False, workers=0, seed=3)))[0]
    assert torch.equal(x, again)
    # a loader resumed after its first batch (its sampler says how many items it skips, as the
    # training loop's does) draws the second batch's crops as before
    first_two = list(make_loader(data.train, batch_size=4, shuffle=False, workers=0, seed=3))[:2]
    skipping = make_loader(data.train, batch_size=4, shuffle=False, workers=0, seed=3,
                           sampler=SkipFirst(len(data.train), 4))
    assert torch.equal(next(iter(skipping))[0], first_two[1][0])
    # an automatic policy has no batched twin: items are transformed one by one as before
    data.train.transform = build_transform(PRE, train=True, augment=True, policy="trivialaugment")
    assert data.train[0][0].dtype == torch.float32


def test_training_with_batched_transforms_end_to_end(tmp_path):
    root = _folder(tmp_path / "imgs", [(20, 20)], per_class=8)
    overrides = {"model.name": "resnet18", "model.weights": "none", "model.input_size": 24,
                 "data.source": str(root), "data.batch_size": 8, "train.epochs": 2, "train.finetune_epochs": 1,
                 "train.finetune_unfreeze": "1", "train.progress": False}
    runs = {}
    for batched in (True, False):
        cfg = apply_overrides(RunConfig(), overrides | {"data.batch_transforms": batched})
        net, data = prepare(cfg)
        assert isinstance(data.train, MemoryDataset)
        assert (data.train.batch_device is not None) == batched
        runs[batched] = fit(net, data, cfg, say=lambda _: None)
        assert all(np.isfinite(r["train_loss"]) for r in runs[batched].history)
    # the batched features (whole body, then the frozen prefix of the fine-tuning stage) are
    # cached apart from the per-image ones
    parts = sorted(e["part"] for e in cache_mod.cache_entries(tmp_path / "feature-cache"))
    assert parts == ["body"] * 4 + ["prefix:7"] * 4
