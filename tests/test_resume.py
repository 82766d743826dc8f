"""A run killed in the middle of its second stage, or in the middle of an epoch, resumes to
exactly the uninterrupted result."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from headstart.cli.main import main
from headstart.config import RunConfig, apply_overrides
from headstart.jobs import train as api
from headstart.jobs.train import prepare
from headstart.models import checkpoint
from headstart.runtime.precision import Precision
from headstart.training import fit as fit_module
from headstart.training import inputs as inputs_module
from headstart.training.runs import RunDir
from headstart.training.sampling import epoch_loader
from headstart.training.state import MidEpochClock

ARGS = [
    "--model", "resnet18", "--weights", "none", "--input-size", "32", "--data", "digits",
    "--limit-train", "96", "--limit-val", "32", "--batch-size", "16", "--epochs", "1",
    "--finetune-epochs", "3", "--finetune-bn", "frozen", "--no-progress", "--seed", "3",
]


def _rows(run: Path) -> int:
    p = run / "metrics.jsonl"
    return len(p.read_text().splitlines()) if p.exists() else 0


def _state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["state_dict"]


def test_kill_in_second_stage_then_resume_matches_uninterrupted(tmp_path, monkeypatch):
    monkeypatch.setenv("HEADSTART_CACHE", str(tmp_path / "cache"))
    assert main(["train", *ARGS, "--output", str(tmp_path), "--name", "whole"]) == 0

    # The same run in a child process, killed (SIGKILL: no clean-up at all) once the first
    # fine-tuning epoch has been checkpointed, i.e. in the middle of stage 2.
    env = os.environ | {"HEADSTART_CACHE": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "headstart", "train", *ARGS, "--output", str(tmp_path), "--name", "killed"]
    child = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run = tmp_path / "killed"
    deadline = time.time() + 300
    while _rows(run) < 2 and child.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert 2 <= len(rows) < 4, "the kill must land inside the fine-tuning stage"
    assert rows[-1]["stage"] == "finetune"
    # SIGKILL may leave a temporary file behind, but the checkpoint itself is never torn.
    torch.load(run / "last.pt", weights_only=True)

    assert main(["train", "--resume", str(run)]) == 0
    whole, resumed = _state(tmp_path / "whole" / "last.pt"), _state(run / "last.pt")
    assert whole.keys() == resumed.keys()
    for k in whole:
        assert torch.equal(whole[k], resumed[k]), k
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["global_epoch"] for r in history] == [1, 2, 3, 4]


def test_resume_of_finished_run_trains_nothing_more(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HEADSTART_CACHE", str(tmp_path / "cache"))
    args = [a if a != "3" else "1" for a in ARGS]  # one fine-tuning epoch
    assert main(["train", *args, "--output", str(tmp_path), "--name", "done"]) == 0
    before = _state(tmp_path / "done" / "last.pt")
    # only where and how it runs may change: a new schedule is a new run
    assert main(["train", "--resume", str(tmp_path / "done"), "--epochs", "9"]) == 2
    err = capsys.readouterr().err
    assert "may change" in err and "--checkpoint-minutes" in err
    assert main(["train", "--resume", str(tmp_path / "done"), "--checkpoint-minutes", "5"]) == 0
    after = _state(tmp_path / "done" / "last.pt")
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert "epoch 1/1" not in capsys.readouterr().out.split("resuming")[-1]


# ---------------------------------------------------------------------- mid-epoch checkpoints

# Four batches an epoch; a mid-epoch last.pt after every second batch.
MID = {"model.name": "resnet18", "model.weights": "none", "model.input_size": 32, "data.source": "digits",
       "data.limit_train": 64, "data.limit_val": 32, "data.batch_size": 16, "train.progress": False,
       "train.device": "cpu", "train.seed": 3, "train.checkpoint_steps": 2, "train.checkpoint_minutes": 0,
       "tensorboard": False, "report": False}


class _Killed(Exception):
    pass


def _mid_cfg(tmp_path: Path, name: str, **extra) -> RunConfig:
    return apply_overrides(RunConfig(), MID | {"cache.dir": str(tmp_path / "cache"), "output": str(tmp_path),
                                               "name": name} | extra)


def _kill_at_step(monkeypatch, cfg: RunConfig, step: int) -> Path:
    """Train ``cfg`` in this process, stopped by an exception right after optimizer step ``step``."""
    real = RunDir.tb_step

    def tb_step(self, n, loss, lrs):  # called after every optimizer step, before anything is saved
        if n == step:
            raise _Killed
        real(self, n, loss, lrs)

    with monkeypatch.context() as m:
        m.setattr(RunDir, "tb_step", tb_step)
        with pytest.raises(_Killed):
            api.train(cfg, say=_quiet)
    return Path(cfg.output) / cfg.name


def _history(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _assert_same_run(whole: Path, resumed: Path) -> None:
    a, b = _state(whole / "last.pt"), _state(resumed / "last.pt")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    keys = ("global_epoch", "stage", "epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lrs")
    assert [{k: r[k] for k in keys} for r in _history(whole)] == [{k: r[k] for k in keys} for r in _history(resumed)]


def _quiet(_: str) -> None:
    pass


def test_kill_mid_epoch_with_augmentation_and_a_worker_resumes_bit_exact(tmp_path, monkeypatch):
    # Everything trains on augmented images loaded by one worker process, through a dropout head
    # (the main process's generator): the run is stopped after the 3rd of the second epoch's 4
    # batches, its last checkpoint holding the first 2, and the resumed run redoes only the 3rd.
    extra = {"train.freeze": "none", "train.epochs": 2, "data.workers": 1, "head.kind": "linear",
             "head.dropout": 0.3}
    api.train(_mid_cfg(tmp_path, "whole", **extra), say=_quiet)
    run = _kill_at_step(monkeypatch, _mid_cfg(tmp_path, "killed", **extra), step=4 + 3)
    ts = torch.load(run / "last.pt", weights_only=True)["train_state"]
    assert (ts["epoch"], ts["partial"]["batches"], ts["step"]) == (1, 2, 6)
    assert [r["global_epoch"] for r in _history(run)] == [1]

    skips = []
    real = fit_module.epoch_loader

    def spy(dataset, cfg, epoch_seed, workers, skip_batches=0):
        skips.append(skip_batches)
        return real(dataset, cfg, epoch_seed, workers, skip_batches)

    monkeypatch.setattr(fit_module, "epoch_loader", spy)
    api.train(RunConfig(), resume=run, say=_quiet)
    assert skips[-1] == 2, "the resumed epoch skips the two batches already trained"
    _assert_same_run(tmp_path / "whole", run)


def test_kill_mid_epoch_in_fine_tuning_resumes_its_weight_average_bit_exact(tmp_path, monkeypatch):
    # The fine-tuning stage keeps a moving average of its weights: last.pt's model is the average and
    # its train_state the weights as trained; stopped after the 3rd of its second epoch's 4 batches
    # (the last checkpoint holding 2), the resumed run ends with the same average and the same rows.
    extra = {"train.epochs": 1, "train.finetune_epochs": 2, "train.finetune_bn": "frozen",
             "train.finetune_average": 0.5}
    api.train(_mid_cfg(tmp_path, "whole", **extra), say=_quiet)
    run = _kill_at_step(monkeypatch, _mid_cfg(tmp_path, "killed", **extra), step=4 + 4 + 3)
    ts = torch.load(run / "last.pt", weights_only=True)["train_state"]
    assert (ts["stage"], ts["epoch"], ts["partial"]["batches"]) == (1, 1, 2)
    assert ts["average"], "the live weights behind the saved average"
    api.train(RunConfig(), resume=run, say=_quiet)
    _assert_same_run(tmp_path / "whole", run)
    assert [r["val_acc_live"] for r in _history(tmp_path / "whole")[1:]] == [
        r["val_acc_live"] for r in _history(run)[1:]]


def test_kill_mid_epoch_on_cached_features_restores_the_loss_scale(tmp_path, monkeypatch):
    # The head stage trains from cached features (items are plain tensors). A gradient scaler
    # that doubles its scale every step stands in for fp16's (which needs a GPU): its state is
    # saved in last.pt and a resumed run carries on from the scale reached.
    def precision(spec, device):
        return Precision(None, torch.amp.GradScaler("cpu", init_scale=2.0**4, growth_interval=1), device.type)

    monkeypatch.setattr(inputs_module, "resolve_precision", precision)
    api.train(_mid_cfg(tmp_path, "whole", **{"train.epochs": 2}), say=_quiet)
    whole = torch.load(tmp_path / "whole" / "last.pt", weights_only=True)["train_state"]
    assert whole["scaler"]["scale"] == 2.0 ** (4 + 8)

    run = _kill_at_step(monkeypatch, _mid_cfg(tmp_path, "killed", **{"train.epochs": 2}), step=3)
    ts = torch.load(run / "last.pt", weights_only=True)["train_state"]
    assert (ts["epoch"], ts["partial"]["batches"], ts["scaler"]["scale"]) == (0, 2, 2.0 ** (4 + 2))
    assert _rows(run) == 0
    api.train(RunConfig(), resume=run, say=_quiet)
    assert torch.load(run / "last.pt", weights_only=True)["train_state"]["scaler"] == whole["scaler"]
    _assert_same_run(tmp_path / "whole", run)


def _batches(loader) -> list[torch.Tensor]:
    return [x for x, _ in loader]


def test_augmentation_draws_depend_on_neither_workers_nor_skipped_batches(tmp_path):
    cfg = _mid_cfg(tmp_path, "x", **{"data.limit_train": 48})
    _, data = prepare(cfg)
    before = torch.get_rng_state()
    plain = _batches(epoch_loader(data.train, cfg, 11, 0))
    assert torch.equal(before, torch.get_rng_state()), "items drawn in the main process leave its generator alone"
    assert len(plain) == 3
    with_workers = _batches(epoch_loader(data.train, cfg, 11, 2))
    assert all(torch.equal(a, b) for a, b in zip(plain, with_workers, strict=True))
    skipped = _batches(epoch_loader(data.train, cfg, 11, 1, skip_batches=2))
    assert len(skipped) == 1 and torch.equal(skipped[0], plain[2])
    again = _batches(epoch_loader(data.train, cfg, 12, 0))
    assert not torch.equal(torch.cat(plain).sum(0), torch.cat(again).sum(0)), "another epoch, other draws"


def test_a_repeated_balanced_draw_gets_its_own_augmentation(tmp_path):
    # The balanced sampler draws with replacement: items are seeded by their draw's position in
    # the epoch, not by image, so an image drawn twice is augmented two ways.
    cfg = _mid_cfg(tmp_path, "x", **{"data.limit_train": 48, "data.balanced": True})
    _, data = prepare(cfg)
    order = [int(i) for i in epoch_loader(data.train, cfg, 5, 0).sampler]
    images = torch.cat(_batches(epoch_loader(data.train, cfg, 5, 0)))
    first = {}
    repeats = 0
    for pos, i in enumerate(order[: len(images)]):
        if i in first:
            assert not torch.equal(images[first[i]], images[pos])
            repeats += 1
        first.setdefault(i, pos)
    assert repeats > 0


def test_checkpoint_minutes_writes_mid_epoch_on_the_clock(tmp_path, monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(MidEpochClock, "clock", staticmethod(lambda: clock[0]))

    def tick(self, n, loss, lrs):
        clock[0] += 40.0  # every step "takes" 40 s: with 1.5 minutes, a checkpoint after every 3rd step

    monkeypatch.setattr(RunDir, "tb_step", tick)
    saved = []
    real = checkpoint.save
    monkeypatch.setattr(checkpoint, "save", lambda path, payload: saved.append(
        (Path(path).name, (payload.get("train_state") or {}).get("partial", {}).get("batches"))) or real(path, payload))
    cfg = _mid_cfg(tmp_path, "clock", **{"train.checkpoint_steps": None, "train.checkpoint_minutes": 1.5,
                                         "train.epochs": 2, "data.limit_train": 96})
    api.train(cfg, say=_quiet)
    last = [b for name, b in saved if name == "last.pt"]
    # 6 batches an epoch; the clock restarts at each epoch's end, whose save has no partial epoch.
    assert last == [3, None, 3, None]
