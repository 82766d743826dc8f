"""The solved head stage (``train.epochs: auto``, the default): what it resolves to, and what a run does with it."""

from __future__ import annotations

import copy
import csv
import random
import tempfile
from pathlib import Path

import pytest
import torch

from headstart.cli.main import main
from headstart.config import RunConfig, StageConfig, apply_overrides
from headstart.errors import HeadstartError
from headstart.jobs.train import prepare
from headstart.models.backbones import build_network
from headstart.training.fit import fit
from headstart.training.optim import AUTO_EPOCHS, AUTO_MLP_EPOCHS, resolve_stages


def tiny_cfg(tmp_path: Path, **overrides) -> RunConfig:
    base = {
        "model.name": "resnet18", "model.weights": "none", "model.input_size": 32,
        "data.source": "digits", "data.limit_train": 120, "data.limit_val": 60, "data.batch_size": 32,
        "train.progress": False, "train.device": "cpu",
        "cache.dir": str(tmp_path / "cache"), "output": str(tmp_path / "runs"), "name": "run",
    }
    return apply_overrides(RunConfig(), base | overrides)


def head_stage(cfg_overrides: dict, model: str = "resnet18") -> StageConfig:
    cfg = apply_overrides(RunConfig(), cfg_overrides)
    net = build_network(model, weights="none", num_classes=3)
    net.replace_head(3, cfg.head)
    return resolve_stages(cfg.train, net)[0]


def test_auto_is_the_default_and_resolves_per_head():
    assert RunConfig().train.epochs == "auto"
    linear = head_stage({"head.kind": "linear"})
    assert (linear.epochs, linear.solve) == (0, True)
    replace = head_stage({})  # the seed's head: the pretrained classifier, its last layer new
    assert (replace.epochs, replace.solve) == (0, True)
    mlp = head_stage({"head.kind": "mlp", "head.hidden": [16]})
    assert (mlp.epochs, mlp.solve) == (AUTO_MLP_EPOCHS, True)
    # SqueezeNet's classifier ends in a convolution: nothing to solve, the old fixed count instead.
    conv = head_stage({}, model="squeezenet1_0")
    assert (conv.epochs, conv.solve) == (AUTO_EPOCHS, False)
    # A body that trains in the head stage gives no fixed features to solve on.
    unfrozen = head_stage({"train.freeze": "none"})
    assert (unfrozen.epochs, unfrozen.solve) == (AUTO_EPOCHS, False)
    explicit = head_stage({"train.epochs": 3})
    assert (explicit.epochs, explicit.solve) == (3, False)


def test_epochs_takes_a_count_or_auto_and_nothing_else():
    assert apply_overrides(RunConfig(), {"train.epochs": "2"}).train.epochs == 2
    assert apply_overrides(RunConfig(), {"train.epochs": "auto"}).train.epochs == "auto"
    for bad in ("2.5", "many", True, -1):
        with pytest.raises(HeadstartError, match="train.epochs"):
            apply_overrides(RunConfig(), {"train.epochs": bad})


def test_a_default_run_solves_the_head_once_and_says_what_it_chose(tmp_path):
    lines: list[str] = []
    cfg = tiny_cfg(tmp_path)
    net, data = prepare(cfg)
    final = [m for m in net.head.modules() if isinstance(m, torch.nn.Linear)][-1]
    initial = final.weight.detach().clone()
    result = fit(net, data, cfg, say=lines.append)
    assert len(result.history) == 1 and "solved" in result.history[0]
    row = result.history[0]
    solved = row["solved"]
    assert solved["folds"] == 5 and solved["weight_decay"] in [float(k) for k in solved["scores"]]
    assert 0 <= solved["cv_accuracy"] <= 1 and row["train_acc"] >= solved["cv_accuracy"] - 0.2
    assert not torch.equal(final.weight, initial)
    text = "\n".join(lines)
    assert "final layer solved by L-BFGS" in text and "head solved: weight decay" in text
    assert "   solved  train loss" in text
    # Random weights on 10-class digits: far from perfect, but far above chance (10%).
    assert row["val_acc"] > 0.3


def test_validation_labels_never_reach_the_choice(tmp_path):
    """The same run with its validation labels permuted chooses the same weight decay and the same head."""
    cfg = tiny_cfg(tmp_path)
    net, data = prepare(cfg)
    net2, data2 = copy.deepcopy(net), copy.deepcopy(data)
    targets = list(data2.val.targets)
    random.Random(0).shuffle(targets)
    assert targets != data.val.targets
    data2.val.targets = targets
    a = fit(net, data, cfg, say=lambda _: None)
    b = fit(net2, data2, cfg, say=lambda _: None)
    chosen_a, chosen_b = ({k: v for k, v in r.history[0]["solved"].items() if k != "seconds"} for r in (a, b))
    assert chosen_a == chosen_b
    for (name, p), (_, q) in zip(net.head.state_dict().items(), net2.head.state_dict().items(), strict=True):
        assert torch.equal(p, q), name
    # The permutation did reach the validation split: its accuracy moved.
    assert a.history[0]["val_acc"] != b.history[0]["val_acc"]


def test_without_the_cache_the_solver_extracts_once_and_leaves_nothing(tmp_path, monkeypatch):
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    cfg = tiny_cfg(tmp_path, **{"cache.enabled": False})
    net, data = prepare(cfg)
    result = fit(net, data, cfg, say=lambda _: None)
    assert "solved" in result.history[0] and result.history[0]["val_acc"] > 0.3
    assert not (tmp_path / "cache").exists() and list(scratch.iterdir()) == []


def test_an_mlp_head_trains_its_hidden_layers_then_its_final_layer_is_solved(tmp_path):
    cfg = tiny_cfg(tmp_path, **{"head.kind": "mlp", "head.hidden": [32]})
    net, data = prepare(cfg)
    result = fit(net, data, cfg, say=lambda _: None)
    assert [("solved" in r) for r in result.history] == [False] * AUTO_MLP_EPOCHS + [True]


def test_solved_head_then_fine_tuning_and_a_resumed_finished_run_from_the_cli(tmp_path, capsys):
    argv = ["train", "--model", "resnet18", "--weights", "none", "--input-size", "32", "--data", "digits",
            "--limit-train", "120", "--limit-val", "60", "--batch-size", "32", "--finetune-epochs", "1",
            "--no-progress", "--device", "cpu", "--output", str(tmp_path / "runs"), "--name", "r",
            "--set", f"cache.dir={tmp_path / 'cache'}"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "head solved: weight decay" in out and "stage 2/2: finetune" in out
    with (tmp_path / "runs" / "r" / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["stage"], r["epoch"]) for r in rows] == [("head", "1"), ("finetune", "1")]
    report = (tmp_path / "runs" / "r" / "report" / "report.html").read_text()
    assert "the head's final layer was solved by L-BFGS" in report and "cross-validated accuracy" in report
    assert main(["train", "--resume", str(tmp_path / "runs" / "r")]) == 0
    assert "nothing left to train" in capsys.readouterr().out
