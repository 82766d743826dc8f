"""Tests for headstart.training (loop, fit, optim) and metrics: the training loop, schedules, parameter groups,
early stopping, determinism, frozen bodies and the classification report.

Everything uses random-weight models at 32 px on 64 bundled digits; nothing is downloaded.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from headstart.cli.main import main
from headstart.config import RunConfig, StageConfig, TrainConfig, apply_overrides
from headstart.errors import HeadstartError
from headstart.evaluation.metrics import class_report, format_report, topk_correct
from headstart.jobs.train import prepare
from headstart.models import checkpoint
from headstart.models.backbones import build_network
from headstart.models.freeze import trainable_state
from headstart.training import fit as fit_module
from headstart.training.budget import planned_stage
from headstart.training.fit import fit
from headstart.training.optim import (
    apply_stage,
    build_optimizer,
    build_scheduler,
    describe_stage,
    group_lrs,
    lr_factor,
    param_groups,
    resolve_stages,
)
from headstart.training.runs import RunDir

RESNET18_GROUPS = ["stem", "layer1", "layer2", "layer3", "layer4"]




def tiny_cfg(tmp_path: Path, **overrides) -> RunConfig:
    base = {
        "model.name": "resnet18", "model.weights": "none", "model.input_size": 32,
        "data.source": "digits", "data.limit_train": 64, "data.limit_val": 32, "data.batch_size": 16,
        "train.epochs": 1, "train.progress": False, "train.device": "cpu",
        "cache.dir": str(tmp_path / "cache"), "output": str(tmp_path / "runs"), "name": "run",
    }
    return apply_overrides(RunConfig(), base | overrides)


def train_argv(out: Path, name: str, *extra: str, model: str = "resnet18") -> list[str]:
    return ["train", "--model", model, "--weights", "none", "--input-size", "32", "--data", "digits",
            "--limit-train", "64", "--limit-val", "32", "--batch-size", "16", "--epochs", "1",
            "--no-progress", "--device", "cpu", "--output", str(out), "--name", name,
            "--set", f"cache.dir={out / 'cache'}", *extra]


def spy_steps(monkeypatch) -> list[dict]:
    """Record, at every optimizer step inside ``fit``, the stage, the optimizer and each group's lr."""
    records: list[dict] = []
    real = fit_module.train_one_epoch

    def spy(*args, **kwargs):
        desc = kwargs.get("desc", args[7] if len(args) > 7 else "")
        loss_fn = args[4]

        def on_step(opt):
            groups = [(g["name"], g["lr"], g["weight_decay"]) for g in opt.param_groups]
            records.append({"stage": desc.split()[0], "opt": opt, "loss_fn": loss_fn, "groups": groups})

        kwargs["on_step"] = on_step
        return real(*args, **kwargs)

    monkeypatch.setattr(fit_module, "train_one_epoch", spy)
    return records


def lrs_by_group(record: dict) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, lr, _ in record["groups"]:
        assert out.setdefault(name, lr) == lr  # decay and no-decay halves of a group share a rate
    return out


# ---------------------------------------------------------------------- metrics


