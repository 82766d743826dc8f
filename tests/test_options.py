"""Training options: feature cache, lr-find, imbalance handling, batch mixing, TTA, precision."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from headstart.cli.main import main
from headstart.config import RunConfig, apply_overrides
from headstart.errors import HeadstartError
from headstart.jobs.train import prepare
from headstart.training import cache as cache_mod
from headstart.training import fit as fit_module
from headstart.training import lr_find as lr_find_module
from headstart.training.fit import fit, fit_until
from headstart.training.lr_find import lr_find, suggest
from headstart.training.optim import lr_factor

TINY = {"model.name": "resnet18", "model.weights": "none", "model.input_size": 32, "data.limit_train": 48,
        "data.limit_val": 24, "data.batch_size": 16, "train.progress": False, "train.epochs": 1}




def _cfg(**extra) -> RunConfig:
    return apply_overrides(RunConfig(), TINY | extra)


def _quiet(_: str) -> None:
    pass


# ---------------------------------------------------------------------- feature cache


def _entries(tmp_path: Path) -> list[dict]:
    return cache_mod.cache_entries(tmp_path / "feature-cache")


def _images_through_body(cfg: RunConfig) -> tuple[int, object]:
    """Train ``cfg`` and count the images the body was run on."""
    net, data = prepare(cfg)
    calls = []
    original = net.body.forward
    net.body.forward = lambda x: (calls.append(len(x)), original(x))[1]
    fit(net, data, cfg, say=_quiet)
    return sum(calls), data


def test_cache_trains_head_from_stored_features_once(tmp_path):
    seen, data = _images_through_body(_cfg(**{"train.epochs": 3}))
    # The body saw each train and val image exactly once, not once per epoch.
    assert seen == len(data.train) + len(data.val)
    assert len(_entries(tmp_path)) == 2


def test_cached_and_uncached_head_training_agree(tmp_path):
    results = []
    for enabled in (True, False):
        cfg = _cfg(**{"train.epochs": 2, "cache.enabled": enabled, "data.augment": False})
        net, data = prepare(cfg)
        results.append((fit(net, data, cfg, say=_quiet), net.head.state_dict()))
    (a, head_a), (b, head_b) = results
    assert [r["val_acc"] for r in a.history] == [r["val_acc"] for r in b.history]
    for k in head_a:
        torch.testing.assert_close(head_a[k], head_b[k], rtol=1e-4, atol=1e-5)


def test_cache_key_changes_with_weights_preprocessing_and_files(tmp_path):
    folder = _image_folder(tmp_path / "imgs")
    base = {"data.source": str(folder), "data.limit_train": None, "data.limit_val": None}
    cfg = _cfg(**base)
    net, data = prepare(cfg)
    fp = cache_mod.body_fingerprint(net)
    key = cache_mod.make_key(net, fp, data.train, "photo", 0, 0)
    assert key == cache_mod.make_key(net, fp, data.train, "photo", 0, 0)
    # other weights
    with torch.no_grad():
        next(net.body.parameters()).add_(1.0)
    assert cache_mod.make_key(net, cache_mod.body_fingerprint(net), data.train, "photo", 0, 0) != key
    # other preprocessing
    net2, _ = prepare(cfg)
    net2.preprocessing = net2.preprocessing.scaled(40)
    assert cache_mod.make_key(net2, fp, data.train, "photo", 0, 0) != key
    # an image file rewritten (size/mtime change)
    path = Path(data.train.paths[0])
    Image.new("RGB", (30, 30), (1, 2, 3)).save(path)
    os.utime(path, ns=(1, 1))
    assert cache_mod.make_key(net, fp, data.train, "photo", 0, 0) != key
    # augmented views are separate entries
    assert cache_mod.make_key(net, fp, data.train, "photo", 1, 0) != key


def test_interrupted_extraction_is_never_read_as_complete(tmp_path, monkeypatch):
    cfg = _cfg()
    net, data = prepare(cfg)
    fp = cache_mod.body_fingerprint(net)
    root = tmp_path / "feature-cache"
    kwargs = dict(body_fp=fp, kind=data.kind, view=0, seed=0, root=root, batch_size=16,
                  device=torch.device("cpu"), progress=False, desc="t")
    real = net.features
    seen = []

    def dying(x):
        seen.append(1)
        if len(seen) == 2:
            raise KeyboardInterrupt  # killed in the middle of extraction
        return real(x)

    monkeypatch.setattr(net, "features", dying)
    with pytest.raises(KeyboardInterrupt):
        cache_mod.cached_features(net, data.train, **kwargs)
    entry = cache_mod.FeatureCache(root, cache_mod.make_key(net, fp, data.train, data.kind, 0, 0))
    assert not entry.complete(0)
    assert not list(entry.folder.glob("*.tmp"))
    monkeypatch.setattr(net, "features", real)
    feats = cache_mod.cached_features(net, data.train, **kwargs)
    assert entry.complete(0) and len(feats) == len(data.train)
    from headstart.data import build_transform

    data.train.transform = build_transform(net.preprocessing, train=False, augment=False, kind=data.kind)
    with torch.no_grad():
        net.eval()
        expect = net.features(torch.stack([data.train[i][0] for i in range(4)]))
    torch.testing.assert_close(torch.stack([feats[i][0] for i in range(4)]), expect, rtol=1e-4, atol=1e-5)


def test_fine_tuning_stage_bypasses_the_cache(tmp_path):
    seen, data = _images_through_body(_cfg(**{"train.finetune_epochs": 1}))
    # head stage: one pass each over train and val; fine-tuning: a full pass per epoch plus val
    assert seen > 2 * (len(data.train) + len(data.val)) - 16


def _images_through_stem(cfg: RunConfig) -> tuple[int, object, object]:
    """Train ``cfg`` (resnet18) and count the images its first convolution was run on."""
    net, data = prepare(cfg)
    calls = []
    net.body.conv1.register_forward_hook(lambda m, i, o: calls.append(len(o)))
    result = fit(net, data, cfg, say=_quiet)
    return sum(calls), data, (net, result)


def test_partial_fine_tuning_trains_from_the_cached_frozen_prefix(tmp_path):
    cfg = _cfg(**{"train.finetune_epochs": 2, "train.finetune_unfreeze": "1"})
    seen, data, _ = _images_through_stem(cfg)
    # Each image went through the stem once for the head stage's cache and once for the
    # fine-tuning stage's (stem to layer3), not once per fine-tuning epoch (plus the one image
    # that sizes the prefix's output before anything is written).
    assert seen == 2 * (len(data.train) + len(data.val)) + 1
    parts = sorted(e["part"] for e in _entries(tmp_path))
    assert parts == ["body", "body", "prefix:7", "prefix:7"]

    off = _cfg(**{"train.finetune_epochs": 2, "train.finetune_unfreeze": "1", "cache.prefix": False})
    seen_off, _, _ = _images_through_stem(off)
    # without it (the head stage's entries exist from the run above): every fine-tuning epoch's
    # batches and its two validations (the weight average's, then the weights as trained)
    assert seen_off == 2 * (len(data.train) // 16 * 16 + 2 * len(data.val))
    assert seen - (len(data.train) + len(data.val)) < seen_off  # fine-tuning stages compared


def test_prefix_cached_and_uncached_fine_tuning_agree(tmp_path):
    runs = []
    for prefix in (True, False):
        cfg = _cfg(**{"train.epochs": 1, "train.finetune_epochs": 2, "train.finetune_unfreeze": "2",
                      "cache.prefix": prefix, "data.augment": False})
        net, data = prepare(cfg)
        runs.append((fit(net, data, cfg, say=_quiet), net.state_dict()))
    (a, state_a), (b, state_b) = runs
    assert [r["val_acc"] for r in a.history] == [r["val_acc"] for r in b.history]
    assert a.history[-1]["train_loss"] == pytest.approx(b.history[-1]["train_loss"], rel=1e-4)
    for k in state_a:
        torch.testing.assert_close(state_a[k], state_b[k], rtol=1e-4, atol=1e-5)
    untrained = prepare(cfg)[0].state_dict()
    assert not torch.equal(state_a["body.layer4.0.conv1.weight"], untrained["body.layer4.0.conv1.weight"])


def test_prefix_key_follows_the_frozen_part_only(tmp_path):
    net, _ = prepare(_cfg())
    fp = net.prefix_fingerprint(7)
    assert fp != net.prefix_fingerprint(6)
    with torch.no_grad():
        net.body.layer4[0].conv1.weight.add_(1.0)  # after the cut: same entry
    assert net.prefix_fingerprint(7) == fp
    with torch.no_grad():
        net.body.layer2[0].conv1.weight.add_(1.0)  # inside the frozen part: a new entry
    assert net.prefix_fingerprint(7) != fp


def test_frozen_prefix_follows_freezing_and_bn_policy():
    from headstart.models.freeze import freeze

    net, _ = prepare(_cfg())
    freeze(net, "first:2")  # stem, layer1: conv1, bn1, relu, maxpool, layer1
    assert net.frozen_prefix() == 5
    freeze(net, "none")
    assert net.frozen_prefix() == 0
    freeze(net, "body")
    assert net.frozen_prefix() == 8  # through layer4; avgpool and flatten stay outside
    net.bn_policy = "train"  # frozen BatchNorm on batch statistics: nothing fixed to cache
    assert net.frozen_prefix() == 0
    net.bn_policy = "frozen"
    freeze(net, "body.layer1.0.*")  # a frozen block inside a trainable group is not enough
    assert net.frozen_prefix() == 0


def test_prefix_cache_larger_than_the_limit_is_not_built(tmp_path):
    cfg = _cfg(**{"train.finetune_epochs": 1, "train.finetune_unfreeze": "1", "cache.max_gb": 1e-6})
    net, data = prepare(cfg)
    lines: list[str] = []
    fit(net, data, cfg, say=lines.append)
    assert any("not cached" in line and "cache.max_gb" in line for line in lines)
    assert sorted(e["part"] for e in _entries(tmp_path)) == ["body", "body"]


def test_cache_views_cycle_through_augmented_copies(tmp_path):
    cfg = _cfg(**{"train.epochs": 3, "cache.views": 2})
    net, data = prepare(cfg)
    fit(net, data, cfg, say=_quiet)
    views = sorted(e["views"] for e in _entries(tmp_path))
    assert views == [1, 1, 1]  # val, train view 0, train view 1 (an entry each)


def test_cache_cli_info_and_clear(tmp_path, capsys):
    cfg = _cfg()
    net, data = prepare(cfg)
    fit(net, data, cfg, say=_quiet)
    assert main(["cache", "info"]) == 0
    assert "2 entr(ies)" in capsys.readouterr().out
    assert main(["cache", "clear"]) == 0
    assert _entries(tmp_path) == []


def test_no_cache_flag_runs_body_every_epoch(tmp_path):
    seen, data = _images_through_body(_cfg(**{"train.epochs": 2, "cache.enabled": False}))
    # every epoch: its training batches (48 images, 3 full batches of 16) and the validation set
    assert seen == 2 * (len(data.train) + len(data.val))
    assert _entries(tmp_path) == []


# ---------------------------------------------------------------------- lr-find


def test_fit_until_trains_the_stages_before_the_one_named_as_train_would(tmp_path):
    cfg = _cfg(**{"train.epochs": 2, "train.finetune_epochs": 1, "data.augment": False})
    net, data = prepare(cfg)
    result = fit_until(net, data, cfg, 1, say=_quiet)
    assert [r["stage"] for r in result.history] == ["head", "head"] and result.run_dir is None
    whole, _ = prepare(cfg)
    trained = fit(whole, data, cfg, say=_quiet)
    assert [r["val_acc"] for r in trained.history[:2]] == [r["val_acc"] for r in result.history]
    assert fit_until(net, data, cfg, 0, say=_quiet).epochs_run == 0


def test_lr_find_for_a_later_stage_starts_from_the_trained_head(tmp_path, monkeypatch):
    heads = []
    real = lr_find_module.lr_find

    def spy(net, *a, **kw):
        heads.append(net.head.weight.detach().clone())
        return real(net, *a, **kw)

    monkeypatch.setattr(lr_find_module, "lr_find", spy)
    args = ["lr-find", "--model", "resnet18", "--weights", "none", "--input-size", "32", "--limit-train", "48",
            "--limit-val", "16", "--batch-size", "16", "--epochs", "1", "--finetune-epochs", "1", "--no-progress",
            "--steps", "8", "--plot", str(tmp_path / "lr.png")]
    for stage in ("1", "2"):
        assert main([*args, "--stage", stage]) == 0
    untrained = prepare(_cfg(**{"data.limit_train": 48, "data.limit_val": 16}))[0].head.weight
    assert torch.equal(heads[0], untrained), "stage 1 starts from the new head"
    assert not torch.equal(heads[1], untrained), "stage 2 starts from the head stage 1 trained"


def test_lr_find_restores_weights_and_suggests_a_rate_inside_the_range(tmp_path):
    cfg = _cfg(**{"model.weights": "none", "data.limit_train": 96})
    net, data = prepare(cfg)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    res = lr_find(net, data, cfg, steps=30, say=_quiet)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert len(res.lrs) >= 5 and res.lrs == sorted(res.lrs)
    assert res.lrs[0] <= res.suggestion <= res.lrs[-1]
    png = res.save_plot(tmp_path / "lr.png")
    assert png.stat().st_size > 5000


def test_suggest_picks_the_steepest_descent_not_the_minimum():
    lrs = list(np.logspace(-6, 0, 60))
    losses = [2.3 - 2.0 / (1 + np.exp(-(np.log10(lr) + 3) * 3)) for lr in lrs]  # sigmoid drop around 1e-3
    losses[-5:] = [3, 4, 5, 6, 7]
    s = suggest(lrs, losses)
    assert 3e-4 < s < 3e-3


def test_train_with_lr_auto_saves_the_plot(tmp_path, capsys, monkeypatch):
    args = ["train", "--model", "resnet18", "--weights", "none", "--input-size", "32", "--limit-train", "64",
            "--limit-val", "16", "--batch-size", "16", "--epochs", "1", "--lr", "auto", "--no-progress",
            "--no-report", "--output", str(tmp_path), "--name", "auto"]
    suggested = []
    real = lr_find_module.lr_find

    def spy(*a, **kw):
        result = real(*a, **kw)
        suggested.append(result.suggestion)
        return result

    monkeypatch.setattr(lr_find_module, "lr_find", spy)
    assert main(args) == 0
    assert f"suggested lr {suggested[0]:.3g}" in capsys.readouterr().out
    assert (tmp_path / "auto" / "lr_find.png").exists()
    rows = [json.loads(x) for x in (tmp_path / "auto" / "metrics.jsonl").read_text().splitlines()]
    # the stage trained at the suggestion: its base rate, and the head's first rate (warm-up step 0 of 4)
    assert len(suggested) == 1 and rows[0]["base_lr"] == suggested[0]
    assert rows[0]["lrs"]["head"] == pytest.approx(suggested[0] * lr_factor(0, 4, RunConfig().train.warmup))


# ---------------------------------------------------------------------- imbalance, mixing, augment


def _image_folder(root: Path, counts=(12, 12, 12)) -> Path:
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200)]
    rng = np.random.default_rng(0)
    for c, (n, col) in enumerate(zip(counts, colours)):
        d = root / f"class{c}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            a = np.clip(np.array(col) + rng.integers(-20, 20, (24, 24, 3)), 0, 255).astype("uint8")
            Image.fromarray(a).save(d / f"{i}.png")
    return root


def test_balanced_sampler_draws_classes_equally(tmp_path):
    from headstart.training.sampling import epoch_loader

    folder = _image_folder(tmp_path / "imb", counts=(40, 8, 4))
    cfg = _cfg(**{"data.source": str(folder), "data.limit_train": None, "data.limit_val": None,
                  "data.balanced": True, "data.val_split": 0.25, "data.batch_size": 8})
    _, data = prepare(cfg)
    drawn = []
    for seed in range(20):
        sampler = epoch_loader(data.train, cfg, seed, 0).sampler
        drawn += [data.train.targets[i] for i in sampler]
    share = np.bincount(drawn) / len(drawn)
    assert np.all(np.abs(share - 1 / 3) < 0.06), share


def test_class_weights_weight_the_loss_by_inverse_frequency(tmp_path):
    from headstart.training.loop import build_loss

    folder = _image_folder(tmp_path / "imb", counts=(30, 10, 5))
    cfg = _cfg(**{"data.source": str(folder), "data.limit_train": None, "data.limit_val": None,
                  "train.class_weights": True})
    _, data = prepare(cfg)
    w = build_loss(cfg.train, data, torch.device("cpu")).weight
    counts = np.bincount(data.train.targets)
    assert w[2] > w[1] > w[0]
    torch.testing.assert_close(w * torch.tensor(counts, dtype=torch.float32),
                               torch.full((3,), float(len(data.train)) / 3))


def test_mixup_and_cutmix_train_on_images(tmp_path, monkeypatch):
    folder = _image_folder(tmp_path / "mix")
    cfg = _cfg(**{"data.source": str(folder), "data.limit_train": None, "data.limit_val": None,
                  "train.freeze": "none", "train.mixup": 0.4, "train.cutmix": 1.0,
                  "data.auto_augment": "trivialaugment"})
    net, data = prepare(cfg)
    targets = []
    real = fit_module.build_loss

    def spy(*a):
        loss = real(*a)
        return lambda logits, y: (targets.append(y.detach().clone()), loss(logits, y))[1]

    monkeypatch.setattr(fit_module, "build_loss", spy)
    res = fit(net, data, cfg, say=_quiet)
    assert np.isfinite(res.history[0]["train_loss"])
    # The loss saw mixed labels: class probabilities, in every batch rows whose mass is split
    # between two classes (a row mixed with an image of its own class stays one-hot).
    assert targets and all(t.ndim == 2 and t.shape[1] == 3 for t in targets)
    for t in targets:
        torch.testing.assert_close(t.sum(1), torch.ones(len(t)))
        assert (t.max(1).values < 1 - 1e-6).any(), f"a batch was not mixed: {t}"


def test_unknown_augment_policy_is_a_user_error():
    from headstart.data import build_transform
    from headstart.models.preprocess import Preprocessing

    with pytest.raises(HeadstartError, match="randaugment"):
        build_transform(Preprocessing(crop=32, resize=36), train=True, augment=True, policy="autoaug")


def test_randaugment_changes_train_images_only():
    from headstart.data import build_transform
    from headstart.models.preprocess import Preprocessing

    pre = Preprocessing(crop=32, resize=36)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8))
    ev = build_transform(pre, train=False, augment=True, policy="randaugment")
    assert torch.equal(ev(img), ev(img))
    tr = build_transform(pre, train=True, augment=True, policy="randaugment")
    torch.manual_seed(0)
    assert not torch.equal(tr(img), tr(img))


# ---------------------------------------------------------------------- TTA and precision


def test_eval_with_tta_averages_a_flipped_view(tmp_path, capsys):
    folder = _image_folder(tmp_path / "tta")
    args = ["train", "--model", "resnet18", "--weights", "none", "--input-size", "32", "--data", str(folder),
            "--epochs", "1", "--no-progress", "--no-report", "--output", str(tmp_path), "--name", "t"]
    assert main(args) == 0
    from headstart.evaluation.inference import predict_logits
    from headstart.jobs.evaluate import evaluate_checkpoint

    plain = evaluate_checkpoint(tmp_path / "t", str(folder), split="all")
    tta = evaluate_checkpoint(tmp_path / "t", str(folder), split="all", tta=True)
    assert plain.loss != tta.loss

    class Net(torch.nn.Module):
        def forward(self, x):
            return x[:, 0, 0, :2]  # looks at the left edge: mirroring changes it

    x = torch.arange(8.0).reshape(1, 1, 1, 8).expand(2, 3, 1, 8).contiguous()
    logits, _ = predict_logits(Net(), [(x, torch.tensor([0, 1]))], torch.device("cpu"), tta=True)
    probs = (x[:, 0, 0, :2].softmax(1) + x.flip(3)[:, 0, 0, :2].softmax(1)) / 2
    torch.testing.assert_close(logits.softmax(1), probs)


def test_bf16_autocast_runs_on_cpu_and_fp16_is_refused():
    from headstart.runtime.precision import resolve_precision

    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu).dtype is None
    assert resolve_precision("bf16", cpu).dtype == torch.bfloat16
    with pytest.raises(HeadstartError, match="fp16"):
        resolve_precision("fp16", cpu)
    cfg = _cfg(**{"train.precision": "bf16", "train.freeze": "none", "train.channels_last": True})
    net, data = prepare(cfg)
    seen = []

    def look(module, args):  # what the first convolution sees while training
        if module.training:
            x = args[0]
            seen.append((torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu"),
                         x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous(),
                         module.weight.is_contiguous(memory_format=torch.channels_last)))

    net.body.conv1.register_forward_pre_hook(look)
    res = fit(net, data, cfg, say=_quiet)
    assert np.isfinite(res.history[0]["train_loss"])
    assert len(seen) == 3 and set(seen) == {(torch.bfloat16, True, True)}


def test_tensorboard_event_files_hold_steps_epochs_confusion_and_hparams(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    args = ["train", "--model", "resnet18", "--weights", "none", "--input-size", "32", "--limit-train", "48",
            "--limit-val", "16", "--batch-size", "16", "--epochs", "2", "--finetune-epochs", "1",
            "--no-progress", "--no-report", "--output", str(tmp_path), "--name", "tb"]
    assert main(args) == 0
    ea = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0})
    ea.Reload()
    tags = ea.Tags()
    assert {"step/train_loss", "epoch/val_acc", "lr/head", "lr/layer4"} <= set(tags["scalars"])
    assert [e.step for e in ea.Scalars("epoch/val_acc")] == [1, 2, 3]
    assert tags["images"] == ["confusion_matrix"]
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


def test_progress_writes_plain_periodic_lines_when_not_a_terminal(capsys):
    from headstart.progress import Progress

    bar = Progress(range(5), total=5, desc="train 1/1", every=0.0)
    assert bar.bar is None  # pytest captures stderr: not a terminal
    for _ in bar:
        bar.update(8, loss=0.5, acc=0.25)
    lines = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert len(lines) == 5 and "\r" not in "".join(lines)
    assert lines[-1].strip().startswith("train 1/1 5/5") and "img/s" in lines[-1] and "eta 0s" in lines[-1]
    silent = Progress(range(3), total=3, desc="x", enabled=False, every=0.0)
    for _ in silent:
        silent.update(1)
    assert capsys.readouterr().err == ""
