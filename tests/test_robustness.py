"""Regression tests for problems found in review: rebuilding odd architectures, resume, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from headstart.cli.main import main
from headstart.config import RunConfig, apply_overrides
from headstart.jobs.train import prepare
from headstart.models import checkpoint
from headstart.models.backbones import build_network
from headstart.training.fit import fit

BASE = ["--model", "resnet18", "--weights", "none", "--input-size", "32", "--batch-size", "16", "--no-progress",
        "--no-report", "--no-tensorboard"]
TINY = [*BASE, "--limit-train", "48", "--limit-val", "16"]


def _same_outputs(net, size=64) -> bool:
    rebuilt, _ = checkpoint.load_network(checkpoint.model_record(net, ["a", "b", "c"]))
    net.eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        return torch.allclose(net(x), rebuilt(x), atol=1e-5)


@pytest.mark.parametrize("name,arch,size", [
    ("googlenet", {"transform_input": True, "aux_logits": False}, 64),  # how pretrained GoogLeNet is built
    ("inception_v3", {"transform_input": True, "aux_logits": True}, 80),
])
def test_checkpoint_rebuilds_pretrained_style_inception_and_googlenet(name, arch, size):
    net = build_network(name, "none", num_classes=3, input_size=size, arch=arch)
    assert checkpoint.model_record(net, ["a", "b", "c"])["arch_options"] == arch
    assert _same_outputs(net, size)


def test_checkpoint_of_a_timm_model_named_like_a_torchvision_one_rebuilds_with_timm():
    net = build_network("timm:efficientnet_b0", "none", num_classes=3)
    assert net.source == "timm"
    assert _same_outputs(net)


def test_resume_refuses_changed_settings_but_takes_a_device(tmp_path, capsys):
    assert main(["train", *TINY, "--epochs", "1", "--output", str(tmp_path), "--name", "r"]) == 0
    assert main(["train", "--resume", str(tmp_path / "r"), "--epochs", "5"]) == 2
    err = capsys.readouterr().err
    assert "--device" in err and "may change (got --epochs)" in err
    assert main(["train", "--resume", str(tmp_path / "r"), "--device", "cpu"]) == 0
    assert main(["train", "--resume", str(tmp_path / "nope")]) == 2


def test_resume_refuses_data_whose_classes_changed(tmp_path, capsys):
    folder = tmp_path / "imgs"
    for c in ("a", "b"):
        (folder / c).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(np.full((16, 16, 3), 40 * i, np.uint8)).save(folder / c / f"{i}.png")
    assert main(["train", *BASE, "--data", str(folder), "--epochs", "1", "--output", str(tmp_path), "--name", "r"]) == 0
    (folder / "c").mkdir()
    for i in range(6):
        Image.fromarray(np.full((16, 16, 3), 9 * i, np.uint8)).save(folder / "c" / f"{i}.png")
    assert main(["train", "--resume", str(tmp_path / "r")]) == 2
    assert "classes changed" in capsys.readouterr().err


@pytest.mark.parametrize("argv,words", [
    (["--device", "cuda:7"], "not available"),
    (["--finetune-epochs", "1", "--finetune-unfreeze", "two"], "finetune_unfreeze"),
    (["--model", "vit_b_16", "--input-size", "40"], "multiple of 16"),
])
def test_bad_settings_are_user_errors(tmp_path, capsys, argv, words):
    args = [a for a in TINY if a not in ("--model", "resnet18", "--input-size", "32")] if "--model" in argv else TINY
    if "--input-size" in argv:
        args = [a for a in args if a not in ("--input-size", "32")]
    rc = main(["train", *args, *argv, "--output", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and words in err and "Traceback" not in err


def test_empty_validation_split_is_a_user_error(tmp_path, capsys):
    folder = tmp_path / "one-each"
    for c in ("a", "b"):
        (folder / c).mkdir(parents=True)
        Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(folder / c / "0.png")
    assert main(["train", *BASE, "--data", str(folder), "--output", str(tmp_path)]) == 2
    assert "no images for validation" in capsys.readouterr().err


def test_batchnorm_policy_train_is_not_served_from_the_cache(tmp_path):
    cfg = apply_overrides(RunConfig(), {"model.name": "resnet18", "model.weights": "none", "model.input_size": 32,
                                        "data.limit_train": 32, "data.limit_val": 16, "train.progress": False,
                                        "train.epochs": 1, "train.stages": [{"name": "head", "epochs": 1,
                                                                              "bn": "train"}]})
    net, data = prepare(cfg)
    stats = net.body.bn1.running_mean.clone()
    fit(net, data, cfg, say=lambda _: None)
    # Batch statistics were used (and updated): the body really ran in training mode.
    assert not torch.equal(stats, net.body.bn1.running_mean)


def test_patience_counts_within_a_stage(tmp_path):
    # lr 0 in the head stage: nothing improves after epoch 1, so patience 1 stops it after epoch 2;
    # fine-tuning then gets its own count instead of being stopped for not beating the head stage.
    cfg = apply_overrides(RunConfig(), {"model.name": "resnet18", "model.weights": "none", "model.input_size": 32,
                                        "data.limit_train": 32, "data.limit_val": 16, "train.progress": False,
                                        "train.lr": 0.0, "train.epochs": 4, "train.finetune_epochs": 2,
                                        "train.finetune_lr": 0.0, "train.patience": 1})
    net, data = prepare(cfg)
    rows = fit(net, data, cfg, say=lambda _: None).history
    assert [r["stage"] for r in rows] == ["head", "head", "finetune", "finetune"]