def test_class_report_on_a_hand_made_example():
    classes = ["a", "b", "c", "d"]
    targets = torch.tensor([0, 0, 0, 1, 1, 2])
    preds = [0, 0, 1, 1, 2, 2]  # d never occurs and is never predicted
    logits = torch.full((6, 4), -5.0)
    for i, p in enumerate(preds):
        logits[i, p] = 5.0
        logits[i, 3] = 1.0  # second choice everywhere: d
    logits[2, 0] = 0.0  # sample 2 (true a, predicted b): a is only its third choice
    r = class_report(logits, targets, classes)
    assert r.confusion.tolist() == [[2, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 0], [0, 0, 0, 0]]
    assert r.top1 == pytest.approx(4 / 6)
    assert r.top5 == 1.0  # capped at 4 classes: always right
    assert r.precision == pytest.approx([1.0, 0.5, 0.5, 0.0])
    assert r.recall == pytest.approx([2 / 3, 0.5, 1.0, 0.0])
    assert r.f1 == pytest.approx([0.8, 0.5, 2 / 3, 0.0])
    assert r.support == [3, 2, 1, 0]
    assert r.loss == pytest.approx(float(F.cross_entropy(logits, targets)))
    assert topk_correct(logits, targets, 2) == 4  # the second choice (d) never helps
    assert topk_correct(logits, targets, 4) == 6
    d = r.to_dict()
    assert d["per_class"][1] == {"class": "b", "precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}
    text = format_report(r)
    assert "top-1 66.67%" in text and "confusion matrix" in text
    assert all(not math.isnan(v) for v in r.precision + r.recall + r.f1)


def test_class_report_uniform_logits_loss_is_log_n():
    r = class_report(torch.zeros(4, 5), torch.tensor([0, 1, 2, 3]), list("abcde"))
    assert r.loss == pytest.approx(math.log(5))


# ---------------------------------------------------------------------- parameter groups


def test_param_groups_no_decay_on_1d_and_only_trainable_params():
    net = build_network("resnet18", "none", num_classes=3)
    stage = StageConfig(name="s", epochs=1, freeze="first:2", lr=1e-3)
    apply_stage(net, stage)
    groups = param_groups(net, stage, base_lr=1e-3, weight_decay=0.05)
    seen = [id(p) for g in groups for p in g["params"]]
    trainable = [id(p) for p in net.parameters() if p.requires_grad]
    assert sorted(seen) == sorted(trainable) and len(seen) == len(set(seen))
    assert {g["name"] for g in groups} == {"layer2", "layer3", "layer4", "head"}
    for g in groups:
        if g["weight_decay"] > 0:
            assert g["weight_decay"] == 0.05 and all(p.ndim > 1 for p in g["params"])
        else:
            assert all(p.ndim <= 1 for p in g["params"])
    no_decay = sum(p.numel() for g in groups if g["weight_decay"] == 0 for p in g["params"])
    assert no_decay > 0  # biases and BatchNorm weights are there, without decay
    fc_bias = net.head.bias
    assert any(fc_bias is p for g in groups if g["weight_decay"] == 0 for p in g["params"])


def test_layer_decay_rates_decrease_geometrically():
    net = build_network("resnet18", "none", num_classes=3)
    stage = StageConfig(name="ft", epochs=1, freeze="none", lr=1e-3, layer_decay=0.5)
    apply_stage(net, stage)
    rates = {g["name"]: g["lr"] for g in param_groups(net, stage, base_lr=1e-3, weight_decay=0.01)}
    order = [*RESNET18_GROUPS, "head"]
    assert list(rates) == order
    assert rates["head"] == pytest.approx(1e-3)
    for deeper, shallower in zip(order[1:], order[:-1]):
        assert rates[shallower] == pytest.approx(rates[deeper] * 0.5)
    assert rates["stem"] == pytest.approx(1e-3 * 0.5**5)
    opt = build_optimizer(net, stage, TrainConfig(weight_decay=0.01))
    assert isinstance(opt, torch.optim.AdamW)
    assert {g["name"]: g["lr"] for g in opt.param_groups} == rates


def test_lr_mult_naming_an_unknown_group_is_an_error():
    net = build_network("resnet18", "none", num_classes=3)
    stage = StageConfig(name="s", epochs=1, freeze="none", lr=1e-3, lr_mult={"layer9": 2.0})
    with pytest.raises(HeadstartError, match="layer9"):
        param_groups(net, stage, 1e-3, 0.0)


def test_gradual_schedule_unfreezes_one_group_per_stage_deepest_first():
    net = build_network("resnet18", "none", num_classes=3)
    tc = TrainConfig(schedule="gradual", epochs=2, finetune_epochs=1, finetune_lr=3e-4)
    stages = resolve_stages(tc, net)
    unfreeze = [f"unfreeze-{g}" for g in reversed(RESNET18_GROUPS)]
    assert [s.name for s in stages] == ["head", *unfreeze, "finetune"]
    assert [s.epochs for s in stages] == [2, 1, 1, 1, 1, 1, 1]
    assert all(s.lr == 3e-4 for s in stages[1:])
    for k, stage in enumerate(stages[:-1]):
        apply_stage(net, stage)
        states = trainable_state(net)
        assert states["head"] == "trainable"
        live = [g for g in RESNET18_GROUPS if states[g] == "trainable"]
        assert live == RESNET18_GROUPS[len(RESNET18_GROUPS) - k:]
        assert all(states[g] == "frozen" for g in RESNET18_GROUPS if g not in live)
    with pytest.raises(HeadstartError, match="unknown schedule"):
        resolve_stages(TrainConfig(schedule="sometimes"), net)


def test_lr_factor_shapes():
    # cosine: linear warmup to 1, then down to 0
    f = [lr_factor(s, 10, 0.2, "cosine") for s in range(10)]
    assert f[:3] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert all(a > b for a, b in zip(f[2:], f[3:])) and lr_factor(10, 10, 0.2) == pytest.approx(0.0)
    # onecycle: warmup over at least 30%, anneals to 1/1000 of the peak
    assert lr_factor(3, 10, 0.0, "onecycle") == pytest.approx(1.0)
    assert lr_factor(10, 10, 0.0, "onecycle") == pytest.approx(1e-3)
    assert lr_factor(7, 10, 0.1, "constant") == 1.0
    # climb: the warm-up rises one climb-th of the rate per step; a short stage peaks below the full rate
    long = [lr_factor(s, 1000, 0.5, "cosine", climb=60) for s in range(62)]
    assert long[59] == pytest.approx(60 / 61) and long[60] == pytest.approx(1.0) and long[61] < 1.0
    short = [lr_factor(s, 12, 0.5, "cosine", climb=60) for s in range(13)]
    assert max(short) == pytest.approx(0.1) and short[:6] == pytest.approx([0.1 * (s + 1) / 7 for s in range(6)])
    assert short[12] == pytest.approx(0.0)
    assert lr_factor(0, 12, 0.0, "cosine", climb=60) == pytest.approx(1.0)  # no warm-up asked: the full rate
    with pytest.raises(HeadstartError):
        lr_factor(0, 10, 0.1, "step")


# ---------------------------------------------------------------------- fit: schedules and stopping


def test_fit_lrs_follow_warmup_cosine_per_stage(tmp_path, monkeypatch):
    records = spy_steps(monkeypatch)
    cfg = tiny_cfg(tmp_path, **{"train.epochs": 2, "train.finetune_epochs": 1, "train.warmup": 0.25,
                                "train.finetune_warmup": 0.5, "train.lr": 0.01, "train.finetune_lr": 0.001,
                                "train.finetune_warmup_steps": 6, "train.layer_decay": 0.5})
    net, data = prepare(cfg)
    run = RunDir.new(cfg)
    lines: list[str] = []
    result = fit(net, data, cfg, run, say=lines.append)
    assert [r["stage"] for r in result.history] == ["head", "head", "finetune"]
    climb = "   warm-up: 2 of its 4 steps, short of the 6 the climb to the full rate takes: the rate peaks at 33% of lr"
    assert climb in lines
    head = [r for r in records if r["stage"] == "head"]
    ft = [r for r in records if r["stage"] == "finetune"]
    assert len(head) == 8 and len(ft) == 4  # 64 images / 16 per batch = 4 steps per epoch

    # stage 1 (8 steps, warmup round(8 * 0.25) = 2 steps): only the head trains
    c = math.cos
    head_factors = [1 / 3, 2 / 3, 1.0, (1 + c(math.pi / 6)) / 2, (1 + c(math.pi / 3)) / 2, 0.5,
                    (1 + c(2 * math.pi / 3)) / 2, (1 + c(5 * math.pi / 6)) / 2]
    for r, f in zip(head, head_factors):
        assert lrs_by_group(r) == {"head": pytest.approx(0.01 * f)}

    # stage 2: a new optimizer, every group at finetune_lr scaled by layer decay, its own warmup
    assert ft[0]["opt"] is not head[0]["opt"]
    # 4 steps: warm-up round(4 * 0.5) = 2 steps (train.finetune_warmup), a third of the 6 steps the climb to
    # the full rate takes (train.finetune_warmup_steps), so the stage peaks at a third of finetune_lr
    ft_factors = [1 / 9, 2 / 9, 1 / 3, 1 / 6]
    for r, f in zip(ft, ft_factors):
        lrs = lrs_by_group(r)
        assert list(lrs) == [*RESNET18_GROUPS, "head"]
        for depth, g in enumerate(reversed(list(lrs))):
            assert lrs[g] == pytest.approx(0.001 * 0.5**depth * f), g

    # metrics.jsonl records each epoch's starting rates
    rows = [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines()]
    assert [r["lrs"]["head"] for r in rows] == pytest.approx([0.01 / 3, 0.0075, 0.001 / 9])
    assert rows[2]["lrs"]["stem"] == pytest.approx(0.001 / 9 * 0.5**5)


def test_every_fine_tuning_stage_gets_the_finetune_recipe():
    net = build_network("resnet18", "none", num_classes=3)
    tc = TrainConfig(finetune_epochs=2, finetune_lr=2e-4, finetune_warmup=0.4, finetune_head_mult=10.0,
                     finetune_warmup_steps=8)
    two_phase = resolve_stages(tc, net)[-1]
    gradual = resolve_stages(dataclasses.replace(tc, schedule="gradual"), net)[1]
    cfg = RunConfig(train=tc)
    plan = {"chosen": 0, "candidates": [{"groups": 2, "of": len(net.groups), "epochs": 3}]}
    budget = planned_stage(plan, net, cfg)
    for stage in (two_phase, gradual, budget):
        assert (stage.lr, stage.warmup, stage.warmup_steps, stage.lr_mult) == (2e-4, 0.4, 8, {"head": 10.0})
    assert two_phase.layer_decay == budget.layer_decay == tc.layer_decay
    no_climb = resolve_stages(dataclasses.replace(tc, finetune_warmup_steps=0), net)[-1]
    assert no_climb.warmup_steps is None  # 0: the warm-up fraction alone, climbing to the full rate
    rates = group_lrs(net, two_phase, 2e-4)
    assert rates["head"] == pytest.approx(2e-3) and rates["layer4"] == pytest.approx(2e-4 * tc.layer_decay)
    # the scheduler warms up over the stage's own fraction, not train.warmup's, climbing at 1/8 of the rate a step
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    build_scheduler(opt, 10, dataclasses.replace(tc, warmup=0.0), two_phase)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5 / 5)  # step 0 of a 4-step warm-up peaking at 4/8
    # and the plan the console and the report show says the same, per stage
    head = resolve_stages(tc, net)[0]
    assert (describe_stage(net, head, cfg).warmup, describe_stage(net, two_phase, cfg).warmup) == (tc.warmup, 0.4)


