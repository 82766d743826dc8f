"""The fine-tuning stage's weight average: it trails the weights as trained, is what validation sees,
what the checkpoints hold and what the stage leaves behind, and resumes exactly."""

from __future__ import annotations

import json

import torch
from torch import nn

from headstart.config import RunConfig, apply_overrides
from headstart.jobs.train import prepare
from headstart.models import checkpoint
from headstart.training import averaging
from headstart.training.averaging import WeightAverage
from headstart.training.fit import fit
from headstart.training.runs import RunDir

TINY = {"model.name": "resnet18", "model.weights": "none", "model.input_size": 32, "data.source": "digits",
        "data.limit_train": 64, "data.limit_val": 32, "data.batch_size": 16, "train.progress": False,
        "train.device": "cpu", "train.seed": 1, "train.epochs": 1, "train.finetune_epochs": 2,
        "train.finetune_bn": "frozen", "tensorboard": False, "report": False}


def _quiet(_: str) -> None:
    pass


def test_the_average_moves_a_fraction_of_the_way_and_swaps_in_and_out():
    layer = nn.Linear(2, 1)
    with torch.no_grad():
        layer.weight.fill_(0.0)
        layer.bias.fill_(0.0)
    avg = WeightAverage(layer, fraction=0.5, steps=4)  # spans 2 steps: decay 1/2
    assert avg.decay == 0.5
    with torch.no_grad():
        layer.weight.fill_(4.0)
    avg.update()
    with avg.swapped():
        assert torch.equal(layer.weight, torch.full((1, 2), 2.0))
        with avg.swapped():  # nested: still the average
            assert torch.equal(layer.weight, torch.full((1, 2), 2.0))
        assert torch.equal(avg.live_state()["weight"], torch.full((1, 2), 4.0))
    assert torch.equal(layer.weight, torch.full((1, 2), 4.0)), "the live weights are back after the block"
    assert torch.equal(avg.live_state()["weight"], torch.full((1, 2), 4.0))
    avg.set_steps(40)  # a refitted stage: the same fraction of more steps
    assert avg.decay == 1 - 1 / 20
    avg.keep()
    assert torch.equal(layer.weight, torch.full((1, 2), 2.0))


def test_frozen_parameters_are_not_averaged():
    net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2), nn.Linear(2, 1))
    net[0].requires_grad_(False)
    avg = WeightAverage(net, fraction=0.25, steps=8)
    assert set(avg.live) == {"1.weight", "1.bias", "1.running_mean", "1.running_var", "2.weight", "2.bias"}


def test_fine_tuning_validates_saves_and_keeps_the_average_of_its_steps(tmp_path, monkeypatch):
    cfg = apply_overrides(RunConfig(), TINY | {"train.finetune_average": 0.5, "cache.dir": str(tmp_path / "c"),
                                               "output": str(tmp_path), "name": "avg"})
    began: list[dict[str, torch.Tensor]] = []
    seen: list[dict[str, torch.Tensor]] = []
    real_init, real_update = WeightAverage.__init__, WeightAverage.update

    def init(self, net, fraction, steps):  # the weights the stage starts from
        real_init(self, net, fraction, steps)
        began.append({n: t.clone() for n, t in self.average.items()})

    def update(self):  # the live weights after every optimizer step of the stage
        seen.append({n: t.detach().clone() for n, t in self.live.items()})
        real_update(self)

    monkeypatch.setattr(averaging.WeightAverage, "__init__", init)
    monkeypatch.setattr(averaging.WeightAverage, "update", update)
    net, data = prepare(cfg, say=_quiet)
    result = fit(net, data, cfg, RunDir.new(cfg, tensorboard=False), say=_quiet)

    steps = 2 * 4  # 2 epochs of 4 batches
    assert len(began) == 1 and len(seen) == steps, "one average, updated after every step of the fine-tuning stage"
    decay = 1 - 1 / (0.5 * steps)
    expected = {n: t.clone() for n, t in began[0].items()}
    for live in seen:
        for n in expected:
            expected[n] = decay * expected[n] + (1 - decay) * live[n]
    final = net.state_dict()
    last = checkpoint.read(tmp_path / "avg" / "last.pt")["state_dict"]
    moved = 0
    for n, want in expected.items():
        assert torch.allclose(final[n], want, atol=1e-6), f"the stage keeps the average ({n})"
        assert torch.allclose(last[n], want, atol=1e-6), f"last.pt holds the average ({n})"
        moved += not torch.allclose(want, seen[-1][n])
    assert moved, "the average differs from the weights as trained"

    tuned = [r for r in result.history if r["stage"] == "finetune"]
    assert len(tuned) == 2 and all("val_acc_live" in r for r in tuned)
    assert "val_acc_live" not in result.history[0], "the head stage keeps no average"
    rows = [json.loads(line) for line in (tmp_path / "avg" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["val_acc"] == result.final.top1, "the final report is the average's"


def test_no_average_when_its_fraction_is_zero(tmp_path):
    cfg = apply_overrides(RunConfig(), TINY | {"train.finetune_average": 0.0, "cache.dir": str(tmp_path / "c"),
                                               "output": str(tmp_path), "name": "plain"})
    net, data = prepare(cfg, say=_quiet)
    result = fit(net, data, cfg, None, say=_quiet)
    assert all("val_acc_live" not in r for r in result.history)