def test_radam_is_decoupled():
    net = build_network("resnet18", "none", num_classes=3)
    stage = StageConfig(name="ft", epochs=1, freeze="none", lr=1e-3)
    opt = build_optimizer(net, stage, TrainConfig(optimizer="radam"))
    assert isinstance(opt, torch.optim.RAdam) and opt.defaults["decoupled_weight_decay"] is True


def test_sgd_onecycle_label_smoothing(tmp_path, monkeypatch):
    records = spy_steps(monkeypatch)
    cfg = tiny_cfg(tmp_path, **{"train.epochs": 2, "train.optimizer": "sgd", "train.scheduler": "onecycle",
                                "train.label_smoothing": 0.1, "train.lr": 0.05, "train.warmup": 0.1})
    net, data = prepare(cfg)
    head_before = {k: v.clone() for k, v in net.head.state_dict().items()}
    result = fit(net, data, cfg, None, say=lambda s: None)
    assert len(result.history) == 2 and all(math.isfinite(r["train_loss"]) for r in result.history)
    opt = records[0]["opt"]
    assert isinstance(opt, torch.optim.SGD)
    assert opt.defaults["momentum"] == 0.9 and opt.defaults["nesterov"] is True
    assert records[0]["loss_fn"].label_smoothing == pytest.approx(0.1)
    # onecycle over 8 steps: warmup over round(8 * 0.3) = 2 steps, then anneal towards 1/1000
    factors = [lr_factor(s, 8, 0.1, "onecycle") for s in range(8)]
    assert factors[:3] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert [lrs_by_group(r)["head"] for r in records] == pytest.approx([0.05 * f for f in factors])
    assert not torch.equal(net.head.state_dict()["weight"], head_before["weight"])


def test_early_stopping_ends_the_stage_not_the_run(tmp_path):
    # lr 0 with a constant schedule: validation accuracy cannot improve after the first epoch.
    stages = [StageConfig(name="a", epochs=4, freeze="body", lr=0.0),
              StageConfig(name="b", epochs=2, freeze="body", lr=0.0)]
    cfg = tiny_cfg(tmp_path, **{"train.scheduler": "constant", "train.patience": 1})
    cfg.train.stages = stages
    net, data = prepare(cfg)
    lines: list[str] = []
    result = fit(net, data, cfg, None, say=lines.append)
    # patience counts within each stage: both stop after one epoch without improvement
    assert [(r["stage"], r["epoch"]) for r in result.history] == [("a", 1), ("a", 2), ("b", 1), ("b", 2)]
    # stage a was stopped early; stage b's stop fell on its last epoch, which is no early stop
    assert sum("early stop" in line for line in lines) == 1
    assert len({r["val_acc"] for r in result.history}) == 1
    # without patience every epoch runs
    cfg.train.patience = None
    net, data = prepare(cfg)
    result = fit(net, data, cfg, None, say=lambda s: None)
    assert len(result.history) == 6


def test_early_stopping_from_the_cli(tmp_path, capsys):
    argv = train_argv(tmp_path, "es", "--epochs", "5", "--lr", "0", "--scheduler", "constant",
                      "--patience", "2")
    assert main(argv) == 0
    lines = (tmp_path / "es" / "metrics.csv").read_text().splitlines()
    assert len(lines) == 1 + 3  # header, the best epoch, then two without improvement
    assert "epoch 3/5" in capsys.readouterr().out


# ---------------------------------------------------------------------- determinism


def _state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["state_dict"]


def _history(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("seconds", "images_per_s", "setup_seconds")} for r in rows]


def test_same_seed_repeats_bit_for_bit_and_another_seed_differs(tmp_path, capsys):
    out = tmp_path / "runs"
    extra = ["--finetune-epochs", "1", "--lr", "0.01", "--finetune-lr", "0.001"]
    for i, (name, seed) in enumerate((("a", "3"), ("b", "3"), ("c", "4"))):
        torch.manual_seed(100 + i)  # whatever the global RNG held before must not matter
        assert main(train_argv(out, name, "--seed", seed, *extra, model="mobilenet_v3_small")) == 0
    a, b, c = (_state(out / n / "best.pt") for n in "abc")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _history(out / "a") == _history(out / "b")
    assert any(not torch.equal(a[k], c[k]) for k in a)
    assert _history(out / "a") != _history(out / "c")


def test_seed_covers_model_initialisation(tmp_path):
    # random body weights and the new head's weights come from the run's seed, not the caller's RNG
    cfg = tiny_cfg(tmp_path, **{"train.seed": 5})
    torch.manual_seed(1)
    a, _ = prepare(cfg)
    torch.manual_seed(2)
    b, _ = prepare(cfg)
    c, _ = prepare(tiny_cfg(tmp_path, **{"train.seed": 6}))
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["head.weight"], sc["head.weight"])
    assert not torch.equal(sa["body.conv1.weight"], sc["body.conv1.weight"])


# ---------------------------------------------------------------------- frozen body


def test_head_stage_keeps_frozen_body_and_batchnorm_stats_bit_identical(tmp_path, monkeypatch, capsys):
    # A weights file with non-trivial BatchNorm statistics: the body must come back unchanged.
    model = build_network("resnet18", "none").body
    gen = torch.Generator().manual_seed(0)
    state = {}
    for k, v in model.state_dict().items():
        if k.endswith(("running_mean", "running_var")):
            v = torch.rand(v.shape, generator=gen) + 0.5
        elif k.endswith("num_batches_tracked"):
            v = torch.tensor(7)
        state[k] = v
    fc = torch.nn.Linear(512, 1000)
    state |= {"fc.weight": fc.weight.detach(), "fc.bias": fc.bias.detach()}
    wfile = tmp_path / "r18.pth"
    torch.save(state, wfile)

    saved: list[dict[str, torch.Tensor]] = []
    real_save = checkpoint.save

    def spy(path, payload):
        if Path(path).name == "last.pt":
            saved.append({k: v.clone() for k, v in payload["state_dict"].items()})
        return real_save(path, payload)

    monkeypatch.setattr(checkpoint, "save", spy)
    argv = train_argv(tmp_path / "runs", "frozen", "--finetune-epochs", "1", "--lr", "0.05",
                      "--weights", str(wfile),
                      "--set", "cache.enabled=false",  # the body really runs, in train mode, every step
                      "--finetune-bn", "train")
    assert main(argv) == 0
    assert "stage 1/2: head" in capsys.readouterr().out
    after_head, after_finetune = saved
    body = {k: v for k, v in state.items() if not k.startswith("fc.")}
    for k, v in body.items():
        assert torch.equal(after_head[f"body.{k}"], v), k
    # control: fine-tuning with BatchNorm in train mode does change the statistics this test compares
    assert not torch.equal(after_finetune["body.bn1.running_mean"], body["bn1.running_mean"])
    assert int(after_finetune["body.bn1.num_batches_tracked"]) > 7


# ---------------------------------------------------------------------- divergence and empty runs


def _saves(monkeypatch) -> list[tuple[str, dict]]:
    """Record every checkpoint written: (file name, payload)."""
    saved: list[tuple[str, dict]] = []
    real = checkpoint.save
    monkeypatch.setattr(checkpoint, "save", lambda path, payload: saved.append((Path(path).name, payload))
                        or real(path, payload))
    return saved


def _all_finite(path: Path) -> bool:
    state = torch.load(path, weights_only=True)["state_dict"]
    return all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_a_loss_that_turns_nan_stops_the_run_and_keeps_the_last_finite_checkpoint(tmp_path, monkeypatch):
    real = fit_module.build_loss
    calls = []

    def poisoned(*args):  # the 6th training step's loss is nan (epoch 2, step 2: 4 steps an epoch)
        inner = real(*args)

        def loss(logits, y):
            calls.append(1)
            out = inner(logits, y)
            return out * float("nan") if len(calls) == 6 else out
        return loss

    monkeypatch.setattr(fit_module, "build_loss", poisoned)
    saved = _saves(monkeypatch)
    cfg = tiny_cfg(tmp_path, **{"train.epochs": 3})
    net, data = prepare(cfg)
    run = RunDir.new(cfg)
    with pytest.raises(HeadstartError) as err:
        fit(net, data, cfg, run, say=lambda s: None)
    text = str(err.value)
    assert "stage 1 (head), epoch 2/3, step 2 (step 6 of the run)" in text and "loss is nan" in text
    assert "--lr" in text and "headstart lr-find --stage 1" in text and "\n" not in text
    assert [name for name, _ in saved] == ["best.pt", "last.pt"]  # epoch 1's, never overwritten
    assert torch.load(run.path / "last.pt", weights_only=True)["train_state"]["global_epoch"] == 1
    assert _all_finite(run.path / "last.pt") and _all_finite(run.path / "best.pt")
    assert len((run.path / "metrics.jsonl").read_text().splitlines()) == 1


def test_weights_that_turn_infinite_are_never_saved_mid_epoch(tmp_path, monkeypatch):
    # An infinite rate makes the head's weights non-finite at the first step of stage b, whose
    # mid-epoch checkpoint (one every step) would save them: the run stops there instead.
    saved = _saves(monkeypatch)
    cfg = tiny_cfg(tmp_path, **{"train.checkpoint_steps": 1})
    cfg.train.stages = [StageConfig(name="a", epochs=1, freeze="body", lr=1e-3),
                        StageConfig(name="b", epochs=1, freeze="body", lr=1e-3)]
    net, data = prepare(cfg)  # a config with an infinite rate is refused here, so set it after
    cfg.train.stages[1].lr = float("inf")
    run = RunDir.new(cfg)
    with pytest.raises(HeadstartError, match=r"stage 2 \(b\), epoch 1/1, step 1 \(step 5 of the run\): "
                                             r"the weights are no longer finite") as err:
        fit(net, data, cfg, run, say=lambda s: None)
    assert "the lr of stage 'b' in train.stages" in str(err.value)
    assert [(name, p["train_state"].get("partial", {}).get("batches")) for name, p in saved if name == "last.pt"] \
        == [("last.pt", 1), ("last.pt", 2), ("last.pt", 3), ("last.pt", None)]  # all of stage a's
    assert _all_finite(run.path / "last.pt")


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before:UserWarning")  # steps skipped
def test_an_fp16_scaler_that_keeps_skipping_steps_stops_the_run(tmp_path, monkeypatch):
    # Gradients that always overflow: the scaler skips every step and halves its scale, from 4
    # to below 1 at the third step. Without a stop, nothing would train and nothing would say so.
    from headstart.runtime.precision import Precision
    from headstart.training import inputs as inputs_module

    monkeypatch.setattr(inputs_module, "resolve_precision", lambda spec, device: Precision(
        None, torch.amp.GradScaler("cpu", init_scale=4.0), device.type))
    cfg = tiny_cfg(tmp_path, **{"train.epochs": 2})
    net, data = prepare(cfg)
    net.head.weight.register_hook(lambda g: g * float("inf"))
    with pytest.raises(HeadstartError, match=r"epoch 1/2, step 3 \(step 3 of the run\): the fp16 gradient scaler "
                                             r"skipped the last 3 step\(s\)"):
        fit(net, data, cfg, None, say=lambda s: None)


def test_a_run_with_no_epochs_says_it_trained_nothing(tmp_path):
    cfg = tiny_cfg(tmp_path, **{"train.epochs": 0})
    net, data = prepare(cfg)
    run = RunDir.new(cfg)
    result = fit(net, data, cfg, run, say=lambda s: None)
    assert (result.epochs_run, result.best_checkpoint, result.history) == (0, None, [])
    assert not (run.path / "best.pt").exists()
    cfg = tiny_cfg(tmp_path, **{"name": "one"})
    net, data = prepare(cfg)
    run = RunDir.new(cfg)
    result = fit(net, data, cfg, run, say=lambda s: None)
    assert (result.epochs_run, result.best_checkpoint) == (1, run.path / "best.pt")
    with pytest.raises(HeadstartError, match="stage 'head' has -1 epochs.*--epochs"):
        resolve_stages(TrainConfig(epochs=-1), net)


def test_fine_tuning_that_harms_is_said_after_the_run_not_hidden_by_best_pt():
    from headstart.training.console import outcome_lines

    def row(stage, i, epoch, acc, loss):
        return {"stage": stage, "stage_index": i, "epoch": epoch, "val_acc": acc, "train_loss": loss}

    head = row("head", 0, 1, 0.90, 0.3)
    assert outcome_lines([head, row("finetune", 1, 1, 0.88, 0.5), row("finetune", 1, 2, 0.93, 0.2)], 10) == []
    assert outcome_lines([head], 10) == []  # no fine-tuning: nothing to say
    worse = outcome_lines([head, row("finetune", 1, 1, 0.85, 0.6)], 10)
    assert len(worse) == 1 and "ended at 85.00%, below the head stage's 90.00%" in worse[0]
    assert "best.pt holds the best epoch (head epoch 1, 90.00%)" in worse[0]
    blown = outcome_lines([head, row("finetune", 1, 1, 0.10, 3.7e5), row("finetune", 1, 2, 0.12, 9e4)], 10)
    assert len(blown) == 2 and "diverged: its training loss reached 3.7e+05 in finetune epoch 1" in blown[0]
    assert "--finetune-lr" in blown[0]


def test_patience_counts_epochs_where_neither_accuracy_nor_loss_improved():
    from headstart.training.state import FitState

    state = FitState()
    seen = []
    # clothing-small's budget stage: accuracy dips at epochs 2 and 4 while the loss keeps falling
    for acc, loss in [(0.8475, 0.466), (0.8446, 0.450), (0.8768, 0.403), (0.8651, 0.381), (0.8886, 0.358)]:
        state.track_best({"val_acc": acc, "val_loss": loss}, patience=1)
        seen.append(state.stopped)
    assert seen == [False] * 5 and state.stage_best == 0.8886
    state.track_best({"val_acc": 0.88, "val_loss": 0.36}, patience=1)  # neither improved
    assert state.stopped and state.bad_epochs == 1
    state.next_stage(0)
    state.track_best({"val_acc": 0.5, "val_loss": 2.0}, patience=1)  # a new stage starts its own counts
    assert not state.stopped and state.stage_best_loss == 2.0 and state.best == 0.8886
